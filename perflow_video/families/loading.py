"""Loading teacher components from a hub id, a local diffusers folder, a single checkpoint file, or an
embedded model: ``tiny`` (each family's random tiny model, built once into a cache folder, then loaded
through the very same path) or ``tiny-teacher`` (the trained tiny text-to-video teacher shipped in the
package, animatediff only); or, with
``model.init=random``, building the real architecture from the configs shipped in
``perflow_video/architectures`` with random weights (:func:`shipped_configs`, :func:`random_weights`).

``check_weights_present`` answers, before anything loads, whether a source is there: embedded, local, in the
Hugging Face cache (looked up offline), or, when downloads are allowed, on a reachable hub.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
from diffusers import DDIMScheduler
from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
from transformers import CLIPTextConfig, CLIPTokenizer

from perflow_video.architectures import component_config
from perflow_video.errors import ConfigError, WeightsNotFoundError
from perflow_video.families.base import missing_weights_error
from perflow_video.family_names import FamilyName
from perflow_video.tiny.embedded_teacher import tiny_teacher_folder
from perflow_video.tiny.tiny_tokenizer import tiny_tokenizer

#: The embedded random tiny model of each family (built into :func:`tiny_cache_dir`).
TINY_PREFIX = "tiny"
#: The embedded *trained* tiny text-to-video teacher (animatediff only; ``perflow_video/tiny/assets``).
TINY_TEACHER = "tiny-teacher"
#: The weight sources that need no download and no path: ``model.pretrained_model_name_or_path`` /
#: ``model.motion_adapter`` values (``--base`` / ``--motion_adapter`` of generate.py).
EMBEDDED_MODELS = (TINY_PREFIX, TINY_TEACHER)
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


def tiny_teacher_path(family: str) -> str:
    """The folder of the embedded trained teacher; a ConfigError naming the key for a family other than
    animatediff (the teacher is an SD1.5-style pipeline plus motion modules)."""
    if family != "animatediff":
        raise ConfigError(
            f"model.pretrained_model_name_or_path={TINY_TEACHER} (generate.py --base {TINY_TEACHER}) is the "
            f"embedded tiny text-to-video teacher, for model.family=animatediff only; family {family} takes "
            f"{TINY_PREFIX} (its random tiny model) or a {family} model, e.g. {EXAMPLE_WEIGHTS[family]}"
        )
    return str(tiny_teacher_folder())


def embedded_source(path: str, subfolder: str | None) -> tuple[str, str | None]:
    """Where ``(path, subfolder)`` reads from when ``path`` is ``tiny-teacher``: the teacher's folder, and
    for a model read at the root (``model.motion_adapter=tiny-teacher``) its ``motion_adapter/``.
    Any other path is returned unchanged."""
    if path != TINY_TEACHER:
        return path, subfolder
    return str(tiny_teacher_folder()), subfolder or "motion_adapter"


def resolve_model_path(path: str, family: str) -> str:
    """``tiny`` -> a local diffusers folder of the family's tiny model (built atomically on first use);
    ``tiny-teacher`` -> the embedded trained teacher's folder (animatediff only, else a ConfigError).

    Every other value is returned unchanged (hub id, folder or file).
    """
    if path == TINY_TEACHER:
        return tiny_teacher_path(family)
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
    """``cls.from_pretrained(path, subfolder=...)`` with an error that says where it looked (``tiny-teacher``:
    :func:`embedded_source`)."""
    path, subfolder = embedded_source(path, subfolder)
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
    """Raises ``WeightsNotFoundError`` unless ``source`` is embedded (tiny, tiny-teacher), a local path, in the HF cache, or a repo
    the hub serves (then the run downloads it; ``HF_HUB_OFFLINE=1`` rules that out).

    Args:
        flag: the config key that names the source, e.g. ``model.pretrained_model_name_or_path``.
        source: its value (hub id, local folder or file, or an :data:`EMBEDDED_MODELS` name).
        marker: the file whose presence in the cache means the repo was downloaded (``PIPELINE_MARKER``
            for a pipeline, ``MODEL_MARKER`` for one model such as a MotionAdapter).
        revision: the hub revision asked for (None: the default branch).
        example: a typical value of ``flag`` for this family, quoted in the message.
    """
    if source in EMBEDDED_MODELS or os.path.exists(source):
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


# ----------------------------------------------------------------------------------------------------
# model.init=random: the real architecture, random weights, no download
# ----------------------------------------------------------------------------------------------------

#: The shipped architecture (``perflow_video/architectures/<name>``) of each family's base model.
FAMILY_ARCHITECTURES: dict[FamilyName, str] = {
    "animatediff": "sd15", "sd15": "sd15", "sd21": "sd21", "sdxl": "sdxl",
}  # fmt: skip
#: Every random-weight build starts from this seed, so all processes and a resumed run build the same teacher.
RANDOM_INIT_SEED = 0
#: How a ``model.motion_adapter`` value names its version (first match wins: v1-5-3 and v1-5-2 before v1-5),
#: e.g. guoyww/animatediff-motion-adapter-v1-5-3, mm_sd_v15_v2.ckpt, mm_sd_v15.ckpt.
MOTION_ADAPTER_VERSIONS: tuple[tuple[str, re.Pattern], ...] = (
    ("motion_adapter_v1_5_3", re.compile(r"v1-5-3|(^|[^a-z0-9])v3($|[^0-9])")),
    ("motion_adapter_v1_5_2", re.compile(r"v1-5-2|(^|[^a-z0-9])v2($|[^0-9])")),
    ("motion_adapter_v1_5", re.compile(r"v1-5|v1[45]|(^|[^a-z0-9])v1($|[^0-9])")),
)
DEFAULT_MOTION_ADAPTER_ARCHITECTURE = "motion_adapter_v1_5_2"


def motion_adapter_architecture(value: str | None) -> str:
    """The shipped motion-adapter architecture a ``model.motion_adapter`` value names (None / embedded: v1-5-2).

    Raises:
        ValueError: the value names no version (the message says how to name one).
    """
    if value is None or value in EMBEDDED_MODELS:
        return DEFAULT_MOTION_ADAPTER_ARCHITECTURE
    normalized = re.sub(r"[_.]", "-", value.lower())
    for architecture, pattern in MOTION_ADAPTER_VERSIONS:
        if pattern.search(normalized):
            return architecture
    raise ValueError(
        f"model.motion_adapter={value!r} names no motion-adapter version; with model.init=random it selects "
        "the architecture: use a value naming v1-5, v1-5-2 or v1-5-3 (e.g. "
        "guoyww/animatediff-motion-adapter-v1-5-3), or null for v1-5-2"
    )


#: A component name (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``, ``scheduler``, ``motion_adapter``)
#: -> its config dict.
ConfigReader = Callable[[str], dict]


@dataclass(frozen=True)
class ComponentConfigs:
    """The component configs a random-weight build reads, and what the built models then say they are."""

    read: ConfigReader
    base_model: str  # FamilyModels.base_model, e.g. "random:sd15"
    motion_adapter: str | None = None  # FamilyModels.motion_adapter, e.g. "random:motion_adapter_v1_5_2"


def with_tokenizer_vocabulary(config: dict, tokenizer: CLIPTokenizer) -> dict:
    """A CLIP text-encoder config whose vocabulary (and special ids) are the tokenizer's."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    return {**config, "vocab_size": len(tokenizer), **ids}


def shipped_configs(family: FamilyName, motion_adapter: str | None) -> ComponentConfigs:
    """The configs of ``model.init=random``: the family's shipped architecture (animatediff: SD1.5 plus the
    motion-adapter version ``motion_adapter`` names). The text encoders' vocabulary is shrunk to the embedded
    tiny tokenizer's (~900 tokens instead of CLIP's 49408: the real BPE files are not shipped), which removes
    (49408 - ~900) x hidden_size embedding weights (37M for SD1.5) and changes nothing else."""
    base = FAMILY_ARCHITECTURES[family]
    adapter = motion_adapter_architecture(motion_adapter) if family == "animatediff" else None
    tokenizer = tiny_tokenizer()

    def read(component: str) -> dict:
        if component == "motion_adapter":
            return component_config(adapter)
        config = component_config(base, component)
        return (
            with_tokenizer_vocabulary(config, tokenizer) if component.startswith("text_encoder") else config
        )

    return ComponentConfigs(read, f"random:{base}", adapter and f"random:{adapter}")


@contextlib.contextmanager
def random_weights(offset: int = 0) -> Iterator[None]:
    """Seed torch's CPU RNG (``RANDOM_INIT_SEED + offset``) while models are built; the global state is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED + offset)
        yield


def random_text_encoder(cls, config: dict):
    """A transformers CLIP text model (``CLIPTextModel`` / ``CLIPTextModelWithProjection``) from a config dict."""
    return cls(CLIPTextConfig(**config)).eval()


def read_component_config(source: str, component: str | None, revision: str | None = None) -> dict:
    """``<source>/<component>/config.json`` from a local folder or the Hugging Face cache (never downloads;
    ``tiny-teacher``: :func:`embedded_source`).

    Raises:
        OSError: the folder has no such file, or the hub repo's file is not in the cache.
    """
    source, component = embedded_source(source, component)
    name = f"{component}/config.json" if component else "config.json"
    if os.path.isdir(source):
        path = Path(source) / name
    else:
        path = huggingface_hub.hf_hub_download(source, name, revision=revision, local_files_only=True)
    return json.loads(Path(path).read_text())
