"""Model families behind one interface: ``get_family("animatediff" | "sd15" | "sd21" | "sdxl")``."""

from __future__ import annotations

from perflow_video.families.animatediff import AnimateDiffFamily
from perflow_video.families.base import (
    MODEL_INITS,
    DataKind,
    FamilyModels,
    FamilySpec,
    LoraSpec,
    LoraTargets,
    ModelFamily,
    ModelInit,
    Trainable,
)
from perflow_video.families.sdxl import SDXLFamily
from perflow_video.families.stable_diffusion import StableDiffusionFamily
from perflow_video.family_names import FAMILY_NAMES, FamilyName

#: One adapter per family name (adapters hold no state, so one instance serves every caller).
ADAPTERS: dict[FamilyName, ModelFamily] = {
    "animatediff": AnimateDiffFamily(),
    "sd15": StableDiffusionFamily("sd15", default_parameterization="diff_eps", default_resolution=512),
    "sd21": StableDiffusionFamily("sd21", default_parameterization="velocity", default_resolution=768),
    "sdxl": SDXLFamily(),
}


def get_family(name: str) -> ModelFamily:
    """The family adapter by name (the error lists the valid names)."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; choose one of {FAMILY_NAMES}") from None


__all__ = [
    "ADAPTERS",
    "FAMILY_NAMES",
    "MODEL_INITS",
    "DataKind",
    "FamilyModels",
    "FamilyName",
    "FamilySpec",
    "LoraSpec",
    "LoraTargets",
    "ModelFamily",
    "ModelInit",
    "Trainable",
    "get_family",
]
