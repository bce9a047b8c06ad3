"""Where the samples come from: a finished training run (``--run DIR``), a base model + ΔW (``--base``,
``--delta``, ``--family``) or the embedded tiny default (animatediff: the trained ``tiny-teacher``; the
image families: their random ``tiny`` model).

A run folder (README "Outputs") holds ``config.yaml`` (family, base model), ``student/`` (diffusers
layout, written by the family's ``save_student``: ``unet_motion/`` for AnimateDiff, ``unet/`` for the image
families), ``scheduler/`` (the PeRFlowScheduler config) and ``train_summary.json`` once training finished.
The frozen parts (VAE, text encoders, tokenizers) are loaded as the training loaded them, through the
family's own ``load``; the UNet is the run's student. Every family samples: ``animatediff`` clips, ``sd15`` /
``sd21`` / ``sdxl`` images (the family's ``data_kind``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from diffusers import UNet2DConditionModel, UNetMotionModel

from perflow_video.errors import ConfigError, PathNotFoundError, WeightsNotFoundError
from perflow_video.families import FamilyModels, FamilySpec, ModelFamily, get_family
from perflow_video.families.loading import (
    EMBEDDED_MODELS,
    TINY_PREFIX,
    TINY_TEACHER,
    read_component_config,
    resolve_model_path,
)
from perflow_video.method.reflow_objective import ReflowConfig
from perflow_video.scheduler import PeRFlowScheduler, perflow_scheduler_for
from perflow_video.weights.delta_sources import read_delta
from perflow_video.weights.delta_weights import DeltaMetadata, apply_delta_weights

#: Where ``python scripts/train_animatediff.py`` (no flags) writes its run, relative to the working directory.
TINY_RUN_DIR = Path("outputs") / "tiny-animatediff"
#: Frames per clip of the embedded video models (tiny-teacher and the random tiny AnimateDiff); their
#: resolution is read from their configs (:func:`model_resolution`: 32 px for tiny-teacher).
TINY_NUM_FRAMES = 16
FINISHED_MARKER = "train_summary.json"
#: The families whose pipelines give clips; the others (sd15, sd21, sdxl) give images.
VIDEO_FAMILIES = ("animatediff",)
#: The family sampled when nothing names one (no --run, no ΔW metadata, no --family).
DEFAULT_FAMILY = "animatediff"
#: The student's folder under ``<run>/student/`` and its diffusers class, by the family's ``data_kind``.
STUDENT_FOLDERS = {"clips": ("unet_motion", UNetMotionModel), "images": ("unet", UNet2DConditionModel)}


def tiny_run_dir(family: str = DEFAULT_FAMILY) -> Path:
    """Where the tiny config of ``family`` writes its run (``outputs/tiny-<family>``, configs/tiny/*.yaml)."""
    return Path("outputs") / f"tiny-{family}"


def is_video_family(family: ModelFamily) -> bool:
    return family.data_kind == "clips"


@dataclass
class LoadedModel:
    """A ready-to-sample model: the family's parts, the student UNet and its PeRFlowScheduler.

    Attributes:
        description: what was loaded, for messages and clips.json / images.json (the run folder, the base
            model + ΔW, or the tiny default).
        resolution / num_frames: the run's (or model's) defaults for --height/--width and --num_frames
            (num_frames None for an image family).
        max_frames: the motion modules' positional length (``motion_max_seq_length``); None for images.
    """

    family: ModelFamily
    models: FamilyModels
    student: torch.nn.Module
    scheduler: PeRFlowScheduler
    description: str
    resolution: int
    num_frames: int | None
    max_frames: int | None

    @property
    def is_video(self) -> bool:
        """Whether the family samples clips (else single images)."""
        return is_video_family(self.family)


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


def family_named(name: str, where: str) -> ModelFamily:
    """The family adapter of ``name``; an unknown name is a ConfigError that starts with ``where``."""
    try:
        return get_family(name)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def _max_frames(unet: torch.nn.Module) -> int:
    return int(getattr(unet.config, "motion_max_seq_length", 32))


def sample_resolution(unet_config, vae_config) -> int:
    """The UNet's ``sample_size`` times the VAE's factor, as diffusers' pipelines compute their default size."""
    return int(unet_config["sample_size"]) * 2 ** (len(vae_config["block_out_channels"]) - 1)


def pipeline_resolution(models: FamilyModels) -> int:
    """The square size an image pipeline samples by default (:func:`sample_resolution`: 512 / 768 / 1024 for
    SD1.5 / SD2.1 / SDXL, 64 / 96 / 128 tiny)."""
    return sample_resolution(models.teacher.config, models.vae.config)


def model_resolution(source: str, family: str) -> int:
    """The default square size of a base model folder (or embedded name), from its unet/ and vae/ configs
    (:func:`sample_resolution`; 32 for tiny-teacher). Reads configs only, loads no weights."""
    folder = resolve_model_path(source, family)
    return sample_resolution(read_component_config(folder, "unet"), read_component_config(folder, "vae"))


def embedded_model(family: str) -> str:
    """The embedded model a family samples by default: the trained tiny-teacher for animatediff, the random
    tiny model for the image families."""
    return TINY_TEACHER if family in VIDEO_FAMILIES else TINY_PREFIX


def _finish(family, models, student, scheduler, description, resolution, num_frames) -> LoadedModel:
    # Drop the family's teacher and its student copy: only the sampled UNet stays in memory.
    models = dataclasses.replace(models, teacher=student, student=student, resolution=resolution)
    student.eval().requires_grad_(False)
    if not is_video_family(family):
        return LoadedModel(family, models, student, scheduler, description, resolution, None, None)
    return LoadedModel(
        family, models, student, scheduler, description, resolution, num_frames, _max_frames(student)
    )


def check_run_folder(run: Path) -> tuple[dict, ModelFamily]:
    """A finished run (before anything loads): its config's model section and family."""
    if not run.is_dir():
        raise PathNotFoundError(f"--run {run}: no such folder (give a training output folder)")
    model = _read_run_config(run)["model"]
    family = family_named(str(model.get("family", DEFAULT_FAMILY)), f"{run / 'config.yaml'}: model.family")
    for needed in (FINISHED_MARKER, "student", "scheduler"):
        if not (run / needed).exists():
            raise PathNotFoundError(
                f"--run {run}: no {needed} there; the run has not finished (train it to the end, or point "
                "--run at a finished one)"
            )
    return model, family


def _load_student(run: Path, family: ModelFamily) -> torch.nn.Module:
    folder, cls = STUDENT_FOLDERS[family.data_kind]
    student_dir = run / "student" / folder
    try:
        return cls.from_pretrained(student_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise WeightsNotFoundError(
            f"--run {run}: cannot load the student from {student_dir} ({err})"
        ) from err


def load_run(run: str | Path, num_frames: int | None = None) -> LoadedModel:
    """The student of a finished training run, with the PeRFlowScheduler it was trained for.

    ``num_frames`` (None: the run's ``model.num_frames``) only sets a video family's per-clip frame count.
    """
    run = Path(run)
    model, family = check_run_folder(run)
    where = str(run / "config.yaml")
    run_frames = int(model.get("num_frames", TINY_NUM_FRAMES))
    spec = _spec(model, where, num_frames or run_frames)
    models = family.load(spec)
    student = _load_student(run, family)
    try:
        scheduler = PeRFlowScheduler.from_pretrained(run / "scheduler")
    except (OSError, ValueError) as err:
        raise ConfigError(f"--run {run}: cannot load scheduler/ ({err})") from err
    return _finish(family, models, student, scheduler, os.fspath(run), spec.resolution, run_frames)


def teacher_description(family: str) -> str:
    """What :func:`load_tiny_teacher` of ``family`` samples, in words."""
    if family in VIDEO_FAMILIES:
        return f"the trained tiny teacher ({TINY_TEACHER}, embedded)"
    return f"the untrained tiny teacher ({TINY_PREFIX} {family})"


def load_tiny_teacher(num_frames: int | None = None, family: str = DEFAULT_FAMILY) -> LoadedModel:
    """The embedded model of ``family`` itself (no PeRFlow training: :func:`embedded_model`, at the size its
    configs give), sampled with a PeRFlowScheduler on its schedule (the family's default parameterization,
    K = 4)."""
    adapter = family_named(family, "--family")
    base = embedded_model(adapter.name)
    resolution = model_resolution(base, adapter.name)
    motion_adapter = base if is_video_family(adapter) else None
    frames = num_frames or TINY_NUM_FRAMES
    models = adapter.load(FamilySpec(base, motion_adapter, None, None, None, resolution, frames))
    scheduler = perflow_scheduler_for(
        models.scheduler_config, adapter.default_parameterization, ReflowConfig().num_time_windows
    )
    description = teacher_description(adapter.name)
    return _finish(adapter, models, models.teacher, scheduler, description, resolution, TINY_NUM_FRAMES)


def load_tiny_default(
    num_frames: int | None = None, run_dir: Path | None = None, family: str = DEFAULT_FAMILY
) -> tuple[LoadedModel, str]:
    """The tiny default of ``family``: the finished run in ``run_dir`` (default ``outputs/tiny-<family>``) if
    there is one, else the tiny teacher itself. Returns the model and a line saying which it is."""
    run_dir = tiny_run_dir(family) if run_dir is None else run_dir
    if (run_dir / FINISHED_MARKER).is_file():
        return load_run(run_dir, num_frames), f"no model given: using the finished tiny run in {run_dir}"
    trainer = (
        "python scripts/train_animatediff.py"
        if family == DEFAULT_FAMILY
        else f"python scripts/train_image.py --model {family} --tiny"
    )
    note = (
        f"no model given and no finished run in {run_dir} ({trainer} writes one): "
        f"sampling {teacher_description(family)} with the PeRFlow scheduler"
    )
    return load_tiny_teacher(num_frames, family), note


def tiny_model_folder(family: str = "animatediff") -> str:
    """The local diffusers folder of the embedded default model of ``family`` (:func:`embedded_model`: the
    shipped trained tiny-teacher for animatediff, which also holds ``motion_adapter/``; the random tiny model,
    built on first use, for the image families): what the README's snippets load where a user loads
    ``stable-diffusion-v1-5/stable-diffusion-v1-5``."""
    return resolve_model_path(embedded_model(family), family)


@dataclass
class BaseSource:
    """What ``--base`` / ``--motion_adapter`` / ``--delta`` / ``--family`` resolve to, before any model loads
    (:func:`resolve_base`; the ΔW is read once, here).

    Attributes:
        trained: the model section of the training config in the ΔW's metadata ({} without one).
    """

    base: str
    family: ModelFamily
    motion_adapter: str | None
    delta: Path | None = None
    tensors: dict[str, torch.Tensor] | None = None
    meta: DeltaMetadata | None = None
    trained: dict = field(default_factory=dict)


def _read_delta_file(delta: Path) -> tuple[dict[str, torch.Tensor], DeltaMetadata | None, dict]:
    """(ΔW tensors, metadata or None, the model section of its training config) of --delta."""
    if not delta.exists():
        raise PathNotFoundError(f"--delta {delta}: no such file or folder")
    try:
        tensors, meta = read_delta(delta)  # a file, or a UNet folder of differences (official ΔW)
    except (ConfigError, PathNotFoundError) as err:
        raise ConfigError(f"--delta {delta}: {err}") from err
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ConfigError(f"--delta {delta}: not a readable safetensors file ({err})") from err
    trained = json.loads(meta.resolved_config or "{}").get("model", {}) if meta is not None else {}
    return tensors, meta, trained


def _base_family(family: str | None, delta: Path | None, meta: DeltaMetadata | None) -> ModelFamily:
    """--family, else the ΔW's family, else animatediff; --family against the ΔW's own is an error."""
    trained_family = meta.family if meta is not None else None
    if family is not None and trained_family is not None and family != trained_family:
        raise ConfigError(
            f"--family {family}: --delta {delta} was trained on {trained_family}; leave out --family "
            f"(the ΔW's family is used) or give --family {trained_family}"
        )
    name = family or trained_family or DEFAULT_FAMILY
    return family_named(name, "--family" if family is not None else f"--delta {delta}")


def resolve_base(
    base: str | None,
    motion_adapter: str | None = None,
    delta: str | Path | None = None,
    family: str | None = None,
) -> BaseSource:
    """The base model, family and motion adapter the flags mean (the ΔW's metadata fills in what they leave
    out); the ΔW file is read here. Raises ConfigError naming the flag."""
    tensors, meta, trained = None, None, {}
    if delta is not None:
        delta = Path(delta)
        tensors, meta, trained = _read_delta_file(delta)
    adapter = _base_family(family, delta, meta)
    if base is None:
        base = trained.get("pretrained_model_name_or_path")
        if base is None:
            raise ConfigError(f"--delta {delta}: its metadata names no base model; give --base")
    if not is_video_family(adapter):
        if motion_adapter is not None:
            raise ConfigError(
                f"--motion_adapter {motion_adapter}: {adapter.name} is an image family (no motion modules); "
                "leave the flag out"
            )
    elif motion_adapter is None:
        same_base = trained.get("pretrained_model_name_or_path") == base
        embedded = base if base in EMBEDDED_MODELS else None  # an embedded base's own adapter
        motion_adapter = trained.get("motion_adapter") if same_base else embedded
    return BaseSource(base, adapter, motion_adapter, delta, tensors, meta, trained)


def _base_spec(source: BaseSource, num_frames: int) -> FamilySpec:
    """The FamilySpec of a base model: the ΔW's training settings where they are about this base / adapter."""
    trained, base = source.trained, source.base
    same_base = base == trained.get("pretrained_model_name_or_path")
    same_adapter = source.motion_adapter == trained.get("motion_adapter")
    default_resolution = (
        model_resolution(base, source.family.name)
        if base in EMBEDDED_MODELS
        else source.family.default_resolution
    )
    return FamilySpec(
        pretrained_model_name_or_path=base,
        motion_adapter=source.motion_adapter,
        single_file_config=trained.get("single_file_config"),
        revision=trained.get("revision") if same_base else None,
        variant=trained.get("variant") if same_base else None,
        resolution=int(trained.get("resolution") or default_resolution),
        num_frames=num_frames,
        motion_adapter_config=trained.get("motion_adapter_config") if same_adapter else None,
    )


def _describe_base(source: BaseSource) -> str:
    adapter = f" + motion adapter {source.motion_adapter}" if source.motion_adapter else ""
    return f"base {source.base}{adapter}"


def load_base_source(
    source: BaseSource, delta_scale: float = 1.0, num_frames: int | None = None
) -> LoadedModel:
    """Load a :func:`resolve_base` result with ``ΔW * delta_scale`` added to its UNet.

    The scheduler's parameterization and K come from the ΔW's metadata; without it, the family's default
    parameterization and K = 4. Image families sample at the ΔW's training resolution, else at the base
    pipeline's own default size (:func:`pipeline_resolution`).
    """
    trained, family = source.trained, source.family
    run_frames = int(trained.get("num_frames") or TINY_NUM_FRAMES)  # 16: embedded models and AnimateDiff
    spec = _base_spec(source, num_frames or run_frames)
    models = family.load(spec)
    unet, description = models.teacher, _describe_base(source)
    if source.tensors is not None:
        try:
            apply_delta_weights(unet, source.tensors, alpha=delta_scale)
        except (KeyError, ValueError) as err:
            raise ConfigError(
                f"--delta {source.delta}: does not fit the base model {source.base} ({err})"
            ) from err
        description += f" + {delta_scale:g} x ΔW {source.delta}"
    meta = source.meta
    parameterization = meta.parameterization if meta else family.default_parameterization
    windows = meta.num_time_windows if meta else ReflowConfig().num_time_windows
    scheduler = perflow_scheduler_for(models.scheduler_config, parameterization, windows)
    resolution = spec.resolution
    if not is_video_family(family) and not trained.get("resolution"):
        resolution = pipeline_resolution(models)
    return _finish(family, models, unet, scheduler, description, resolution, run_frames)


def load_base(
    base: str | None,
    motion_adapter: str | None = None,
    delta: str | Path | None = None,
    delta_scale: float = 1.0,
    num_frames: int | None = None,
    family: str | None = None,
) -> LoadedModel:
    """A base model (diffusers folder, hub id or ``tiny``) (+ motion adapter), with ``ΔW * delta_scale`` added.

    The ΔW file's metadata gives the family, the parameterization and K of the scheduler and, for what the
    flags leave out, the model settings the ΔW was trained with (base model, motion adapter, resolution).
    ``family`` (None: the ΔW's, else animatediff) picks the family of a base without metadata.
    Without a ΔW: the base model itself.
    """
    return load_base_source(resolve_base(base, motion_adapter, delta, family), delta_scale, num_frames)


__all__ = [
    "BaseSource",
    "LoadedModel",
    "check_run_folder",
    "load_base",
    "load_base_source",
    "load_run",
    "load_tiny_default",
    "load_tiny_teacher",
    "model_resolution",
    "pipeline_resolution",
    "resolve_base",
    "tiny_run_dir",
]
