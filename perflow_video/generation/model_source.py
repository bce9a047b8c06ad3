"""Where the clips come from: a finished training run (``--run DIR``) or the embedded tiny default.

A run folder (README "Outputs") holds ``config.yaml`` (family, base model), ``student/`` (diffusers
layout, written by the family's ``save_student``), ``scheduler/`` (the PeRFlowScheduler config) and
``train_summary.json`` once training finished. The frozen parts (VAE, text encoder, tokenizer) are loaded
as the training loaded them, through the family's own ``load``; the UNet is the run's student.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from diffusers import UNetMotionModel

from perflow_video.errors import ConfigError, PathNotFoundError, WeightsNotFoundError
from perflow_video.families import FamilyModels, FamilySpec, ModelFamily, get_family
from perflow_video.families.loading import resolve_model_path
from perflow_video.method.reflow_objective import ReflowConfig
from perflow_video.scheduler import PeRFlowScheduler, perflow_scheduler_for
from perflow_video.weights.delta_sources import read_delta
from perflow_video.weights.delta_weights import apply_delta_weights

#: Where ``python scripts/train_animatediff.py`` (no flags) writes its run, relative to the working directory.
TINY_RUN_DIR = Path("outputs") / "tiny-animatediff"
#: The embedded tiny AnimateDiff's settings (configs/tiny/animatediff.yaml): 64 px, 16 frames.
TINY_RESOLUTION, TINY_NUM_FRAMES = 64, 16
FINISHED_MARKER = "train_summary.json"
# The families whose pipelines give clips (image families write PNGs: not this script's job yet).
VIDEO_FAMILIES = ("animatediff",)


@dataclass
class LoadedModel:
    """A ready-to-sample model: the family's parts, the student UNet and its PeRFlowScheduler.

    Attributes:
        description: what was loaded, for messages and clips.json (the run folder, or the tiny default).
        resolution / num_frames: the run's (or model's) defaults for --height/--width and --num_frames.
        max_frames: the motion modules' positional length (``motion_max_seq_length``).
    """

    family: ModelFamily
    models: FamilyModels
    student: torch.nn.Module
    scheduler: PeRFlowScheduler
    description: str
    resolution: int
    num_frames: int
    max_frames: int


def _read_run_config(run: Path) -> dict:
    path = run / "config.yaml"
    if not path.is_file():
        raise PathNotFoundError(f"--run {run}: no config.yaml there; is it a training output folder?")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise ConfigError(f"{path}: no model section; is it a config.yaml written by the training scripts?")
    return cfg


def _spec(model: dict, where: str, num_frames: int) -> FamilySpec:
    try:
        return FamilySpec(
            pretrained_model_name_or_path=str(model["pretrained_model_name_or_path"]),
            motion_adapter=model.get("motion_adapter"),
            single_file_config=model.get("single_file_config"),
            revision=model.get("revision"),
            variant=model.get("variant"),
            resolution=int(model["resolution"]),
            num_frames=num_frames,
            motion_adapter_config=model.get("motion_adapter_config"),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{where}: model section lacks or mangles {err}") from err


def _video_family(name: str, where: str) -> ModelFamily:
    try:
        family = get_family(name)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    if family.name not in VIDEO_FAMILIES:
        raise ConfigError(
            f"{where}: model.family={name!r} is an image family; generate.py samples video families "
            f"({', '.join(VIDEO_FAMILIES)}). Sample image students with the diffusers pipeline (README)"
        )
    return family


def _max_frames(unet: torch.nn.Module) -> int:
    return int(getattr(unet.config, "motion_max_seq_length", 32))


def _finish(family, models, student, scheduler, description, resolution, num_frames) -> LoadedModel:
    # Drop the family's teacher and its student copy: only the sampled UNet stays in memory.
    models = dataclasses.replace(models, teacher=student, student=student)
    student.eval().requires_grad_(False)
    return LoadedModel(
        family, models, student, scheduler, description, resolution, num_frames, _max_frames(student)
    )


def check_run_folder(run: Path) -> tuple[dict, ModelFamily]:
    """A finished run of a video family (before anything loads): its config's model section and family."""
    if not run.is_dir():
        raise PathNotFoundError(f"--run {run}: no such folder (give a training output folder)")
    model = _read_run_config(run)["model"]
    family = _video_family(str(model.get("family", "animatediff")), str(run / "config.yaml"))
    for needed in (FINISHED_MARKER, "student", "scheduler"):
        if not (run / needed).exists():
            raise PathNotFoundError(
                f"--run {run}: no {needed} there; the run has not finished (train it to the end, or point "
                "--run at a finished one)"
            )
    return model, family


def load_run(run: str | Path, num_frames: int | None = None) -> LoadedModel:
    """The student of a finished training run, with the PeRFlowScheduler it was trained for.

    ``num_frames`` (None: the run's ``model.num_frames``) only sets the family's per-clip frame count.
    """
    run = Path(run)
    model, family = check_run_folder(run)
    where = str(run / "config.yaml")
    run_frames = int(model.get("num_frames", TINY_NUM_FRAMES))
    spec = _spec(model, where, num_frames or run_frames)
    models = family.load(spec)
    student_dir = run / "student" / "unet_motion"
    try:
        student = UNetMotionModel.from_pretrained(student_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise WeightsNotFoundError(
            f"--run {run}: cannot load the student from {student_dir} ({err})"
        ) from err
    try:
        scheduler = PeRFlowScheduler.from_pretrained(run / "scheduler")
    except (OSError, ValueError) as err:
        raise ConfigError(f"--run {run}: cannot load scheduler/ ({err})") from err
    return _finish(family, models, student, scheduler, os.fspath(run), spec.resolution, run_frames)


def load_tiny_teacher(num_frames: int | None = None) -> LoadedModel:
    """The embedded tiny AnimateDiff itself (no training), sampled with a PeRFlowScheduler on its schedule."""
    family = get_family("animatediff")
    spec = FamilySpec("tiny", "tiny", None, None, None, TINY_RESOLUTION, num_frames or TINY_NUM_FRAMES)
    models = family.load(spec)
    reflow = ReflowConfig()
    scheduler = perflow_scheduler_for(
        models.scheduler_config, reflow.parameterization, reflow.num_time_windows
    )
    return _finish(
        family,
        models,
        models.teacher,
        scheduler,
        "tiny teacher (untrained)",
        TINY_RESOLUTION,
        TINY_NUM_FRAMES,
    )


def load_tiny_default(num_frames: int | None = None, run_dir: Path = TINY_RUN_DIR) -> tuple[LoadedModel, str]:
    """The tiny default: the finished run in ``outputs/tiny-animatediff`` if there is one, else the tiny
    teacher itself. Returns the model and a line saying which it is."""
    if (run_dir / FINISHED_MARKER).is_file():
        return load_run(run_dir, num_frames), f"no model given: using the finished tiny run in {run_dir}"
    note = (
        f"no model given and no finished run in {run_dir} (python scripts/train_animatediff.py writes one): "
        "sampling the untrained tiny teacher with the PeRFlow scheduler"
    )
    return load_tiny_teacher(num_frames), note


def tiny_model_folder(family: str = "animatediff") -> str:
    """The local diffusers folder of the embedded tiny model of ``family`` (built on first use): what the
    README's snippets load where a user loads ``stable-diffusion-v1-5/stable-diffusion-v1-5``. The
    AnimateDiff one also holds ``motion_adapter/``."""
    return resolve_model_path("tiny", family)


def load_base(
    base: str | None,
    motion_adapter: str | None = None,
    delta: str | Path | None = None,
    delta_scale: float = 1.0,
    num_frames: int | None = None,
) -> LoadedModel:
    """A base model (diffusers folder, hub id or ``tiny``) + motion adapter, with ``ΔW * delta_scale`` added.

    The ΔW file's metadata gives the parameterization and K of the scheduler and, for what the flags
    leave out, the model settings the ΔW was trained with (base model, motion adapter, resolution).
    Without a ΔW: the base model itself (parameterization B, K = 4).
    """
    tensors, meta, trained = None, None, {}
    if delta is not None:
        delta = Path(delta)
        if not delta.exists():
            raise PathNotFoundError(f"--delta {delta}: no such file or folder")
        try:
            tensors, meta = read_delta(delta)  # a file, or a UNet folder of differences (official ΔW)
        except (ConfigError, PathNotFoundError) as err:
            raise ConfigError(f"--delta {delta}: {err}") from err
        except Exception as err:  # safetensors raises its own error types for a damaged file
            raise ConfigError(f"--delta {delta}: not a readable safetensors file ({err})") from err
        if meta is not None:
            trained = json.loads(meta.resolved_config or "{}").get("model", {})
    if base is None:
        base = trained.get("pretrained_model_name_or_path")
        if base is None:
            raise ConfigError(f"--delta {delta}: its metadata names no base model; give --base")
    family = _video_family(str(trained.get("family", "animatediff")), f"--delta {delta}")
    if motion_adapter is None:
        same_base = trained.get("pretrained_model_name_or_path") == base
        motion_adapter = trained.get("motion_adapter") if same_base else ("tiny" if base == "tiny" else None)
    resolution = int(
        trained.get("resolution") or (TINY_RESOLUTION if base == "tiny" else family.default_resolution)
    )
    run_frames = int(trained.get("num_frames") or (TINY_NUM_FRAMES if base == "tiny" else 16))
    same_adapter = motion_adapter == trained.get("motion_adapter")
    spec = FamilySpec(
        pretrained_model_name_or_path=base,
        motion_adapter=motion_adapter,
        single_file_config=trained.get("single_file_config"),
        revision=trained.get("revision") if base == trained.get("pretrained_model_name_or_path") else None,
        variant=trained.get("variant") if base == trained.get("pretrained_model_name_or_path") else None,
        resolution=resolution,
        num_frames=num_frames or run_frames,
        motion_adapter_config=trained.get("motion_adapter_config") if same_adapter else None,
    )
    models = family.load(spec)
    unet = models.teacher
    description = f"base {base}" + (f" + motion adapter {motion_adapter}" if motion_adapter else "")
    if tensors is not None:
        try:
            apply_delta_weights(unet, tensors, alpha=delta_scale)
        except (KeyError, ValueError) as err:
            raise ConfigError(f"--delta {delta}: does not fit the base model {base} ({err})") from err
        description += f" + {delta_scale:g} x ΔW {delta}"
    parameterization = meta.parameterization if meta else ReflowConfig().parameterization
    windows = meta.num_time_windows if meta else ReflowConfig().num_time_windows
    scheduler = perflow_scheduler_for(models.scheduler_config, parameterization, windows)
    return _finish(family, models, unet, scheduler, description, resolution, run_frames)


__all__ = [
    "LoadedModel",
    "check_run_folder",
    "load_base",
    "load_run",
    "load_tiny_default",
    "load_tiny_teacher",
]
