"""The original Stable Diffusion (LDM / CompVis) single-file key layout, written from diffusers models.

Two layouts name the same SD 1.x weights:

* **diffusers** (``StableDiffusionPipeline.save_pretrained``): one folder per component, e.g.
  ``unet/`` ``down_blocks.0.resnets.0.norm1.weight``, ``vae/`` ``encoder.mid_block.attentions.0.to_q.weight``
  (linear, 2-D), ``text_encoder/`` the Hugging Face ``CLIPTextModel`` keys (``encoder.layers.0.mlp.fc1.weight``;
  transformers >= 5.6 flattened away the ``text_model.`` level of ``CLIPTextModel``).
* **original / LDM** (CompVis ``LatentDiffusion.state_dict()``, the ``v1-5-pruned-emaonly.safetensors`` that
  community checkpoints, A1111 and ComfyUI use): one file with three prefixes,

  - ``model.diffusion_model.`` the UNet as ``openaimodel.UNetModel``: ``time_embed.{0,2}``, a flat list
    ``input_blocks.N`` (``N=0`` the input conv; then per level ``layers_per_block`` blocks ``[ResBlock,
    SpatialTransformer?]`` and, except on the last level, one ``[Downsample]``), ``middle_block.{0,1,2}``
    (ResBlock, SpatialTransformer, ResBlock), ``output_blocks.N`` (per level ``layers_per_block + 1`` blocks
    ``[ResBlock, SpatialTransformer?, Upsample?]``), ``out.{0,2}``. A ResBlock names its layers
    ``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}``, ``skip_connection``; a SpatialTransformer
    has the very names diffusers' ``Transformer2DModel`` has (``proj_in``, ``transformer_blocks.0.attn1.to_q``).
  - ``first_stage_model.`` the VAE as ``ldm.modules.diffusionmodules.model.{Encoder,Decoder}``:
    ``encoder.down.{level}.block.{j}`` / ``.downsample.conv``, ``decoder.up.{level}.block.{j}`` /
    ``.upsample.conv`` with ``level`` counted from the *highest* resolution (diffusers' ``up_blocks`` go the
    other way), ``mid.block_1``, ``mid.attn_1``, ``mid.block_2``, ``norm_out``, ``nin_shortcut``; the
    mid-block attention's ``q``/``k``/``v``/``proj_out`` are 1x1 convolutions (4-D weights).
  - ``cond_stage_model.transformer.`` the ``FrozenCLIPEmbedder``'s Hugging Face ``CLIPTextModel`` as it was
    in 2022, i.e. ``text_model.embeddings...``, ``text_model.encoder.layers...``, with the
    ``text_model.embeddings.position_ids`` buffer.

diffusers reads the original layout back with ``loaders/single_file_utils.py`` (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``); this module is the inverse, written from the
two layouts above. Every diffusers key must be mapped (else :class:`ValueError` names it), so a model this does
not describe (SDXL's ``add_embedding``) fails loudly instead of being truncated; SD 2.x (linear projections,
an OpenCLIP text encoder stored as ``cond_stage_model.model.*``) is refused by its UNet config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from perflow_video.atomic_files import atomic_destination

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

__all__ = [
    "ModuleRename",
    "TEXT_ENCODER_PREFIX",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "diffusers_to_original_sd",
    "rename_key",
    "save_original_sd_checkpoint",
    "text_encoder_to_original",
    "unet_module_map",
    "unet_to_original",
    "vae_module_map",
    "vae_to_original",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

# Children of a diffusers ``ResnetBlock2D`` -> of an LDM UNet ``ResBlock`` (Sequential indices: SiLU and
# Dropout hold no weights, hence 0, 2 and 0, 3).
UNET_RESNET_CHILDREN: dict[str, str] = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# diffusers VAE ``ResnetBlock2D`` -> LDM ``ResnetBlock``: only the shortcut is named differently.
VAE_RESNET_CHILDREN: dict[str, str] = {"conv_shortcut": "nin_shortcut"}
# diffusers VAE mid-block ``Attention`` -> LDM ``AttnBlock``.
VAE_ATTENTION_CHILDREN: dict[str, str] = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
# LDM ``AttnBlock`` projections are 1x1 Conv2d; diffusers stores them as Linear.
VAE_ATTENTION_CONV_WEIGHTS = ("q.weight", "k.weight", "v.weight", "proj_out.weight")

UNET_DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # block type -> has attention
UNET_UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
UNET_MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)


@dataclass(frozen=True)
class ModuleRename:
    """Where one diffusers module lives in the original layout, and how its children are renamed there."""

    original: str
    children: Mapping[str, str] = field(default_factory=dict)


def _uniform_layers_per_block(config: Mapping) -> int:
    """``layers_per_block`` as one int (the LDM layout numbers blocks assuming the same count per level)."""
    layers = config["layers_per_block"]
    if isinstance(layers, int):
        return layers
    layers = list(layers)
    if len(set(layers)) != 1:
        raise ValueError(
            f"layers_per_block={layers}: the original layout needs the same number on every level"
        )
    return layers[0]


def _block_attention(block_types: Sequence[str], known: Mapping[str, bool], what: str) -> list[bool]:
    """Whether each UNet block has attention; a block type the LDM UNet has no counterpart for raises."""
    unknown = [t for t in block_types if t not in known]
    if unknown:
        raise ValueError(f"{what} {unknown} have no original-layout counterpart (expected {sorted(known)})")
    return [known[t] for t in block_types]


def unet_module_map(config: Mapping) -> dict[str, ModuleRename]:
    """diffusers ``UNet2DConditionModel`` module paths -> original ``model.diffusion_model`` module paths.

    Args:
        config: The UNet config (``unet.config``); uses ``down_block_types``, ``up_block_types``,
            ``mid_block_type`` and ``layers_per_block``.

    Returns:
        One entry per weight-holding module: time embedding, input/output convs, every resnet, attention,
        down- and upsampler, e.g. ``down_blocks.1.resnets.0`` -> ``input_blocks.4.0`` for SD 1.5.
    """
    layers = _uniform_layers_per_block(config)
    down_attn = _block_attention(config["down_block_types"], UNET_DOWN_BLOCKS, "down_block_types")
    up_attn = _block_attention(config["up_block_types"], UNET_UP_BLOCKS, "up_block_types")
    mid = config.get("mid_block_type", UNET_MID_BLOCKS[0])
    if mid not in UNET_MID_BLOCKS:
        raise ValueError(
            f"mid_block_type={mid!r} has no original-layout counterpart (expected {UNET_MID_BLOCKS})"
        )
    modules = {
        "conv_in": ModuleRename("input_blocks.0.0"),
        "time_embedding.linear_1": ModuleRename("time_embed.0"),
        "time_embedding.linear_2": ModuleRename("time_embed.2"),
        "mid_block.resnets.0": ModuleRename("middle_block.0", UNET_RESNET_CHILDREN),
        "mid_block.attentions.0": ModuleRename("middle_block.1"),
        "mid_block.resnets.1": ModuleRename("middle_block.2", UNET_RESNET_CHILDREN),
        "conv_norm_out": ModuleRename("out.0"),
        "conv_out": ModuleRename("out.2"),
    }
    for level, has_attn in enumerate(down_attn):
        first = 1 + level * (layers + 1)  # input_blocks.0 is conv_in; each level adds a Downsample block
        for j in range(layers):
            modules[f"down_blocks.{level}.resnets.{j}"] = ModuleRename(
                f"input_blocks.{first + j}.0", UNET_RESNET_CHILDREN
            )
            if has_attn:
                modules[f"down_blocks.{level}.attentions.{j}"] = ModuleRename(f"input_blocks.{first + j}.1")
        if level < len(down_attn) - 1:
            modules[f"down_blocks.{level}.downsamplers.0.conv"] = ModuleRename(
                f"input_blocks.{first + layers}.0.op"
            )
    for level, has_attn in enumerate(up_attn):
        first = level * (layers + 1)
        for j in range(layers + 1):
            modules[f"up_blocks.{level}.resnets.{j}"] = ModuleRename(
                f"output_blocks.{first + j}.0", UNET_RESNET_CHILDREN
            )
            if has_attn:
                modules[f"up_blocks.{level}.attentions.{j}"] = ModuleRename(f"output_blocks.{first + j}.1")
        if level < len(up_attn) - 1:  # the Upsample follows the last block's ResBlock (and transformer)
            slot = 2 if has_attn else 1
            modules[f"up_blocks.{level}.upsamplers.0.conv"] = ModuleRename(
                f"output_blocks.{first + layers}.{slot}.conv"
            )
    return modules


def vae_module_map(config: Mapping) -> dict[str, ModuleRename]:
    """diffusers ``AutoencoderKL`` module paths -> original ``first_stage_model`` module paths.

    Args:
        config: The VAE config (``vae.config``); uses ``down_block_types``, ``up_block_types`` and
            ``layers_per_block`` (the decoder has one resnet more per block, as in both layouts).

    Returns:
        One entry per weight-holding module, e.g. ``decoder.up_blocks.0.resnets.1`` -> ``decoder.up.3.block.1``
        for a 4-level VAE (the LDM decoder counts levels from the highest resolution).
    """
    layers = _uniform_layers_per_block(config)
    num_down, num_up = len(config["down_block_types"]), len(config["up_block_types"])
    modules = {
        "quant_conv": ModuleRename("quant_conv"),
        "post_quant_conv": ModuleRename("post_quant_conv"),
    }
    for part in ("encoder", "decoder"):
        modules[f"{part}.conv_in"] = ModuleRename(f"{part}.conv_in")
        modules[f"{part}.conv_norm_out"] = ModuleRename(f"{part}.norm_out")
        modules[f"{part}.conv_out"] = ModuleRename(f"{part}.conv_out")
        modules[f"{part}.mid_block.resnets.0"] = ModuleRename(f"{part}.mid.block_1", VAE_RESNET_CHILDREN)
        modules[f"{part}.mid_block.attentions.0"] = ModuleRename(f"{part}.mid.attn_1", VAE_ATTENTION_CHILDREN)
        modules[f"{part}.mid_block.resnets.1"] = ModuleRename(f"{part}.mid.block_2", VAE_RESNET_CHILDREN)
    for i in range(num_down):
        for j in range(layers):
            modules[f"encoder.down_blocks.{i}.resnets.{j}"] = ModuleRename(
                f"encoder.down.{i}.block.{j}", VAE_RESNET_CHILDREN
            )
        if i < num_down - 1:
            modules[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = ModuleRename(
                f"encoder.down.{i}.downsample.conv"
            )
    for i in range(num_up):
        level = num_up - 1 - i
        for j in range(layers + 1):
            modules[f"decoder.up_blocks.{i}.resnets.{j}"] = ModuleRename(
                f"decoder.up.{level}.block.{j}", VAE_RESNET_CHILDREN
            )
        if i < num_up - 1:
            modules[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = ModuleRename(
                f"decoder.up.{level}.upsample.conv"
            )
    return modules


def _rename_child(rest: str, children: Mapping[str, str]) -> str:
    """``rest`` (a key relative to its module) with its leading child renamed, if ``children`` names it."""
    for old, new in children.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def rename_key(key: str, modules: Mapping[str, ModuleRename]) -> str | None:
    """The original-layout name of a diffusers key (the longest module path that owns it), or None."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        if module in modules:
            rule = modules[module]
            return f"{rule.original}.{_rename_child('.'.join(parts[cut:]), rule.children)}"
    return None


def _rename_all(
    state: Mapping[str, torch.Tensor], modules: Mapping[str, ModuleRename], prefix: str, what: str
) -> dict[str, torch.Tensor]:
    """Every key of ``state`` renamed and prefixed; unmapped keys or two keys on one name raise."""
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state.items():
        new = rename_key(key, modules)
        if new is None:
            unmapped.append(key)
            continue
        if prefix + new in out:
            raise ValueError(f"{what}: two keys map to {prefix + new}")
        out[prefix + new] = value
    if unmapped:
        raise ValueError(f"{what}: {len(unmapped)} keys have no original-layout name, e.g. {unmapped[:5]}")
    return out


def unet_to_original(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict in the original ``model.diffusion_model.`` layout.

    Tensors are the same objects (no copy); the transformer blocks' inner names are shared by both layouts.
    """
    return _rename_all(state, unet_module_map(config), UNET_PREFIX, "UNet")


def vae_to_original(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in the original ``first_stage_model.`` layout.

    The mid-block attention projections become 1x1-conv weights (``[out, in, 1, 1]``) as in the LDM
    ``AttnBlock``; diffusers' reader accepts them and squeezes them back to linear weights.
    """
    out = _rename_all(state, vae_module_map(config), VAE_PREFIX, "VAE")
    for key, value in out.items():
        if ".mid.attn_1." in key and key.endswith(VAE_ATTENTION_CONV_WEIGHTS) and value.ndim == 2:
            out[key] = value[:, :, None, None]
    return out


def text_encoder_to_original(
    state: Mapping[str, torch.Tensor], max_position_embeddings: int | None = None
) -> dict[str, torch.Tensor]:
    """A Hugging Face ``CLIPTextModel`` state dict under ``cond_stage_model.transformer.text_model.``.

    Args:
        state: ``text_encoder.state_dict()``, with (transformers < 5.6) or without the ``text_model.`` level.
        max_position_embeddings: If given and the state lacks it, add the ``embeddings.position_ids`` buffer
            (``arange`` as int64 of shape ``[1, n]``) that original SD 1.x checkpoints carry.

    Returns:
        The original-layout text encoder (diffusers' reader strips the prefix and, for a flattened
        ``CLIPTextModel``, the ``text_model.`` level).
    """
    out = {}
    for key, value in state.items():
        inner = key if key.startswith("text_model.") else f"text_model.{key}"
        out[TEXT_ENCODER_PREFIX + inner] = value
    position_ids = f"{TEXT_ENCODER_PREFIX}text_model.embeddings.position_ids"
    if max_position_embeddings is not None and position_ids not in out:
        out[position_ids] = torch.arange(max_position_embeddings, dtype=torch.int64)[None]
    return out


def diffusers_to_original_sd(
    unet_state: Mapping[str, torch.Tensor],
    unet_config: Mapping,
    vae_state: Mapping[str, torch.Tensor],
    vae_config: Mapping,
    text_encoder_state: Mapping[str, torch.Tensor],
    max_position_embeddings: int | None = None,
) -> dict[str, torch.Tensor]:
    """An SD 1.x pipeline's weights as one original (LDM) single-file state dict.

    Args:
        unet_state / unet_config: ``unet.state_dict()`` and ``unet.config``.
        vae_state / vae_config: ``vae.state_dict()`` and ``vae.config``.
        text_encoder_state: ``text_encoder.state_dict()`` (a CLIP ViT-L ``CLIPTextModel`` for SD 1.x).
        max_position_embeddings: The text encoder's context length, to add ``position_ids`` (see
            :func:`text_encoder_to_original`); None leaves them out.

    Returns:
        ``model.diffusion_model.*``, ``first_stage_model.*`` and ``cond_stage_model.transformer.*`` keys.
    """
    if unet_config.get("use_linear_projection") or unet_config.get("addition_embed_type"):
        # SD 2.x (linear projections, OpenCLIP text encoder under cond_stage_model.model.*) and SDXL have
        # original layouts of their own that this module does not write.
        raise ValueError(
            "only SD 1.x has this original layout; the UNet config says use_linear_projection="
            f"{unet_config.get('use_linear_projection')}, addition_embed_type={unet_config.get('addition_embed_type')}"
            " (SD 2.x / SDXL)"
        )
    return {
        **unet_to_original(unet_state, unet_config),
        **vae_to_original(vae_state, vae_config),
        **text_encoder_to_original(text_encoder_state, max_position_embeddings),
    }


def _load_pipeline_parts(folder: str) -> tuple:
    """(unet, vae, text_encoder) of a local diffusers SD folder, loaded without the network."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
    return unet, vae, text_encoder


def save_original_sd_checkpoint(
    source: str | os.PathLike | StableDiffusionPipeline,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Write an SD 1.x model as one original-layout ``.safetensors`` (what A1111 / ComfyUI / ``from_single_file``
    read), atomically.

    Args:
        source: A local diffusers ``StableDiffusionPipeline`` folder, or a pipeline-like object with ``unet``,
            ``vae`` and ``text_encoder`` (e.g. a pipeline whose ``unet`` is a trained PeRFlow student).
        path: The ``.safetensors`` file to write (replaced whole or not at all).
        dtype: Cast floating-point tensors to this (e.g. ``torch.float16`` as community files are); None keeps
            them as they are.

    Returns:
        The tensors written.
    """
    if not str(path).endswith(".safetensors"):
        raise ValueError(f"{path}: the original single file is written as .safetensors")
    if isinstance(source, (str, os.PathLike)):
        unet, vae, text_encoder = _load_pipeline_parts(os.fspath(source))
    else:
        unet, vae, text_encoder = source.unet, source.vae, source.text_encoder
    state = diffusers_to_original_sd(
        unet.state_dict(),
        unet.config,
        vae.state_dict(),
        vae.config,
        text_encoder.state_dict(),
        text_encoder.config.max_position_embeddings,
    )
    tensors = {
        key: (value.to(dtype) if dtype is not None and value.is_floating_point() else value).contiguous()
        for key, value in state.items()
    }
    with atomic_destination(Path(path)) as tmp_path:
        save_file(tensors, tmp_path, metadata={"format": "pt"})
    return tensors
