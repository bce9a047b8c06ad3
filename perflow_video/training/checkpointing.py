"""Resumable checkpoints, written atomically: a crash mid-write never leaves a broken "latest".

Layout: ``<output_dir>/checkpoints/checkpoint-<step>/`` holds ``accelerator.save_state`` plus
``trainer_state.json`` (written last). A checkpoint is first written to a hidden temporary folder
and renamed into place only when complete; "latest" is the highest complete step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from perflow_video.atomic_files import atomic_destination
from perflow_video.errors import PathNotFoundError

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainerState:
    """Where the run stands: optimizer steps done and data batches consumed (for the same data order)."""

    global_step: int
    batches_seen: int


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (incomplete temporary folders are ignored)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """``None`` -> start fresh; ``"latest"`` -> newest complete checkpoint (or None); else that folder."""
    if resume is None:
        return None
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise PathNotFoundError(
            f"run.resume_from_checkpoint={resume!r} is not a complete checkpoint (no {STATE_FILE}); "
            f"complete ones: {[str(p) for p in complete_checkpoints(output_dir)] or 'none'}"
        )
    return path


def read_state(checkpoint: Path) -> TrainerState:
    return TrainerState(**json.loads((checkpoint / STATE_FILE).read_text()))


def temporary_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """The hidden folder a checkpoint is written into before it is renamed into place."""
    return checkpoint_root(output_dir) / f".tmp-checkpoint-{step}"


def finalize(output_dir: str | os.PathLike, state: TrainerState, total_limit: int) -> Path:
    """Write the state file, fsync, rename the temporary folder into place, prune old checkpoints.

    Call on the main process after every process has finished ``save_state`` into ``temporary_dir``.
    """
    tmp = temporary_dir(output_dir, state.global_step)
    with atomic_destination(tmp / STATE_FILE) as state_tmp, open(state_tmp, "w") as f:
        json.dump(asdict(state), f)
    final = checkpoint_root(output_dir) / f"checkpoint-{state.global_step}"
    if final.exists():  # a re-run of the same step replaces its older copy
        shutil.rmtree(final)
    os.replace(tmp, final)
    if total_limit > 0:
        for old in complete_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def clean_temporaries(output_dir: str | os.PathLike) -> None:
    """Remove leftovers of checkpoints that were being written when a previous run died."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for p in root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(p, ignore_errors=True)
