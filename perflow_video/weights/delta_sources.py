"""Reading a ΔW from wherever it comes: our files, the official PeRFlow release, or a merged checkpoint.

* a ``.safetensors`` ΔW file: ours (with metadata), the release's flat ``delta_weights.safetensors``, or an
  original-layout motion ΔW (converted when applied);
* a diffusers UNet folder *of differences*, as the official PeRFlow SD1.5 release ships it (``unet/`` with
  ``diffusion_pytorch_model.safetensors``, or the weight variant ``diffusion_pytorch_model.v0-1.safetensors``),
  or a model folder holding such a ``unet/``;
* a merged (accelerated) checkpoint together with its base: ΔW = merged - base, key by key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from perflow_video.errors import ConfigError, PathNotFoundError
from perflow_video.weights.delta_weights import DeltaMetadata, compute_delta_weights, load_delta_weights

__all__ = ["delta_from_merged", "read_delta", "unet_weights_file"]

_UNET_FILE = "diffusion_pytorch_model"


def unet_weights_file(folder: str | os.PathLike[str], variant: str | None = None) -> Path:
    """The UNet weights file of a diffusers UNet folder (or of a model folder's ``unet/``).

    ``variant`` picks ``diffusion_pytorch_model.<variant>.safetensors``; without it the plain file, else the
    only variant present (the official PeRFlow ΔW is the variant ``v0-1``).
    """
    folder = Path(folder)
    if (folder / "unet").is_dir():
        folder = folder / "unet"
    names = [f"{_UNET_FILE}.{variant}.safetensors"] if variant else [f"{_UNET_FILE}.safetensors"]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    variants = sorted(folder.glob(f"{_UNET_FILE}.*.safetensors"))
    if not variant and len(variants) == 1:
        return variants[0]
    found = ", ".join(p.name for p in variants) or "no diffusion_pytorch_model*.safetensors"
    raise PathNotFoundError(f"{folder}: no {names[0]} (found: {found}); pass the variant that holds ΔW")


def read_delta(
    source: str | os.PathLike[str], variant: str | None = None
) -> tuple[dict[str, torch.Tensor], DeltaMetadata | None]:
    """A ΔW file or a UNet folder of differences -> (ΔW in float32, its metadata or None)."""
    path = Path(source)
    if not path.exists():
        raise PathNotFoundError(f"ΔW not found: {path}")
    if path.is_dir():
        path = unet_weights_file(path, variant)
    if path.suffix != ".safetensors":
        raise ConfigError(f"{path}: a ΔW must be a .safetensors file or a diffusers UNet folder")
    delta, meta = load_delta_weights(path)
    return {k: v.float() for k, v in delta.items()}, meta


def delta_from_merged(
    merged: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], atol: float = 0.0
) -> dict[str, torch.Tensor]:
    """ΔW = merged - base over their common keys, leaving out keys that did not change (|d| <= ``atol``).

    Raises:
        ConfigError: the two share no key, or a shared key differs in shape (another model family).
    """
    common = [k for k in merged if k in base]
    if not common:
        raise ConfigError("the merged checkpoint and the base share no weight name: not the same model")
    for k in common:
        if merged[k].shape != base[k].shape:
            raise ConfigError(
                f"{k!r}: merged {tuple(merged[k].shape)} vs base {tuple(base[k].shape)}: not the same model"
            )
    delta = compute_delta_weights(merged, base, common)
    return {k: v for k, v in delta.items() if float(v.abs().max()) > atol}


def read_state(source: str | os.PathLike[str], variant: str | None = None) -> dict[str, torch.Tensor]:
    """The UNet weights of a diffusers folder / UNet folder / ``.safetensors`` file (for :func:`delta_from_merged`)."""
    path = Path(source)
    if not path.exists():
        raise PathNotFoundError(f"not found: {path}")
    return load_file(unet_weights_file(path, variant) if path.is_dir() else path)
