"""The component configs of the real models the recipes name: architecture facts only, no weights.

Each folder mirrors the diffusers layout of the hub repository it describes, so a builder can create
the real architecture with random weights offline (benchmarks, memory plans, smoke tests on the real
shapes). A user with weights never needs these.

| folder | hub repository |
|---|---|
| ``sd15/`` (unet, vae, text_encoder, scheduler) | stable-diffusion-v1-5/stable-diffusion-v1-5 |
| ``sd21/`` | stabilityai/stable-diffusion-2-1 (768, v_prediction) |
| ``sdxl/`` (unet, vae, text_encoder, text_encoder_2, scheduler) | stabilityai/stable-diffusion-xl-base-1.0 |
| ``motion_adapter_v1_5/`` | guoyww/animatediff-motion-adapter-v1-5 (v1: 24 positions, no mid block) |
| ``motion_adapter_v1_5_2/`` | guoyww/animatediff-motion-adapter-v1-5-2 (v2: 32 positions, mid block) |
| ``motion_adapter_v1_5_3/`` | guoyww/animatediff-motion-adapter-v1-5-3 (v3: 32 positions, no mid block) |
"""

from __future__ import annotations

import json
from pathlib import Path

ARCHITECTURES_DIR = Path(__file__).resolve().parent
ARCHITECTURES: tuple[str, ...] = tuple(
    sorted(p.name for p in ARCHITECTURES_DIR.iterdir() if p.is_dir() and not p.name.startswith("_"))
)


def architecture_dir(name: str) -> Path:
    """The folder of one architecture (``sd15``, ``motion_adapter_v1_5_2``, ...); the error lists them."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {ARCHITECTURES}")
    return ARCHITECTURES_DIR / name


def component_config(name: str, component: str | None = None) -> dict:
    """The config dict of one component (``component=None`` for single-component folders like adapters)."""
    root = architecture_dir(name)
    folder = root / (component or "")
    for file_name in ("config.json", "scheduler_config.json"):
        if (folder / file_name).is_file():
            return json.loads((folder / file_name).read_text())
    components = sorted(p.name for p in root.iterdir() if p.is_dir())
    raise FileNotFoundError(f"{folder}: no config.json (components of {name}: {components or 'none'})")
