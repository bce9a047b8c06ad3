"""Loading teacher components from a hub id, a local diffusers folder, a single checkpoint file, or the
embedded tiny default (built once into a cache folder, then loaded through the very same path)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from diffusers import DDIMScheduler

from perflow_video.families.base import missing_weights_error

TINY_PREFIX = "tiny"


def tiny_cache_dir() -> Path:
    """Where embedded tiny models are materialised ($PERFLOW_VIDEO_CACHE, default ~/.cache/perflow_video)."""
    root = os.environ.get("PERFLOW_VIDEO_CACHE") or os.path.join(Path.home(), ".cache", "perflow_video")
    return Path(root) / "tiny_models"


def resolve_model_path(path: str, family: str) -> str:
    """``tiny`` -> a local diffusers folder of the family's tiny model (built atomically on first use).

    Every other value is returned unchanged (hub id, folder or file).
    """
    if path != TINY_PREFIX:
        return path
    from perflow_video.tiny.tiny_models import (  # only the embedded default needs them
        TINY_MODELS_VERSION,
        save_tiny_model,
    )

    folder = tiny_cache_dir() / f"{family}-seed0-v{TINY_MODELS_VERSION}"
    if (folder / "model_index.json").is_file():
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{family}-"))
    save_tiny_model(family, tmp)
    try:
        os.replace(tmp, folder)  # atomic: a crash never leaves a half-written tiny model
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def load_component(
    cls, path: str, subfolder: str | None, revision: str | None, variant: str | None, flag: str
):
    """``cls.from_pretrained(path, subfolder=...)`` with an error that says where it looked."""
    local = os.path.isdir(path)
    try:
        return cls.from_pretrained(
            path, subfolder=subfolder, revision=revision, variant=variant, local_files_only=local or None
        )
    except (OSError, ValueError) as err:
        where = f"{path}/{subfolder}" if subfolder else path
        raise missing_weights_error(cls.__name__, where, flag) from err


def load_scheduler_config(path: str, revision: str | None, flag: str) -> dict:
    """The teacher's noise-scheduler config (``scheduler/scheduler_config.json``) as a plain dict."""
    try:
        return dict(DDIMScheduler.load_config(path, subfolder="scheduler", revision=revision))
    except (OSError, ValueError) as err:
        raise missing_weights_error("scheduler config", f"{path}/scheduler", flag) from err
