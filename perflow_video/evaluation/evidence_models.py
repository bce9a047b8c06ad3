"""The models the evidence table measures: the teacher (a diffusers AnimateDiff folder) and PeRFlow students
(finished runs of ``scripts/train_animatediff.py``, or a run's ``delta_weights.safetensors`` on its own),
read from their own files (docs/evidence.md).

A student's recipe is what its files say, never a flag: from a run folder, the parameterization and K from
``scheduler/scheduler_config.json`` (the PeRFlowScheduler that samples it), the CFG mode and the trained
guidance w* from ``config.yaml`` (``reflow.guidance_scale``: 1 = CFG-sync, else CFG-fixed at w*); from a ΔW
file, the same from its metadata (added to the teacher's UNet). ``<file>,rank=R`` adds instead what the
rank-R LoRA files of that ΔW carry (:func:`~.lora_fidelity.lora_delta`: truncated SVDs of the spatial weights
and of the motion attention projections, nothing else), as a user loading the LoRAs gets.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from torch import Tensor

from perflow_video.errors import ConfigError, PathNotFoundError
from perflow_video.evaluation.lora_fidelity import lora_delta
from perflow_video.families import get_family
from perflow_video.families.animatediff import motion_unet
from perflow_video.families.base import FamilyModels, FamilySpec
from perflow_video.families.loading import resolve_model_path
from perflow_video.method.teacher_solver import Conditioning
from perflow_video.scheduler import PeRFlowScheduler, perflow_scheduler_for
from perflow_video.weights.delta_sources import read_delta
from perflow_video.weights.delta_weights import apply_delta_weights

PARAMETERIZATION_NAMES = {"ddim_eps": "B", "diff_eps": "A", "velocity": "velocity"}


@dataclass
class Teacher:
    """The frozen teacher: its motion UNet, VAE, text encoder and DDIM scheduler config."""

    folder: str
    models: FamilyModels
    fingerprint: str  # content hash of the folder: cached teacher samples are valid for these weights only

    @property
    def unet(self) -> torch.nn.Module:
        return self.models.teacher

    @property
    def scheduler_config(self) -> dict:
        return self.models.scheduler_config

    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, F, h, w) of one clip's latents (the UNet's ``sample_size``, as diffusers' pipelines use it)."""
        cfg = self.unet.config
        return (cfg.in_channels, self.models.num_frames, cfg.sample_size, cfg.sample_size)

    @torch.no_grad()
    def conditioning(self, prompts: list[str]) -> Conditioning:
        """The UNet's conditioning for ``prompts`` (per frame, as ``AnimateDiffPipeline`` builds it)."""
        family = get_family("animatediff")
        return family.expand_conditioning(self.models, family.encode_text(self.models, prompts, "cpu"))

    @torch.no_grad()
    def decode(self, latents: Tensor, chunk: int = 64) -> Tensor:
        """(N, C, F, h, w) latents -> (N, 3, F, H, W) pixels in [-1, 1] (the VAE's posterior mean scale)."""
        n, c, f, h, w = latents.shape
        frames = (
            latents.permute(0, 2, 1, 3, 4).reshape(n * f, c, h, w) / self.models.vae.config.scaling_factor
        )
        pixels = torch.cat([self.models.vae.decode(part).sample for part in frames.split(chunk)])
        pixels = pixels.clamp(-1.0, 1.0).float()
        return pixels.reshape(n, f, *pixels.shape[1:]).permute(0, 2, 1, 3, 4)


def folder_fingerprint(folder: str | Path) -> str:
    """SHA-256 (first 16 hex digits) over every file's relative path and bytes under ``folder``."""
    digest = hashlib.sha256()
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def load_teacher(folder: str, num_frames: int) -> Teacher:
    """The teacher of a diffusers folder holding ``motion_adapter/`` (the tiny teacher's layout); ``tiny-teacher``
    and ``tiny`` name the embedded trained and random tiny models."""
    folder = resolve_model_path(folder, "animatediff")
    if not Path(folder, "motion_adapter").is_dir():
        raise PathNotFoundError(
            f"--teacher {folder}: no motion_adapter/ folder (a diffusers AnimateDiff folder)"
        )
    family = get_family("animatediff")
    spec = FamilySpec(folder, f"{folder}/motion_adapter", None, None, None, 0, num_frames)
    models = family.load(spec)
    models.student = None  # the evidence samples students from their runs, not a copy of the teacher
    for module in (models.teacher, models.vae, *models.text_encoders):
        module.eval()
    return Teacher(folder, models, folder_fingerprint(folder))


@dataclass
class StudentRun:
    """A trained PeRFlow student and the recipe its run folder records."""

    name: str
    run_dir: str
    unet: torch.nn.Module
    scheduler_config: dict
    parameterization: str  # ddim_eps | diff_eps | velocity
    num_windows: int
    trained_guidance: float  # reflow.guidance_scale: 1 = CFG-sync, w* otherwise (CFG-fixed)
    trained_on: str  # the teacher the run names (model.pretrained_model_name_or_path)

    @property
    def cfg_mode(self) -> str:
        return "sync" if self.trained_guidance == 1.0 else "fixed"

    def sampling_guidance(self, w: float) -> float:
        """CFG-sync students are sampled with the table's guidance w; CFG-fixed ones without guidance."""
        return w if self.cfg_mode == "sync" else 1.0

    def reference_guidance(self, w: float) -> float:
        """The guidance of the teacher output it is compared with: w (CFG-sync) or its trained w* (CFG-fixed)."""
        return w if self.cfg_mode == "sync" else self.trained_guidance

    def scheduler(self) -> PeRFlowScheduler:
        return PeRFlowScheduler.from_config(self.scheduler_config)

    def describe(self) -> str:
        """E.g. ``B, K=4, CFG-fixed w*=4``."""
        kind = PARAMETERIZATION_NAMES.get(self.parameterization, self.parameterization)
        cfg = "CFG-sync" if self.cfg_mode == "sync" else f"CFG-fixed w*={self.trained_guidance:g}"
        return f"{kind}, K={self.num_windows}, {cfg}"

    def info(self) -> dict:
        return {
            "name": self.name, "run_dir": self.run_dir, "parameterization": self.parameterization,
            "num_windows": self.num_windows, "cfg_mode": self.cfg_mode, "trained_guidance": self.trained_guidance,
            "trained_on": self.trained_on, "description": self.describe(),
        }  # fmt: skip


def parse_student_arg(value: str) -> tuple[str, str]:
    """``NAME=RUN_DIR`` -> (name, run_dir)."""
    name, sep, run_dir = value.partition("=")
    if not sep or not name or not run_dir:
        raise ConfigError(f"--student {value!r}: expected NAME=RUN_DIR")
    return name, run_dir


def read_run_recipe(run_dir: Path) -> dict:
    """``config.yaml``'s reflow section and the teacher it names, and the run's PeRFlowScheduler config."""
    config_path, scheduler_path = run_dir / "config.yaml", run_dir / "scheduler" / "scheduler_config.json"
    for path in (config_path, scheduler_path):
        if not path.is_file():
            raise PathNotFoundError(
                f"{run_dir}: no {path.relative_to(run_dir)} (not a finished training run)"
            )
    config = yaml.safe_load(config_path.read_text())
    scheduler_config = json.loads(scheduler_path.read_text())
    if scheduler_config.get("_class_name") != "PeRFlowScheduler":
        raise ConfigError(f"{scheduler_path}: not a PeRFlowScheduler config")
    return {"reflow": config["reflow"], "model": config["model"], "scheduler": scheduler_config}


def load_student_unet(run_dir: Path, teacher: Teacher) -> torch.nn.Module:
    """``student/unet_motion/`` (the whole student), else the teacher's UNet + ``student/motion_adapter/``."""
    full, adapter = run_dir / "student" / "unet_motion", run_dir / "student" / "motion_adapter"
    if full.is_dir():
        return UNetMotionModel.from_pretrained(full).eval()
    if adapter.is_dir():
        unet = UNet2DConditionModel.from_pretrained(Path(teacher.folder) / "unet")
        return motion_unet(unet, MotionAdapter.from_pretrained(adapter)).eval()
    raise PathNotFoundError(f"{run_dir}: no student/unet_motion/ or student/motion_adapter/")


def split_lora_rank(source: str) -> tuple[str, int | None]:
    """``<path>,rank=R`` -> (path, R); any other source -> (source, None)."""
    path, sep, rank = source.rpartition(",rank=")
    if not sep:
        return source, None
    if not rank.isdigit() or int(rank) < 1:
        raise ConfigError(f"--student ...={source}: rank must be a positive integer, got {rank!r}")
    return path, int(rank)


def load_delta_student(name: str, path: Path, teacher: Teacher, lora_rank: int | None = None) -> StudentRun:
    """The teacher's UNet + a ΔW file (or, with ``lora_rank``, + what its rank-r LoRA files carry);
    parameterization, K and CFG mode from the file's metadata."""
    tensors, meta = read_delta(path)
    if meta is None:
        raise ConfigError(f"--student {name}={path}: the ΔW has no PeRFlow metadata (parameterization, K)")
    unet = copy.deepcopy(teacher.unet)
    apply_delta_weights(unet, tensors if lora_rank is None else lora_delta(tensors, lora_rank))
    scheduler = perflow_scheduler_for(teacher.scheduler_config, meta.parameterization, meta.num_time_windows)
    guidance = 1.0 if meta.cfg_mode == "sync" else float(meta.cfg_scale)
    source = str(path) if lora_rank is None else f"{path},rank={lora_rank}"
    return StudentRun(
        name, source, unet.eval(), dict(scheduler.config), meta.parameterization, meta.num_time_windows,
        guidance, meta.base_model,
    )  # fmt: skip


def load_student(name: str, run_dir: str, teacher: Teacher) -> StudentRun:
    """A student from its run folder (its recipe from the run's config.yaml and scheduler config), or from a
    ``.safetensors`` ΔW file added to the teacher, whole or as its rank-R LoRAs (``<file>,rank=R``;
    :func:`load_delta_student`)."""
    source, rank = split_lora_rank(run_dir)
    folder = Path(source)
    if folder.suffix == ".safetensors" and folder.is_file():
        return load_delta_student(name, folder, teacher, rank)
    if rank is not None:
        if folder.suffix == ".safetensors":
            raise PathNotFoundError(f"--student {name}={run_dir}: no such ΔW file {folder}")
        raise ConfigError(f"--student {name}={run_dir}: ',rank=R' needs a ΔW .safetensors file")
    if not folder.is_dir():
        raise PathNotFoundError(f"--student {name}={run_dir}: no such folder or ΔW file")
    recipe = read_run_recipe(folder)
    scheduler = recipe["scheduler"]
    if scheduler["prediction_type"] != recipe["reflow"]["parameterization"]:
        raise ConfigError(
            f"{run_dir}: scheduler prediction_type {scheduler['prediction_type']!r} is not the trained "
            f"parameterization {recipe['reflow']['parameterization']!r}"
        )
    return StudentRun(
        name, run_dir, load_student_unet(folder, teacher), scheduler, scheduler["prediction_type"],
        int(scheduler["num_time_windows"]), float(recipe["reflow"]["guidance_scale"]),
        str(recipe["model"]["pretrained_model_name_or_path"]),
    )  # fmt: skip
