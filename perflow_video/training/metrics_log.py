"""``<output_dir>/metrics.jsonl``: the run's metrics as one JSON object per line (``{"step": N, ...}``).

Training lines carry ``loss`` (and ``loss_window_<k>``, ``lr``, ``skipped_nonfinite``), evaluation lines
``eval_loss`` (and ``eval_loss_window_<k>``). The file always describes one run: a fresh start empties it,
a resume drops what was logged after the checkpoint it continues from (those steps run again).
"""

from __future__ import annotations

import json
from pathlib import Path

from perflow_video.atomic_files import atomic_destination

METRICS_FILE = "metrics.jsonl"


def append_metrics(path: Path, step: int, values: dict) -> None:
    """Add one line ``{"step": step, **values}``."""
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, **values}) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """Every line, in order (an absent file is an empty log; a torn last line from a crash is skipped)."""
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return lines


def truncate_metrics(path: Path, last_step: int | None) -> None:
    """Keep only lines with ``step <= last_step`` (None: keep nothing), rewritten atomically."""
    if not path.is_file():
        return
    kept = [m for m in read_metrics(path) if last_step is not None and m.get("step", 0) <= last_step]
    with atomic_destination(path) as tmp:
        Path(tmp).write_text("".join(json.dumps(m) + "\n" for m in kept))


def metric_history(path: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of the lines that have ``key``, one per step (the last one logged for it)."""
    by_step = {m["step"]: m[key] for m in read_metrics(path) if key in m}
    return sorted(by_step.items())
