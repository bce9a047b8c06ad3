"""The benchmarks' outputs: a JSON file and a markdown file, written atomically; markdown tables; numbers."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from perflow_video.atomic_files import atomic_destination


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """``path`` holds its old content or all of ``text``, never a part."""
    with atomic_destination(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)


def write_report(out_dir: str | os.PathLike, stem: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    """``<out_dir>/<stem>.json`` (``payload``, strict JSON: NaN/inf are written as null) and
    ``<out_dir>/<stem>.md``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    write_text_atomic(json_path, json.dumps(finite_or_null(payload), indent=2, allow_nan=False) + "\n")
    write_text_atomic(md_path, markdown if markdown.endswith("\n") else markdown + "\n")
    return json_path, md_path


def finite_or_null(value):
    """A copy of a JSON-like value with every NaN / inf float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(v) for v in value]
    return value


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats with 4 significant digits, None as an en dash."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def error_text(err: BaseException) -> str:
    """One line for a section that failed: the exception type and the start of its message."""
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {message[:500]}"


__all__ = ["error_text", "finite_or_null", "markdown_table", "write_report", "write_text_atomic"]
