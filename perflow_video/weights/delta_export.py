"""One entry point for every file a ΔW is shipped as (docs/method.md §8, README "Use ΔW elsewhere").

==========================  =====================================================  ==========================
format                      what it is                                             who loads it
==========================  =====================================================  ==========================
``diffusers``               ΔW in diffusers key names (spatial + motion), exact    ``apply_delta_weights``
``motion_original``         motion ΔW in the original AnimateDiff layout, exact    ``apply_delta_weights``
``lora_peft``               spatial ΔW as a LoRA (truncated SVD), PEFT keys        ``pipe.load_lora_weights``
``lora_kohya``              spatial ΔW as a kohya LoRA (``lora_unet_*``)           ComfyUI LoraLoader, A1111
``diff_patches``            spatial ΔW as exact kohya-named ``.diff`` patches      ComfyUI LoraLoader, A1111
``motion_lora_diffusers``   motion attention ΔW as a LoRA, diffusers keys          ``AnimateDiffPipeline.load_lora_weights``
``motion_lora_comfyui``     the same in ComfyUI-AnimateDiff-Evolved's layout       AnimateDiff-Evolved motion LoRA
==========================  =====================================================  ==========================

The LoRA formats need ``rank`` (a cap per layer) and/or ``energy`` (keep the fewest singular values
holding that share of each layer's squared norm); the exact formats ignore both.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal, get_args

import torch

from perflow_video.errors import ConfigError
from perflow_video.weights.delta_weights import (
    DeltaMetadata,
    delta_to_layout,
    is_motion_key,
    save_delta_weights,
)
from perflow_video.weights.lora_export import export_diff_patches, export_lora_kohya, export_lora_peft
from perflow_video.weights.motion_lora import export_motion_lora

__all__ = [
    "DELTA_FORMATS",
    "EXTRA_FORMATS",
    "FILENAMES",
    "DeltaFormat",
    "applicable_formats",
    "export_all",
    "export_delta",
]

DeltaFormat = Literal[
    "diffusers",
    "motion_original",
    "lora_peft",
    "lora_kohya",
    "diff_patches",
    "motion_lora_diffusers",
    "motion_lora_comfyui",
]
DELTA_FORMATS: tuple[str, ...] = get_args(DeltaFormat)

#: The file name each format gets in a run folder (and from ``scripts/export_delta.py``).
FILENAMES: dict[str, str] = {
    "diffusers": "delta_weights.safetensors",
    "motion_original": "delta_weights_motion_original.safetensors",
    "lora_peft": "perflow_lora.safetensors",
    "lora_kohya": "perflow_lora_kohya.safetensors",
    "diff_patches": "perflow_delta_full_kohya.safetensors",
    "motion_lora_diffusers": "perflow_motion_lora.safetensors",
    "motion_lora_comfyui": "perflow_motion_lora_comfyui.safetensors",
}
#: What a training run writes besides its ΔW files (``run.export_formats``' default).
EXTRA_FORMATS = ("lora_peft", "lora_kohya", "diff_patches", "motion_lora_diffusers", "motion_lora_comfyui")
_SPATIAL_FORMATS = ("lora_peft", "lora_kohya", "diff_patches")
_MOTION_FORMATS = ("motion_original", "motion_lora_diffusers", "motion_lora_comfyui")
_NEEDS_METADATA = ("diffusers", "motion_original")
_LAYOUT_OF = {"motion_original": "animatediff_original"}


def applicable_formats(delta: Mapping[str, torch.Tensor]) -> list[str]:
    """The formats this ΔW can be written in: spatial ones need spatial keys, motion ones motion keys."""
    has_motion = any(is_motion_key(k) for k in delta)
    has_spatial = any(not is_motion_key(k) for k in delta)
    return [
        f
        for f in DELTA_FORMATS
        if f == "diffusers"
        or (f in _MOTION_FORMATS and has_motion)
        or (f in _SPATIAL_FORMATS and has_spatial)
    ]


def _check_format(delta: Mapping[str, torch.Tensor], fmt: str) -> None:
    if fmt not in DELTA_FORMATS:
        raise ConfigError(f"unknown ΔW format {fmt!r}; choose one of {', '.join(DELTA_FORMATS)}")
    if fmt not in applicable_formats(delta):
        part = "motion-module" if fmt in _MOTION_FORMATS else "spatial (UNet)"
        raise ConfigError(f"format {fmt!r} needs {part} keys, and this ΔW has none")


def export_delta(
    delta: Mapping[str, torch.Tensor],
    format: DeltaFormat,  # noqa: A002 - the name users read in the docs
    path: str | os.PathLike[str],
    rank: int | None = None,
    energy: float | None = None,
    metadata: DeltaMetadata | None = None,
) -> Path:
    """Write ``delta`` (diffusers key names, as ``compute_delta_weights`` returns it) as ``format``.

    Args:
        rank / energy: the LoRA formats' rank choice (at least one of them); ignored by exact formats.
        metadata: required by ``diffusers`` / ``motion_original`` (the ΔW files carry the recipe);
            its ``layout`` is set to the file's.
    Raises:
        ConfigError: unknown format, a format this ΔW has no keys for, missing metadata, bad rank/energy.
    """
    _check_format(delta, format)
    path = Path(path)
    if format in _NEEDS_METADATA:
        if metadata is None:
            raise ConfigError(f"format {format!r} needs the ΔW metadata (family, parameterization, K)")
        layout = _LAYOUT_OF.get(format, metadata.layout)
        meta = DeltaMetadata(**{**vars(metadata), "layout": layout})
        save_delta_weights(delta_to_layout(delta, layout), path, meta)
    elif format == "lora_peft":
        export_lora_peft(delta, path, rank, energy)
    elif format == "lora_kohya":
        export_lora_kohya(delta, path, rank, energy)
    elif format == "diff_patches":
        export_diff_patches(delta, path)
    elif format == "motion_lora_diffusers":
        export_motion_lora(delta, diffusers_path=path, rank=rank, energy=energy)
    else:
        export_motion_lora(delta, comfyui_path=path, rank=rank, energy=energy)
    return path


def export_all(
    delta: Mapping[str, torch.Tensor],
    folder: str | os.PathLike[str],
    metadata_for: Callable[[str], DeltaMetadata],
    rank: int | None = 64,
    energy: float | None = None,
    formats: tuple[str, ...] | None = None,
    diffusers_layout: str = "diffusers_unet_motion",
) -> dict[str, Path]:
    """Every applicable format (or ``formats``) into ``folder`` under :data:`FILENAMES`; no LoRA files
    when ``rank`` and ``energy`` are both None. ``metadata_for(layout)`` gives the ΔW files' metadata;
    ``diffusers_layout`` is the layout of the ``diffusers`` file (the family's ``delta_layout``)."""
    chosen = tuple(applicable_formats(delta)) if formats is None else formats
    lora = rank is not None or energy is not None
    written = {}
    for fmt in chosen:
        if "lora" in fmt and not lora:
            continue
        layout = _LAYOUT_OF.get(fmt, diffusers_layout)
        meta = metadata_for(layout) if fmt in _NEEDS_METADATA else None
        written[fmt] = export_delta(delta, fmt, Path(folder) / FILENAMES[fmt], rank, energy, meta)
    return written
