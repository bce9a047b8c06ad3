"""The one small interface between the trainer and a model family (docs/method.md §6).

The trainer never asks which family it trains: a family loads teacher and student, says which
weights train, turns a data batch into (clean latents, conditioning) and builds the diffusers pipeline
that samples the student. Image UNets, the SDXL UNet and the AnimateDiff motion UNet differ here only.
"""

from __future__ import annotations

import copy
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor

from perflow_video.method.teacher_solver import Conditioning

TRAINABLE_CHOICES = ("all", "motion", "spatial")


@dataclass
class FamilyModels:
    """Everything a family loaded. Teacher, VAE and text encoders are frozen.

    Attributes:
        teacher / student: UNet-like modules; the student starts as a copy of the teacher.
        vae: AutoencoderKL.
        text_encoders / tokenizers: one (SD) or two (SDXL) each.
        scheduler_config: the teacher's noise-scheduler config (betas, prediction_type).
        base_model: where the teacher came from (for ΔW metadata).
    """

    teacher: torch.nn.Module
    student: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list
    scheduler_config: dict
    base_model: str
    extras: dict = field(default_factory=dict)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.teacher, self.vae, *self.text_encoders]


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


def is_single_file(path: str | None) -> bool:
    """A local checkpoint file (as opposed to a hub id or a diffusers folder)."""
    return (
        path is not None
        and os.path.isfile(path)
        and path.endswith((".safetensors", ".ckpt", ".pt", ".pth", ".bin"))
    )


def missing_weights_error(what: str, where: str, flag: str) -> FileNotFoundError:
    """The error users see when weights are not where the config says."""
    return FileNotFoundError(
        f"could not load the {what} from {where!r}: it is neither a local diffusers folder / checkpoint file "
        f"nor a hub id available offline. Point {flag} at a local folder or file (or log in / download it "
        f"first), e.g. {flag}=/path/to/stable-diffusion-v1-5"
    )


def make_student(teacher: torch.nn.Module) -> torch.nn.Module:
    """The student starts as an exact copy of the teacher (paper Algorithm 1)."""
    student = copy.deepcopy(teacher)
    student.requires_grad_(True)
    return student


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
    """A model family (animatediff, sd15, sd21, sdxl)."""

    name: str
    default_parameterization: str  # docs/method.md §6
    default_resolution: int
    is_video: bool = False

    @abstractmethod
    def load(self, spec: FamilySpec) -> FamilyModels:
        """Load teacher (+ student copy), VAE, text encoder(s) and the teacher's scheduler config."""

    def set_trainable(self, student: torch.nn.Module, trainable: str) -> list[str]:
        """Freeze all but the chosen weights; returns the names of the trainable parameters."""
        if trainable != "all":
            raise ValueError(
                f"{self.name}: trainable={trainable!r} is only for animatediff; image models train 'all'"
            )
        student.requires_grad_(True)
        return [n for n, p in student.named_parameters() if p.requires_grad]

    @abstractmethod
    def encode_text(self, models: FamilyModels, prompts: list[str], device) -> Conditioning:
        """Text conditioning, one row per prompt ("" is the unconditional prompt)."""

    def expand_conditioning(self, cond: Conditioning) -> Conditioning:
        """Per-prompt conditioning -> what the UNet takes (identity; the motion UNet repeats per frame)."""
        return cond

    def encode_prompts(self, models: FamilyModels, prompts: list[str], device) -> Conditioning:
        """The UNet's conditioning for a list of prompts."""
        return self.expand_conditioning(self.encode_text(models, prompts, device))

    @abstractmethod
    def encode_pixels(self, models: FamilyModels, pixel_values: Tensor) -> Tensor:
        """Data batch pixels -> clean latents z_0 (4-D for images, 5-D (B, C, F, h, w) for video)."""

    @abstractmethod
    def pipeline(self, models: FamilyModels, student: torch.nn.Module, scheduler):
        """The family's diffusers pipeline around the student with the given scheduler (for samples)."""

    @abstractmethod
    def save_student(self, student: torch.nn.Module, folder: str) -> None:
        """Write the student in diffusers layout under ``folder``."""
