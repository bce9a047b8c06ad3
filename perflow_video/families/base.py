"""The one small interface between the trainer and a model family (docs/method.md §6).

The trainer never asks which family it trains: a family loads teacher and student, says which
weights train, turns a data batch into (clean latents, conditioning), builds the diffusers pipeline
that samples the student and writes what its users load (samples, ΔW layouts, extra weight files).
Image UNets, the SDXL UNet and the AnimateDiff motion UNet differ here only.
"""

from __future__ import annotations

import copy
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import Tensor

from perflow_video.errors import WeightsNotFoundError
from perflow_video.family_names import FamilyName
from perflow_video.method.teacher_solver import Conditioning
from perflow_video.weights.delta_weights import DeltaMetadata
from perflow_video.weights.lora_adapter import add_lora, attention_projections, is_adapter_parameter

#: ``model.trainable``: which student weights train (``motion`` / ``spatial`` only where there are motion modules;
#: ``lora``: LoRA adapters on the teacher network itself, which with them disabled is the teacher).
Trainable = Literal["motion", "spatial", "all", "lora"]
#: ``model.lora_targets``: the attention projections a LoRA adapts (``motion`` / ``both`` where there are motion
#: modules; ``spatial``: those of the image UNet, ``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0``).
LoraTargets = Literal["motion", "spatial", "both"]
#: ``model.init``: load the weights, or build the real architecture (``perflow_video/architectures``) with random
#: weights, offline (benchmarks, memory plans, smoke tests on the real shapes).
ModelInit = Literal["pretrained", "random"]
MODEL_INITS: tuple[str, ...] = get_args(ModelInit)
#: The student attribute naming the parameters it shares with the teacher (the very same Parameter objects).
SHARED_WITH_TEACHER = "perflow_shared_with_teacher"
#: What a family trains on: video clips (F, 3, H, W) or captioned images (3, H, W).
DataKind = Literal["clips", "images"]
#: The ΔW metadata of one file, given the key layout it is written in (built by the trainer from its config).
MetadataFor = Callable[[str], DeltaMetadata]


@dataclass
class FamilyModels:
    """Everything a family loaded. Teacher, VAE and text encoders are frozen.

    Attributes:
        teacher / student: UNet-like modules; the student starts as a copy of the teacher (a LoRA student
            is the teacher module itself with adapters, which the teacher's calls disable).
        vae: AutoencoderKL.
        text_encoders / tokenizers: one (SD) or two (SDXL) each.
        scheduler_config: the teacher's noise-scheduler config (betas, prediction_type).
        base_model: where the teacher came from (for ΔW metadata).
        resolution: square pixel size the models train and sample at (SDXL's time_ids carry it).
        num_frames: frames per clip of a video family (the UNet takes one embedding per frame); None for images.
        motion_adapter: where the motion modules came from (video families), else None.
    """

    teacher: torch.nn.Module
    student: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list
    scheduler_config: dict
    base_model: str
    resolution: int
    num_frames: int | None = None
    motion_adapter: str | None = None

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.teacher, self.vae, *self.text_encoders]

    def delta_base(self) -> str:
        """What ΔW is taken against, for its metadata: the base model (+ the motion adapter)."""
        return self.base_model + (f" + {self.motion_adapter}" if self.motion_adapter else "")


@dataclass(frozen=True)
class LoraSpec:
    """The adapters of a LoRA student (``model.lora_rank`` / ``lora_alpha`` / ``lora_targets``)."""

    rank: int  # r
    alpha: float  # the scale is alpha / r
    targets: LoraTargets


@dataclass
class FamilySpec:
    """What a family needs from the model config (a subset of the trainer's ModelConfig)."""

    pretrained_model_name_or_path: str
    motion_adapter: str | None
    single_file_config: str | None
    revision: str | None
    variant: str | None
    resolution: int
    num_frames: int
    motion_adapter_config: str | None = None  # config of an original motion-module file (animatediff)
    init: ModelInit = "pretrained"  # random: the shipped architecture of the family, random weights
    # What the student will train: its other weights are the teacher's own Parameter objects (one copy in
    # memory). None: the student is a full, independent copy (what callers that retrain it freely want).
    student_trainable: Trainable | None = None
    lora: LoraSpec | None = None  # the adapters when student_trainable is "lora"


def is_single_file(path: str | None) -> bool:
    """A local checkpoint file (as opposed to a hub id or a diffusers folder)."""
    return (
        path is not None
        and os.path.isfile(path)
        and path.endswith((".safetensors", ".ckpt", ".pt", ".pth", ".bin"))
    )


def missing_weights_error(what: str, where: str, flag: str) -> WeightsNotFoundError:
    """The error users see when weights are not where the config says."""
    return WeightsNotFoundError(
        f"could not load the {what} from {where!r}: it is neither a local diffusers folder / checkpoint file "
        f"nor a hub id available offline. Point {flag} at a local folder or file (or log in / download it "
        f"first), e.g. {flag}=/path/to/a/diffusers/folder"
    )


def make_student(teacher: torch.nn.Module, shared: Iterable[str] = ()) -> torch.nn.Module:
    """The student starts as an exact copy of the teacher (paper Algorithm 1).

    The teacher parameters named in ``shared`` (the frozen ones) are not copied: the student holds the very
    same Parameter objects, so they exist once in memory and stay bit-identical. They keep
    ``requires_grad=False``; the student records their names (``SHARED_WITH_TEACHER``) so that
    ``ModelFamily.set_trainable`` refuses to train them (an update would change the teacher).
    """
    by_name = dict(teacher.named_parameters())
    names = frozenset(shared)
    memo = {id(by_name[name]): by_name[name] for name in names}  # deepcopy returns these objects as they are
    student = copy.deepcopy(teacher, memo)
    for name, param in student.named_parameters():
        if name not in names:
            param.requires_grad_(True)
    setattr(student, SHARED_WITH_TEACHER, names)
    return student


def shared_with_teacher(student: torch.nn.Module) -> frozenset[str]:
    """The names of the student parameters that are the teacher's own objects (empty for a full copy)."""
    return getattr(student, SHARED_WITH_TEACHER, frozenset())


def tokenize(tokenizer, prompts: list[str], device) -> Tensor:
    """CLIP token ids padded / truncated to the tokenizer's 77 tokens, as the SD pipelines do. (B, 77)."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


def encode_clip_prompts(text_encoder, tokenizer, prompts: list[str], device) -> Tensor:
    """SD 1.x / 2.x text conditioning: last hidden state of CLIP, (B, 77, dim)."""
    return text_encoder(tokenize(tokenizer, prompts, device))[0]


@torch.no_grad()
def encode_pixels_to_latents(vae, pixels: Tensor, chunk: int = 16) -> Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, 4, H/8, W/8) posterior-mean latents times the VAE scaling factor."""
    dtype = next(vae.parameters()).dtype
    # The posterior mean, not a sample: deterministic, so runs split over processes draw nothing extra.
    parts = [vae.encode(p.to(dtype)).latent_dist.mode() for p in pixels.split(chunk)]
    return torch.cat(parts) * vae.config.scaling_factor


class ModelFamily(ABC):
    """A model family (animatediff, sd15, sd21, sdxl). The defaults here are those of the image families.

    Adapters hold no state: what a load found (resolution, frames, motion adapter) is in its FamilyModels.
    """

    name: FamilyName
    default_parameterization: str  # docs/method.md §6
    default_resolution: int  # pixels, square
    default_trainable: Trainable  # model.trainable when the config says nothing
    trainable_choices: tuple[Trainable, ...]  # the values model.trainable may take for this family
    lora_target_choices: tuple[LoraTargets, ...] = ("spatial",)  # model.lora_targets' values here
    default_lora_targets: LoraTargets = "spatial"
    data_kind: DataKind = "images"
    delta_layout: str = "diffusers_unet"  # key layout of delta_weights.safetensors (delta_weights.LAYOUTS)

    @abstractmethod
    def load(self, spec: FamilySpec) -> FamilyModels:
        """Load teacher (+ student copy), VAE, text encoder(s) and the teacher's scheduler config.

        ``spec.init == "random"`` builds the family's real architecture with random weights instead
        (:meth:`random_models` on ``families.loading.shipped_configs``); ``spec.student_trainable`` makes
        the student share the teacher's frozen weights (:meth:`student_of`).
        """

    @abstractmethod
    def random_models(self, spec: FamilySpec, configs) -> FamilyModels:
        """What :meth:`load` returns, built from the component configs ``configs`` (a
        ``families.loading.ComponentConfigs``) with random weights (seeded: every call builds the same
        weights); on the meta device under ``accelerate.init_empty_weights`` (memory plans)."""

    def student_of(self, teacher: torch.nn.Module, spec: FamilySpec) -> torch.nn.Module:
        """The student of ``teacher`` for ``spec.student_trainable``: a copy of the weights that train, sharing
        the others with the teacher (None: a full copy); ``lora``: the teacher itself with adapters."""
        trainable = spec.student_trainable
        if trainable is None:
            return make_student(teacher)
        if trainable == "lora":
            return self.lora_student(teacher, spec.lora)
        frozen = [n for n, _ in teacher.named_parameters() if not self.trains(n, trainable)]
        return make_student(teacher, frozen)

    def lora_student(self, teacher: torch.nn.Module, lora: LoraSpec | None) -> torch.nn.Module:
        """``teacher`` with LoRA adapters on the projections of ``lora.targets`` (:meth:`lora_modules`): every
        base weight is shared (it is the same module), only the adapters are its own."""
        if lora is None:
            raise ValueError(
                "FamilySpec.student_trainable='lora' needs FamilySpec.lora (rank, alpha, targets)"
            )
        add_lora(teacher, self.lora_modules(teacher, lora.targets), lora.rank, lora.alpha)
        names = frozenset(n for n, _ in teacher.named_parameters() if not is_adapter_parameter(n))
        setattr(teacher, SHARED_WITH_TEACHER, names)
        return teacher

    def lora_modules(self, model: torch.nn.Module, targets: str) -> list[str]:
        """The attention projections a LoRA on ``targets`` adapts (:meth:`in_part` of them)."""
        if targets not in self.lora_target_choices:
            raise ValueError(
                f"model.lora_targets={targets!r} for {self.name}; choose one of {self.lora_target_choices}"
            )
        return attention_projections(model, lambda name: self.in_part(name, targets))

    def set_trainable(self, student: torch.nn.Module, trainable: str) -> list[str]:
        """Freeze all but the chosen weights; returns the names of the trainable parameters."""
        if trainable not in self.trainable_choices:
            raise ValueError(
                f"model.trainable={trainable!r} for {self.name}; choose one of {self.trainable_choices}"
            )
        shared = shared_with_teacher(student)
        clash = [n for n, _ in student.named_parameters() if n in shared and self.trains(n, trainable)]
        if clash:
            raise ValueError(
                f"model.trainable={trainable!r} would train {len(clash)} tensors ({clash[0]}, ...) that this "
                "student shares with the teacher; build the student for this choice (FamilySpec.student_trainable)"
            )
        names = [n for n, _ in student.named_parameters() if self.trains(n, trainable)]
        if not names:  # e.g. lora on a student built without adapters
            raise ValueError(
                f"model.trainable={trainable!r} trains nothing in this student; build the student for this "
                "choice (FamilySpec.student_trainable)"
            )
        chosen = set(names)
        for name, param in student.named_parameters():
            param.requires_grad_(name in chosen)
        return names

    def trains(self, parameter_name: str, trainable: str) -> bool:
        """Whether the student parameter ``parameter_name`` trains under ``model.trainable`` (``lora``: the
        adapters only; else the part of the network it names, :meth:`in_part`)."""
        if trainable == "lora":
            return is_adapter_parameter(parameter_name)
        return self.in_part(parameter_name, trainable)

    def in_part(self, name: str, part: str) -> bool:
        """Whether the parameter / module ``name`` lies in ``part`` (motion | spatial | all | both) of the
        network. Image families: the whole UNet is spatial."""
        return True

    @abstractmethod
    def encode_text(self, models: FamilyModels, prompts: list[str], device) -> Conditioning:
        """Text conditioning, one row per prompt ("" is the unconditional prompt)."""

    def expand_conditioning(self, models: FamilyModels, cond: Conditioning) -> Conditioning:
        """Per-prompt conditioning -> what the UNet takes (identity; the motion UNet repeats per frame)."""
        return cond

    def encode_prompts(self, models: FamilyModels, prompts: list[str], device) -> Conditioning:
        """The UNet's conditioning for a list of prompts."""
        return self.expand_conditioning(models, self.encode_text(models, prompts, device))

    @abstractmethod
    def encode_pixels(self, models: FamilyModels, pixel_values: Tensor) -> Tensor:
        """Data batch pixels -> clean latents z_0 (4-D for images, 5-D (B, C, F, h, w) for video)."""

    @abstractmethod
    def pipeline(self, models: FamilyModels, student: torch.nn.Module, scheduler):
        """The family's diffusers pipeline around the student with the given scheduler (for samples)."""

    def write_sample(self, models: FamilyModels, pipe, request: dict, stem: Path, video_format: str) -> Path:
        """Sample one prompt with ``pipe(**request)`` and write it next to ``stem``; returns the file.

        Images: ``<stem>.png`` (``video_format`` is for video families).
        """
        image = pipe(**request, output_type="pil").images[0]
        path = stem.parent / f"{stem.name}.png"
        image.save(path)
        return path

    @abstractmethod
    def save_student(self, student: torch.nn.Module, folder: str) -> None:
        """Write the student in diffusers layout under ``folder``."""

    def write_extra_outputs(
        self, student: torch.nn.Module, delta: dict[str, Tensor], out: Path, metadata_for: MetadataFor
    ) -> dict[str, Path]:
        """Files beyond the student, its scheduler and ``delta_weights.safetensors`` that this family's
        users load (e.g. other ΔW layouts); returns {name: path}. Image families: none."""
        return {}
