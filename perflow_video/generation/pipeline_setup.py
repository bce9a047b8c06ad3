"""The diffusers pipeline a request asks for, from the loaded model's components.

* Text-to-video: the family's ``AnimateDiffPipeline``; video-to-video (``--video``): diffusers'
  ``AnimateDiffVideoToVideoPipeline.from_pipe`` of it (the same components, our PeRFlowScheduler included).
* Images: the image family's ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``, with the same
  options (no FreeNoise, no video-to-video: those flags are refused for image families before this).
* Long clips (``--context_length``): diffusers' FreeNoise, ``pipe.enable_free_noise``.
* GPU options: the attention backend (:mod:`perflow_video.families.attention`), VAE slicing / tiling (the
  ``AutoencoderKL``'s own ``enable_slicing`` / ``enable_tiling``: diffusers 0.42.1's AnimateDiff pipelines
  no longer have ``enable_vae_slicing``), the dtype, and the placement: the device, or model CPU offload.

The pipeline shares its models with the :class:`LoadedModel`; :func:`release_pipeline` undoes what would
otherwise outlive it (FreeNoise blocks, VAE slicing / tiling, offload hooks). The attention processors and
the dtype cast stay as set (as before this change for the dtype).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from diffusers import AnimateDiffVideoToVideoPipeline, MotionAdapter

from perflow_video.errors import ConfigError
from perflow_video.families.attention import configure_attention, resolve_attention_backend
from perflow_video.generation.clip_request import DEFAULT_CONTEXT_STRIDE, ClipRequest

if TYPE_CHECKING:
    from perflow_video.generation.model_source import LoadedModel

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_device_options(request: ClipRequest) -> None:
    """Device flags that cannot work on this machine: ConfigError naming the flag (before anything loads)."""
    cuda = request.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ConfigError(f"--device {request.device}: no CUDA GPU here; use --device cpu")
    if request.cpu_offload and not cuda:
        raise ConfigError(
            f"--cpu_offload: model CPU offload needs a CUDA device (it keeps the models in CPU memory and moves "
            f"each to the GPU only while it runs); with --device {request.device} everything already runs "
            "from CPU memory: leave the flag out"
        )
    if request.attention is not None:
        try:
            resolve_attention_backend(request.attention)
        except ValueError as err:
            raise ConfigError(f"--attention {request.attention}: {err}") from None


def motion_adapter_of(unet: torch.nn.Module) -> MotionAdapter:
    """The UNetMotionModel's own motion modules as a ``MotionAdapter`` (shared, not copied).

    Built empty on the meta device with the config mapping diffusers' ``save_motion_modules`` uses, then
    every motion-module list is replaced by the UNet's: no weight is allocated and none is left on meta.
    """
    cfg = unet.config
    with torch.device("meta"):
        adapter = MotionAdapter(
            block_out_channels=cfg["block_out_channels"],
            motion_layers_per_block=cfg["layers_per_block"],
            motion_norm_num_groups=cfg["norm_num_groups"],
            motion_num_attention_heads=cfg["motion_num_attention_heads"],
            motion_max_seq_length=cfg["motion_max_seq_length"],
            use_motion_mid_block=cfg["use_motion_mid_block"],
        )
    pairs = [
        *zip(adapter.down_blocks, unet.down_blocks, strict=True),
        *zip(adapter.up_blocks, unet.up_blocks, strict=True),
    ]
    if adapter.mid_block is not None:
        pairs.append((adapter.mid_block, unet.mid_block))
    for mine, theirs in pairs:
        mine.motion_modules = theirs.motion_modules
    if any(t.is_meta for t in [*adapter.parameters(), *adapter.buffers()]):
        raise RuntimeError("the UNet's motion modules do not fill a MotionAdapter of its config")
    return adapter


def enable_free_noise(pipe, context_length: int, context_stride: int) -> None:
    """diffusers' FreeNoise: the motion modules attend over windows of ``context_length`` frames, every
    ``context_stride`` frames, blended with pyramid weights; the initial noise repeats shuffled per window.

    Our pipelines carry the motion modules inside the UNetMotionModel (``motion_adapter=None``), and
    diffusers 0.42.1's ``enable_free_noise`` reads ``pipe.motion_adapter.config.motion_max_seq_length``: for
    that call the pipeline holds :func:`motion_adapter_of` its UNet, removed again right after (so that
    ``.to()`` and model offload see each module once).
    """
    pipe.motion_adapter = motion_adapter_of(pipe.unet)
    try:
        pipe.enable_free_noise(context_length=context_length, context_stride=context_stride)
    finally:
        pipe.motion_adapter = None


def disable_free_noise(pipe) -> None:
    """Put the UNet's plain transformer blocks back (its mid block may have no motion modules, which
    diffusers 0.42.1's ``disable_free_noise`` does not allow for)."""
    if hasattr(pipe.unet.mid_block, "motion_modules"):
        pipe.disable_free_noise()
        return
    pipe._free_noise_context_length = None
    for block in [*pipe.unet.down_blocks, *pipe.unet.up_blocks]:
        pipe._disable_free_noise_in_block(block)


@contextmanager
def pipeline_for(request: ClipRequest, loaded: LoadedModel) -> Iterator:
    """The pipeline for ``request`` (text- or video-to-video) with its options, on its device; on exit the
    options that live in the shared models are undone (:func:`release_pipeline`)."""
    pipe = loaded.family.pipeline(loaded.models, loaded.student, loaded.scheduler)
    if request.video is not None:
        pipe = AnimateDiffVideoToVideoPipeline.from_pipe(pipe)
        pipe.set_progress_bar_config(disable=True)
    try:
        _apply_options(pipe, request)
        yield pipe
    finally:
        release_pipeline(pipe)


def _apply_options(pipe, request: ClipRequest) -> None:
    if request.context_length is not None:
        enable_free_noise(pipe, request.context_length, request.effective_context_stride)
    if request.attention is not None:  # after FreeNoise, which builds new transformer blocks
        configure_attention([pipe.unet, pipe.vae], request.attention)
    if request.vae_slicing:
        pipe.vae.enable_slicing()
    if request.vae_tiling:
        pipe.vae.enable_tiling()
    dtype = DTYPES[request.dtype]
    if dtype != torch.float32:  # cast before moving: a full-precision copy never lands on the device
        pipe.to(dtype=dtype)
    if request.cpu_offload:
        pipe.enable_model_cpu_offload(device=request.device)
    else:
        pipe.to(request.device)


def release_pipeline(pipe) -> None:
    """Undo the options that live in the shared models, so the LoadedModel samples plainly again."""
    if getattr(pipe, "_all_hooks", None):  # model CPU offload
        pipe.remove_all_hooks()
    if getattr(pipe, "free_noise_enabled", False):  # the image pipelines have no FreeNoise
        disable_free_noise(pipe)
    pipe.vae.disable_slicing()
    pipe.vae.disable_tiling()


__all__ = [
    "DEFAULT_CONTEXT_STRIDE",
    "DTYPES",
    "check_device_options",
    "enable_free_noise",
    "motion_adapter_of",
    "pipeline_for",
    "release_pipeline",
]
