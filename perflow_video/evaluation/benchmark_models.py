"""Random-weight AnimateDiff networks for the benchmarks: full size from the shipped configs, or tiny.

``full``: SD1.5 (UNet, VAE, CLIP text encoder) from ``perflow_video/architectures/sd15`` and the motion
adapter v1-5-2, joined by ``UNetMotionModel.from_unet2d`` as the AnimateDiff family joins them. The text
encoder keeps CLIP ViT-L's shape but the embedded tiny tokenizer's vocabulary (no tokenizer download; the
vocabulary size does not change the cost of anything but the embedding lookup).
``tiny``: the embedded tiny models of :mod:`perflow_video.tiny.tiny_models` (CPU smoke runs).

Weights are created directly on the requested device (``torch.device`` context), so a full-size UNet
is never initialised on the CPU first. Random weights cost what trained ones cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from transformers import CLIPTextConfig, CLIPTextModel

from perflow_video.architectures import component_config
from perflow_video.families.animatediff import with_motion_module_betas
from perflow_video.tiny.tiny_models import tiny_motion_adapter, tiny_text_encoder, tiny_unet, tiny_vae
from perflow_video.tiny.tiny_tokenizer import tiny_tokenizer

ModelSize = Literal["full", "tiny"]
MODEL_SIZES: tuple[str, ...] = ("full", "tiny")
SD15, MOTION_ADAPTER = "sd15", "motion_adapter_v1_5_2"
# Config keys that describe the file, not the architecture.
_NOT_ARCHITECTURE = ("architectures", "model_type", "_name_or_path", "transformers_version")


def _check_size(size: str) -> None:
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {MODEL_SIZES}")


def build_unet_motion(size: ModelSize, device: torch.device | str = "cpu", seed: int = 0) -> UNetMotionModel:
    """SD1.5 UNet + motion adapter v1-5-2 (or their tiny analogues) as one ``UNetMotionModel``, fp32."""
    _check_size(size)
    torch.manual_seed(seed)
    with torch.device(device):
        if size == "tiny":
            unet, adapter = tiny_unet("sd15", seed), tiny_motion_adapter(seed + 1)
        else:
            unet = UNet2DConditionModel.from_config(component_config(SD15, "unet"))
            adapter = MotionAdapter.from_config(component_config(MOTION_ADAPTER))
        return UNetMotionModel.from_unet2d(unet, adapter).eval()


def build_vae(size: ModelSize, device: torch.device | str = "cpu", seed: int = 0) -> AutoencoderKL:
    """SD1.5's ``AutoencoderKL`` (or the tiny one), fp32."""
    _check_size(size)
    torch.manual_seed(seed)
    with torch.device(device):
        if size == "tiny":
            return tiny_vae(seed, "animatediff")
        return AutoencoderKL.from_config(component_config(SD15, "vae")).eval()


def build_text_encoder(size: ModelSize, device: torch.device | str = "cpu", seed: int = 0) -> CLIPTextModel:
    """CLIP ViT-L's text encoder shape (or the tiny one) on the tiny tokenizer's vocabulary, fp32."""
    _check_size(size)
    if size == "tiny":
        return tiny_text_encoder(seed, "animatediff").to(device)
    tokenizer = tiny_tokenizer()
    shape = {k: v for k, v in component_config(SD15, "text_encoder").items() if k not in _NOT_ARCHITECTURE}
    shape.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        return CLIPTextModel(CLIPTextConfig(**shape)).eval()


def teacher_scheduler_config() -> dict:
    """SD1.5's scheduler config with the motion modules' linear betas (what the AnimateDiff family uses)."""
    return with_motion_module_betas(component_config(SD15, "scheduler"))


@dataclass
class PipelineParts:
    """The networks of one AnimateDiff pipeline, in one dtype on one device."""

    unet: UNetMotionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: object


def build_pipeline_parts(size: ModelSize, device: torch.device | str, dtype: torch.dtype) -> PipelineParts:
    """UNet, VAE and text encoder of ``size`` on ``device`` in ``dtype``, with the tiny tokenizer."""
    parts = [build_unet_motion(size, device), build_vae(size, device), build_text_encoder(size, device)]
    for module in parts:
        module.to(dtype=dtype).requires_grad_(False)
    return PipelineParts(*parts, tokenizer_for(size))


def tokenizer_for(size: ModelSize):
    """Both sizes tokenize with the embedded tiny CLIP tokenizer (77 tokens)."""
    _check_size(size)
    return tiny_tokenizer()


def parameter_counts(size: ModelSize) -> dict[str, int]:
    """Parameters of each network of ``size``, counted on the meta device (nothing is allocated)."""
    counts = {}
    for name, build in (
        ("unet_motion", build_unet_motion),
        ("vae", build_vae),
        ("text_encoder", build_text_encoder),
    ):
        module = build(size, "meta")
        counts[name] = sum(p.numel() for p in module.parameters())
        if name == "unet_motion":
            counts["motion_modules"] = sum(
                p.numel() for n, p in module.named_parameters() if "motion_modules" in n
            )
    return counts


__all__ = [
    "MODEL_SIZES",
    "ModelSize",
    "PipelineParts",
    "build_pipeline_parts",
    "build_text_encoder",
    "build_unet_motion",
    "build_vae",
    "parameter_counts",
    "teacher_scheduler_config",
    "tokenizer_for",
]
