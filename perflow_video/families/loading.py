"""Loading teacher components from a hub id, a local diffusers folder, a single checkpoint file, or the
embedded tiny default (built once into a cache folder, then loaded through the very same path).

``check_weights_present`` answers, before anything loads, whether a source is there: tiny, local, in the
Hugging Face cache (looked up offline), or, when downloads are allowed, on a reachable hub.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import huggingface_hub
from diffusers import DDIMScheduler
from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

from perflow_video.errors import WeightsNotFoundError
from perflow_video.families.base import missing_weights_error
from perflow_video.family_names import FamilyName

TINY_PREFIX = "tiny"
#: Where each family's base weights usually come from (the example in a "weights not found" message).
EXAMPLE_WEIGHTS: dict[FamilyName, str] = {
    "animatediff": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
# The motion adapter a recipe gets when it names none, and the example the error messages give.
DEFAULT_MOTION_ADAPTER = EXAMPLE_MOTION_ADAPTER = "guoyww/animatediff-motion-adapter-v1-5-2"
# The file that marks a hub repo as downloaded: a pipeline's index, a single model's config.
PIPELINE_MARKER, MODEL_MARKER = "model_index.json", "config.json"


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


def in_hf_cache(repo_id: str, marker: str, revision: str | None) -> bool:
    """Whether ``marker`` of the hub repo is in the local Hugging Face cache (no network)."""
    found = huggingface_hub.try_to_load_from_cache(repo_id, marker, revision=revision)
    return isinstance(found, str)


def _is_repo_id(path: str) -> bool:
    try:
        huggingface_hub.utils.validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def hub_problem(repo_id: str, revision: str | None) -> str | None:
    """Why the run could not download ``repo_id`` (None if the hub answers that it exists)."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set, so nothing is downloaded"
    try:
        huggingface_hub.HfApi().repo_info(repo_id, revision=revision, timeout=10)
    except RepositoryNotFoundError:
        return "the hub has no such repo (or it is private / gated: log in with `hf auth login`)"
    except RevisionNotFoundError:
        return f"the hub repo has no revision {revision!r}"
    except Exception as err:  # any failure to reach the hub: the download would fail the same way
        return f"the hub is not reachable ({type(err).__name__}: {str(err)[:120]})"
    return None


def check_weights_present(flag: str, source: str, marker: str, revision: str | None, example: str) -> None:
    """Raises ``WeightsNotFoundError`` unless ``source`` is tiny, a local path, in the HF cache, or a repo
    the hub serves (then the run downloads it; ``HF_HUB_OFFLINE=1`` rules that out).

    Args:
        flag: the config key that names the source, e.g. ``model.pretrained_model_name_or_path``.
        source: its value (hub id, local folder or file, or ``tiny``).
        marker: the file whose presence in the cache means the repo was downloaded (``PIPELINE_MARKER``
            for a pipeline, ``MODEL_MARKER`` for one model such as a MotionAdapter).
        revision: the hub revision asked for (None: the default branch).
        example: a typical value of ``flag`` for this family, quoted in the message.
    """
    if source == TINY_PREFIX or os.path.exists(source):
        return
    if not _is_repo_id(source):
        raise WeightsNotFoundError(
            f"{flag}={source!r}: no such file or folder (give a local diffusers folder / checkpoint file or a "
            f"hub id, e.g. {flag}={example})"
        )
    if in_hf_cache(source, marker, revision) or (problem := hub_problem(source, revision)) is None:
        return
    fetch = f"hf download {source}" + (f" --revision {revision}" if revision else "")
    instead = example if example != source else f"/models/{example.split('/')[-1]}"
    raise WeightsNotFoundError(
        f"{flag}={source!r} is neither a local path nor in the Hugging Face cache "
        f"({huggingface_hub.constants.HF_HUB_CACHE}), and {problem}. Fetch it where the hub is reachable "
        f"(`{fetch}`) or set {flag} to a local folder or cached hub id, e.g. {flag}={instead}"
    )
