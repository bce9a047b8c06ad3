"""Model families behind one interface: ``get_family("animatediff" | "sd15" | "sd21" | "sdxl")``."""

from __future__ import annotations

from perflow_video.families.animatediff import AnimateDiffFamily
from perflow_video.families.base import FamilyModels, FamilySpec, ModelFamily
from perflow_video.families.sdxl import SDXLFamily
from perflow_video.families.stable_diffusion import StableDiffusionFamily

FAMILIES = ("animatediff", "sd15", "sd21", "sdxl")


def get_family(name: str) -> ModelFamily:
    """A fresh family adapter by name (the error lists the valid names)."""
    if name == "animatediff":
        return AnimateDiffFamily()
    if name == "sd15":
        return StableDiffusionFamily("sd15", default_parameterization="diff_eps", default_resolution=512)
    if name == "sd21":
        return StableDiffusionFamily("sd21", default_parameterization="velocity", default_resolution=768)
    if name == "sdxl":
        return SDXLFamily()
    raise ValueError(f"unknown model family {name!r}; choose one of {FAMILIES}")


__all__ = ["FAMILIES", "FamilyModels", "FamilySpec", "ModelFamily", "get_family"]
