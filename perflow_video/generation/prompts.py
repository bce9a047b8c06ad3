"""Prompts from the command line or a file, and the file names clips get from them."""

from __future__ import annotations

import re
from pathlib import Path

from perflow_video.errors import ConfigError, PathNotFoundError


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped.

    Raises PathNotFoundError if the file is missing and ConfigError if it holds no prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise PathNotFoundError(f"--prompts {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--prompts {path}: cannot read it ({err})") from err
    prompts = [line.strip() for line in lines]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ConfigError(
            f"--prompts {path}: the file holds no prompt (only blank lines or # comments); "
            "write one prompt per line"
        )
    return prompts


def slug(text: str, limit: int = 60) -> str:
    """A file-name-safe form of a prompt: runs of other characters become ``_`` (as the training samples)."""
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:limit] or "empty"
