"""Tiny embedded defaults: real diffusers / transformers models shrunk so everything runs on a CPU.

Every builder here returns a *real* class (``CLIPTokenizer``, ``CLIPTextModel``, ``AutoencoderKL``,
``UNet2DConditionModel``, ``MotionAdapter``, ``UNetMotionModel``, ``DDIMScheduler`` and the diffusers
pipelines) with a tiny configuration and a seeded, deterministic random initialisation. Nothing is mocked:
the same code paths that run with Stable Diffusion 1.5 / 2.1 / XL and AnimateDiff run here, only smaller.

The shapes mirror the real models where it matters to the rest of the toolkit:

* 4 latent channels and a VAE with 4 blocks, i.e. the spatial downsampling factor 8 of real SD;
* CLIP's 77-token context, ``<|startoftext|>`` / ``<|endoftext|>`` and padding with ``<|endoftext|>``;
* SD2.1: linear projections in the transformers, a constant head size and ``v_prediction``;
* SDXL: two text encoders whose hidden states are concatenated (cross-attention dim = 32 + 32), a pooled
  projection and the ``text_time`` added conditioning (pooled dim + 6 * ``addition_time_embed_dim``);
* AnimateDiff: an SD1.5 UNet plus a ``MotionAdapter`` with matching ``block_out_channels``.

Seeds: a component built on its own uses exactly the ``seed`` it is given. A pipeline (``tiny_pipeline``,
``save_tiny_model``) built with ``seed`` gives its components ``seed + SEED_OFFSETS[name]`` so that, e.g.,
the two text encoders of SDXL are not initialised identically. ``tiny_unet_motion(seed)`` follows the pipeline
convention, so it equals ``tiny_pipeline("animatediff", seed).unet``. Building never touches the global RNG.

Folder layout written by :func:`save_tiny_model` (diffusers format, safetensors):

* ``sd15`` / ``sd21``: a ``StableDiffusionPipeline`` folder (no safety checker);
* ``sdxl``: a ``StableDiffusionXLPipeline`` folder (``text_encoder_2/``, ``tokenizer_2/``);
* ``animatediff``: the SD1.5 folder (plain ``UNet2DConditionModel`` in ``unet/``; ``scheduler/`` holds
  AnimateDiff's linear-beta DDIM schedule) plus ``motion_adapter/`` written by
  ``MotionAdapter.save_pretrained`` - mirroring how users hold ``runwayml/stable-diffusion-v1-5`` +
  ``guoyww/animatediff-motion-adapter-v1-5-2``.
  ``motion_adapter/`` is not listed in ``model_index.json``; load it explicitly::

      adapter = MotionAdapter.from_pretrained(folder / "motion_adapter")
      pipe = AnimateDiffPipeline.from_pretrained(folder, motion_adapter=adapter)

The tokenizer is :mod:`perflow_video.tiny.tiny_tokenizer`'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AnimateDiffPipeline,
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    MotionAdapter,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNetMotionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from perflow_video.family_names import FAMILY_NAMES, FamilyName
from perflow_video.tiny.tiny_tokenizer import tiny_tokenizer

__all__ = [
    "FAMILIES",
    "SEED_OFFSETS",
    "save_tiny_model",
    "tiny_components",
    "tiny_motion_adapter",
    "tiny_pipeline",
    "tiny_scheduler",
    "tiny_text_encoder",
    "tiny_text_encoder_2",
    "tiny_unet",
    "tiny_unet_motion",
    "tiny_vae",
]

#: Model families with a tiny default. ``animatediff`` = SD1.5 + motion adapter.
FAMILIES: tuple[str, ...] = FAMILY_NAMES  # every family has a tiny model

#: Seed offset of each pipeline component relative to the pipeline seed.
SEED_OFFSETS: dict[str, int] = {
    "unet": 0,
    "vae": 1,
    "text_encoder": 2,
    "text_encoder_2": 3,
    "motion_adapter": 4,
}

# ----------------------------------------------------------------------------------------------------------
# Model builders
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG for the duration of a model construction, restoring the global state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _check_family(family: str, allowed: Iterable[str] = FAMILIES) -> None:
    allowed = tuple(allowed)
    if family not in allowed:
        raise ValueError(f"unknown family {family!r}; expected one of {allowed}")


# Text encoders: 32 hidden units (divisible by 4 heads), 2 layers so SDXL's "penultimate hidden state" is a
# real intermediate layer, CLIP's 77 positions. hidden_act mirrors the real encoders: OpenAI CLIP ViT-L uses
# quick_gelu (SD1.5, SDXL's first encoder), OpenCLIP ViT-H/bigG uses gelu (SD2.1, SDXL's second encoder).
TEXT_ENCODER_CONFIG: dict = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
}
_TEXT_ENCODER_ACT = {"sd15": "quick_gelu", "sd21": "gelu", "sdxl": "quick_gelu", "animatediff": "quick_gelu"}
#: SDXL's second encoder: pooled projection of 32 (real: 1280) feeds the UNet's ``text_time`` embedding.
TEXT_ENCODER_2_PROJECTION_DIM = 32


def _text_config(tokenizer: CLIPTokenizer, hidden_act: str, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        **TEXT_ENCODER_CONFIG,
        vocab_size=len(tokenizer),
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # pooled output is taken at the first EOS
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def tiny_text_encoder(seed: int = 0, family: str = "sd15") -> CLIPTextModel:
    """Tiny ``CLIPTextModel`` (hidden 32, 2 layers, vocab = the tiny tokenizer's).

    Args:
        seed: Seed of the random initialisation.
        family: ``"sd15"``, ``"sd21"``, ``"sdxl"`` or ``"animatediff"``; only selects the activation.

    Returns:
        The model in eval mode, as ``from_pretrained`` would return it.
    """
    _check_family(family)
    config = _text_config(tiny_tokenizer(), _TEXT_ENCODER_ACT[family])
    with _seeded(seed):
        return CLIPTextModel(config).eval()


def tiny_text_encoder_2(seed: int = 0) -> CLIPTextModelWithProjection:
    """Tiny ``CLIPTextModelWithProjection``: SDXL's second text encoder (hidden 32, projection 32).

    Args:
        seed: Seed of the random initialisation.

    Returns:
        The model in eval mode.
    """
    config = _text_config(tiny_tokenizer(), "gelu", projection_dim=TEXT_ENCODER_2_PROJECTION_DIM)
    with _seeded(seed):
        return CLIPTextModelWithProjection(config).eval()


# VAE: 4 blocks -> 3 downsamplings -> factor 8 and 4 latent channels exactly like SD's VAE (128-512 channels,
# 2 layers per block); 8/16 channels with 4 norm groups is about the smallest that GroupNorm allows.
VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 8, 16, 16),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 64,  # only used for tiling; analogous to 512 of SD
}
# The real factors (SD1.x/2.x 0.18215, SDXL 0.13025) are 1 / std of the real VAEs' latents, so that data
# and noise have the same scale. The tiny random VAE's latents of the toy data have std ~0.27; with SD's
# factor the data would be a near-point mass beside unit noise and every teacher trajectory straight.
TINY_LATENT_STD = 0.27
# Bump when the tiny models change, so cached copies (families/loading.py) are rebuilt.
TINY_MODELS_VERSION = 2
_VAE_SCALING = {family: round(1.0 / TINY_LATENT_STD, 3) for family in FAMILY_NAMES}


def tiny_vae(seed: int = 0, family: str = "sd15") -> AutoencoderKL:
    """Tiny ``AutoencoderKL`` with SD's downsampling factor 8 and 4 latent channels.

    Args:
        seed: Seed of the random initialisation.
        family: Kept for symmetry; every tiny VAE scales latents to unit variance (``TINY_LATENT_STD``).

    Returns:
        The model in eval mode.
    """
    _check_family(family)
    with _seeded(seed):
        return AutoencoderKL(**VAE_CONFIG, scaling_factor=_VAE_SCALING[family]).eval()


# UNets: 2 resolution levels of 32/64 channels with 1 resnet per block (real: 4 levels of 320-1280 channels,
# 2 per block), 8 norm groups (4 channels per group; real: 32 groups of 10-40). This is the smallest UNet
# with both a cross-attention level and a downsampling; ~0.8 M parameters.
_UNET_COMMON: dict = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "norm_num_groups": 8,
}
UNET_CONFIGS: dict[str, dict] = {
    # SD1.5: attention at the high resolution level; a constant *number* of heads (diffusers' historical
    # ``attention_head_dim`` = heads). 2 heads keep the video forward near 0.04 s on 2 CPU cores.
    # sample_size 8 latents = 64 px, the analogue of 512 px.
    "sd15": {
        **_UNET_COMMON,
        "sample_size": 8,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,  # = text encoder hidden size
        "attention_head_dim": 2,
    },
    # SD2.1 (768-v): linear projections in the transformers, a constant head *size* (16; real: 64) so the
    # number of heads grows with the width, upcast attention; 12 latents = 96 px, the analogue of 768 px.
    "sd21": {
        **_UNET_COMMON,
        "sample_size": 12,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "upcast_attention": True,
    },
    # SDXL: no attention at the highest resolution, more transformer layers deeper down, linear projections,
    # cross-attention on both encoders' hidden states concatenated (32 + 32), and the ``text_time`` added
    # embedding fed with the pooled projection (32) + 6 size/crop ids of 8 dims each = 80.
    # 16 latents = 128 px, the analogue of 1024 px.
    "sdxl": {
        **_UNET_COMMON,
        "sample_size": 16,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": TEXT_ENCODER_CONFIG["hidden_size"] * 2,
        "transformer_layers_per_block": (1, 2),
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": TEXT_ENCODER_2_PROJECTION_DIM + 6 * 8,
    },
}
UNET_CONFIGS["animatediff"] = UNET_CONFIGS["sd15"]


def tiny_unet(family: str = "sd15", seed: int = 0) -> UNet2DConditionModel:
    """Tiny ``UNet2DConditionModel`` shaped like the given family's UNet.

    Args:
        family: ``"sd15"``, ``"sd21"``, ``"sdxl"`` (``"animatediff"`` = ``"sd15"``).
        seed: Seed of the random initialisation.

    Returns:
        The model in eval mode.
    """
    _check_family(family)
    with _seeded(seed):
        return UNet2DConditionModel(**UNET_CONFIGS[family]).eval()


# Motion adapter (AnimateDiff v1-5-2 analogue): one motion module per resnet of the tiny SD1.5 UNet (same
# block_out_channels and layers per block, as ``UNetMotionModel.from_unet2d`` requires), a mid-block motion
# module as in v1-5-2, 2 temporal heads, 32 frame positions as the real adapters.
MOTION_ADAPTER_CONFIG: dict = {
    "block_out_channels": UNET_CONFIGS["sd15"]["block_out_channels"],
    "motion_layers_per_block": UNET_CONFIGS["sd15"]["layers_per_block"],
    "motion_mid_block_layers_per_block": 1,
    "motion_num_attention_heads": 2,
    "motion_norm_num_groups": UNET_CONFIGS["sd15"]["norm_num_groups"],
    "motion_max_seq_length": 32,
    "use_motion_mid_block": True,
}


def tiny_motion_adapter(seed: int = 0) -> MotionAdapter:
    """Tiny AnimateDiff ``MotionAdapter`` matching :func:`tiny_unet` ``("sd15")``.

    Args:
        seed: Seed of the random initialisation.

    Returns:
        The adapter in eval mode.
    """
    with _seeded(seed):
        return MotionAdapter(**MOTION_ADAPTER_CONFIG).eval()


def tiny_unet_motion(seed: int = 0) -> UNetMotionModel:
    """Tiny AnimateDiff video UNet: ``UNetMotionModel.from_unet2d(tiny SD1.5 UNet, tiny motion adapter)``.

    Uses the pipeline seed convention, so the result equals ``tiny_pipeline("animatediff", seed).unet``.

    Args:
        seed: Pipeline seed (UNet: ``seed``, motion adapter: ``seed + SEED_OFFSETS["motion_adapter"]``).

    Returns:
        The model in eval mode; forward takes ``sample`` of shape (B, 4, F, H, W) and
        ``encoder_hidden_states`` of shape (B * F, 77, 32).
    """
    unet = tiny_unet("sd15", seed + SEED_OFFSETS["unet"])
    adapter = tiny_motion_adapter(seed + SEED_OFFSETS["motion_adapter"])
    return UNetMotionModel.from_unet2d(unet, adapter).eval()


# Teacher noise schedules as DDIM configs (1000 training steps everywhere).
_SD_SCHEDULE: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
SCHEDULER_CONFIGS: dict[str, dict] = {
    "sd15": dict(_SD_SCHEDULE),
    "sd21": {**_SD_SCHEDULE, "prediction_type": "v_prediction"},  # the 768-v model
    "sdxl": dict(_SD_SCHEDULE),
    # AnimateDiff's inference config: *linear* betas over the same range, linspace spacing.
    "animatediff": {**_SD_SCHEDULE, "beta_schedule": "linear", "timestep_spacing": "linspace"},
}


def tiny_scheduler(family: str = "sd15") -> DDIMScheduler:
    """The family's teacher noise schedule as a ``DDIMScheduler`` (same config as the real model).

    Args:
        family: ``"sd15"``, ``"sd21"``, ``"sdxl"`` or ``"animatediff"``.

    Returns:
        A fresh scheduler.
    """
    _check_family(family)
    return DDIMScheduler(**SCHEDULER_CONFIGS[family])


# ----------------------------------------------------------------------------------------------------------
# Pipelines and folders
# ----------------------------------------------------------------------------------------------------------


def _sd_pipeline(comps: dict) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        **comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def _sdxl_pipeline(comps: dict) -> StableDiffusionXLPipeline:
    # No invisible-watermark post-processing: outputs must be the raw VAE decode.
    return StableDiffusionXLPipeline(**comps, add_watermarker=False)


def _no_extras(seed: int) -> dict:
    return {}


def _sdxl_extras(seed: int) -> dict:
    return {
        "text_encoder_2": tiny_text_encoder_2(seed + SEED_OFFSETS["text_encoder_2"]),
        "tokenizer_2": tiny_tokenizer(),
    }


def _animatediff_extras(seed: int) -> dict:
    return {"motion_adapter": tiny_motion_adapter(seed + SEED_OFFSETS["motion_adapter"])}


@dataclass(frozen=True)
class _TinyFamily:
    """How one family's tiny pipeline differs from the others."""

    extra_components: Callable[[int], dict]  # pipeline seed -> components beyond vae/text/unet/scheduler
    pipeline: Callable[[dict], DiffusionPipeline]  # the family's diffusers pipeline class around them
    stored_as: FamilyName  # the pipeline layout save_tiny_model writes (animatediff: an SD1.5 folder)


#: The tiny model of every family, by name.
_TINY_FAMILIES: dict[FamilyName, _TinyFamily] = {
    "sd15": _TinyFamily(_no_extras, _sd_pipeline, "sd15"),
    "sd21": _TinyFamily(_no_extras, _sd_pipeline, "sd21"),
    "sdxl": _TinyFamily(_sdxl_extras, _sdxl_pipeline, "sdxl"),
    "animatediff": _TinyFamily(_animatediff_extras, lambda comps: AnimateDiffPipeline(**comps), "sd15"),
}


def tiny_components(family: str, seed: int = 0) -> dict:
    """All components of the family's diffusers pipeline, freshly built.

    For ``"animatediff"`` the UNet is the plain SD1.5 ``UNet2DConditionModel`` (as stored on disk) and a
    ``motion_adapter`` entry is added; ``AnimateDiffPipeline`` converts the pair to a ``UNetMotionModel``.

    Args:
        family: ``"sd15"``, ``"sd21"``, ``"sdxl"`` or ``"animatediff"``.
        seed: Pipeline seed; component ``name`` uses ``seed + SEED_OFFSETS[name]``.

    Returns:
        Keyword arguments for the family's pipeline class.
    """
    _check_family(family)
    return {
        "vae": tiny_vae(seed + SEED_OFFSETS["vae"], family),
        "text_encoder": tiny_text_encoder(seed + SEED_OFFSETS["text_encoder"], family),
        "tokenizer": tiny_tokenizer(),
        "unet": tiny_unet(family, seed + SEED_OFFSETS["unet"]),
        "scheduler": tiny_scheduler(family),
        **_TINY_FAMILIES[family].extra_components(seed),
    }


def tiny_pipeline(family: str, seed: int = 0):
    """A ready diffusers pipeline built from the tiny components (CPU, float32).

    Args:
        family: ``"sd15"`` / ``"sd21"`` -> ``StableDiffusionPipeline``, ``"sdxl"`` ->
            ``StableDiffusionXLPipeline``, ``"animatediff"`` -> ``AnimateDiffPipeline``.
        seed: Pipeline seed (see :func:`tiny_components`).

    Returns:
        The pipeline; its progress bar is disabled.
    """
    comps = tiny_components(family, seed)  # checks the name
    pipe = _TINY_FAMILIES[family].pipeline(comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_model(family: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a complete diffusers-layout model folder (safetensors) of the tiny family model.

    Load it back exactly as a real model: ``StableDiffusionPipeline.from_pretrained(folder)`` (sd15, sd21,
    animatediff), ``StableDiffusionXLPipeline.from_pretrained(folder)`` (sdxl),
    ``UNet2DConditionModel.from_pretrained(folder, subfolder="unet")``, and for animatediff
    ``MotionAdapter.from_pretrained(folder / "motion_adapter")`` then
    ``AnimateDiffPipeline.from_pretrained(folder, motion_adapter=adapter)``.

    Args:
        family: ``"sd15"``, ``"sd21"``, ``"sdxl"`` or ``"animatediff"``.
        folder: Output folder (created if needed).
        seed: Pipeline seed (see :func:`tiny_components`); the weights equal those of
            ``tiny_pipeline(family, seed)``.

    Returns:
        The folder.
    """
    _check_family(family)
    folder = Path(folder)
    comps = tiny_components(family, seed)
    adapter = comps.pop("motion_adapter", None)
    # animatediff is stored as an SD1.5 folder (plain 2D UNet) + a separate motion adapter folder.
    pipe = _TINY_FAMILIES[_TINY_FAMILIES[family].stored_as].pipeline(comps)
    pipe.save_pretrained(folder, safe_serialization=True)
    if adapter is not None:
        adapter.save_pretrained(folder / "motion_adapter", safe_serialization=True)
    return folder
