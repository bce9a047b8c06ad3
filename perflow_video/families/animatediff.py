"""AnimateDiff: SD1.5 UNet + motion modules (diffusers ``UNetMotionModel``), 16 x 384 x 384 clips,
parameterization B, the motion modules' own *linear* betas (docs/method.md §5)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AnimateDiffPipeline, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from einops import rearrange
from safetensors.torch import load_file

from perflow_video.errors import ConfigError
from perflow_video.families.base import (
    FamilyModels,
    FamilySpec,
    MetadataFor,
    ModelFamily,
    encode_clip_prompts,
    encode_pixels_to_latents,
    is_single_file,
    missing_weights_error,
)
from perflow_video.families.loading import (
    DEFAULT_MOTION_ADAPTER,
    TINY_PREFIX,
    ComponentConfigs,
    load_component,
    random_weights,
    resolve_model_path,
    shipped_configs,
)
from perflow_video.families.stable_diffusion import load_sd_parts, random_sd_parts
from perflow_video.media.video_export import export_video
from perflow_video.method.teacher_solver import Conditioning
from perflow_video.weights.animatediff_keys import export_motion_module_original, original_to_diffusers
from perflow_video.weights.delta_weights import delta_to_layout, is_motion_key, save_delta_weights

logger = logging.getLogger(__name__)
FLAG = "model.motion_adapter"
# The motion adapter users pair with SD1.5 for 16-frame clips; its config is read for single files.


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a pickle (.ckpt/.pt) loaded with ``weights_only=True``."""
    if path.endswith(".safetensors"):
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


def load_motion_adapter(source: str, config_source: str | None, sd_path: str) -> MotionAdapter:
    """A ``MotionAdapter`` from a diffusers folder / hub id, or from an original AnimateDiff motion-module
    file (``mm_sd_v15_v2.ckpt``-style, converted key by key; its config from ``config_source``)."""
    if source == TINY_PREFIX:
        if not os.path.isdir(sd_path):
            raise ConfigError(
                f"model.motion_adapter=tiny is the tiny model's own adapter, but the base model is {sd_path}: "
                f"set model.motion_adapter to a MotionAdapter folder / hub id or an original motion-module file"
            )
        source = os.path.join(sd_path, "motion_adapter")
    if not is_single_file(source):
        return load_component(MotionAdapter, source, None, None, None, FLAG)
    config_source = config_source or DEFAULT_MOTION_ADAPTER
    try:
        config = MotionAdapter.load_config(
            config_source, local_files_only=os.path.isdir(config_source) or None
        )
    except (OSError, ValueError) as err:
        raise missing_weights_error(
            "MotionAdapter config", config_source, "model.motion_adapter_config"
        ) from err
    adapter = MotionAdapter.from_config(config)
    state = original_to_diffusers(
        {k: v for k, v in read_checkpoint(source).items() if "motion_modules" in k and "pos_encoder" not in k}
    )
    hint = (
        "set model.motion_adapter_config to a MotionAdapter folder / hub id of the file's version "
        "(e.g. guoyww/animatediff-motion-adapter-v1-5-2 for mm_sd_v15_v2)"
    )
    try:
        missing, unexpected = adapter.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes differ
        raise ConfigError(
            f"{source}: motion module does not fit the adapter config from {config_source} ({err}); {hint}"
        ) from err
    missing = [
        k for k in missing if not k.endswith("pos_embed.pe")
    ]  # sinusoidal buffer, rebuilt by diffusers
    if missing or unexpected:
        raise ConfigError(
            f"{source}: motion module does not match the adapter config from {config_source}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}; {hint}"
        )
    return adapter


def motion_unet(unet: UNet2DConditionModel, adapter: MotionAdapter) -> UNetMotionModel:
    """``UNetMotionModel.from_unet2d(unet, adapter)`` without a second copy of the weights: the motion UNet's
    skeleton is built empty and takes the two models' tensors as its own (their state dicts name exactly its
    keys, which the strict load checks). Saves a 5 GB copy (and its time) for SD1.5 + v1-5-2."""
    with init_empty_weights():
        skeleton = UNetMotionModel.from_unet2d(unet, adapter, load_weights=False)
    skeleton.load_state_dict({**unet.state_dict(), **adapter.state_dict()}, strict=True, assign=True)
    return skeleton


# AnimateDiff motion modules were trained with linear betas 0.00085 -> 0.012 (docs/method.md §5), whatever the
# SD1.5 folder's own scheduler config says (scaled_linear): the teacher solver and the exported
# PeRFlowScheduler must use the schedule the motion modules denoise.
MOTION_MODULE_BETAS = {
    "beta_schedule": "linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "trained_betas": None,
}


def with_motion_module_betas(scheduler_config: dict) -> dict:
    """The SD1.5 scheduler config with AnimateDiff's linear betas (logged when it changes anything)."""
    changed = {k: v for k, v in MOTION_MODULE_BETAS.items() if scheduler_config.get(k) != v}
    if changed:
        logger.info("animatediff: using the motion modules' noise schedule %s (the base model says %s)",
                    changed, {k: scheduler_config.get(k) for k in changed})  # fmt: skip
    return {**scheduler_config, **MOTION_MODULE_BETAS}


class AnimateDiffFamily(ModelFamily):
    """Text-to-video with AnimateDiff motion modules on an SD1.5 UNet."""

    name = "animatediff"
    default_parameterization = "ddim_eps"
    default_resolution = 384
    default_trainable = "motion"  # the SD1.5 weights stay those of the base model users pair it with
    trainable_choices = ("motion", "spatial", "all", "lora")
    lora_target_choices = ("motion", "spatial", "both")
    default_lora_targets = "motion"  # as trainable: ΔW then plugs into any SD1.5 checkpoint
    data_kind = "clips"
    delta_layout = "diffusers_unet_motion"

    def load(self, spec: FamilySpec) -> FamilyModels:
        if spec.init == "random":
            return self.random_models(spec, shipped_configs(self.name, spec.motion_adapter))
        parts = load_sd_parts(spec, self.name)
        sd_path = resolve_model_path(spec.pretrained_model_name_or_path, self.name)
        adapter_source = spec.motion_adapter or DEFAULT_MOTION_ADAPTER
        adapter = load_motion_adapter(adapter_source, spec.motion_adapter_config, sd_path)
        return self.models_of(spec, parts, adapter, adapter_source)

    def random_models(self, spec: FamilySpec, configs: ComponentConfigs) -> FamilyModels:
        parts = random_sd_parts(configs)
        with random_weights(offset=1):
            adapter = MotionAdapter.from_config(configs.read("motion_adapter"))
        return self.models_of(spec, parts, adapter, configs.motion_adapter)

    def models_of(self, spec: FamilySpec, parts: tuple, adapter: MotionAdapter, adapter_source: str):
        """FamilyModels of the SD1.5 parts (``load_sd_parts``) and a motion adapter: the motion UNet."""
        unet, vae, text_encoder, tokenizer, sched_cfg, source = parts
        teacher = motion_unet(unet, adapter)
        for module in (teacher, vae, text_encoder):
            module.requires_grad_(False)
        return FamilyModels(
            teacher, self.student_of(teacher, spec), vae, [text_encoder], [tokenizer],
            with_motion_module_betas(sched_cfg), source, spec.resolution, num_frames=spec.num_frames,
            motion_adapter=adapter_source,
        )  # fmt: skip

    def in_part(self, name: str, part: str) -> bool:
        if part in ("all", "both"):
            return True
        return (part == "motion") == ("motion_modules" in name)

    def encode_text(self, models, prompts, device) -> Conditioning:
        return Conditioning(
            encode_clip_prompts(models.text_encoders[0], models.tokenizers[0], prompts, device)
        )

    def expand_conditioning(self, models, cond: Conditioning) -> Conditioning:
        # UNetMotionModel takes one embedding per frame, (B·F, seq, dim), as AnimateDiffPipeline builds it.
        return cond.map(lambda x: x.repeat_interleave(models.num_frames, dim=0))

    def encode_pixels(self, models, pixel_values):
        """(B, F, 3, H, W) clip pixels -> (B, 4, F, H/8, W/8) latents."""
        if pixel_values.ndim != 5 or pixel_values.shape[1] != models.num_frames:
            raise ValueError(
                f"expected clips (B, {models.num_frames}, 3, H, W), got {tuple(pixel_values.shape)}; "
                "the dataset must give model.num_frames frames per clip"
            )
        b = pixel_values.shape[0]
        latents = encode_pixels_to_latents(models.vae, rearrange(pixel_values, "b f c h w -> (b f) c h w"))
        return rearrange(latents, "(b f) c h w -> b c f h w", b=b)

    def pipeline(self, models, student, scheduler):
        pipe = AnimateDiffPipeline(
            vae=models.vae,
            text_encoder=models.text_encoders[0],
            tokenizer=models.tokenizers[0],
            unet=student,
            motion_adapter=None,
            scheduler=scheduler,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def write_sample(self, models, pipe, request: dict, stem: Path, video_format: str) -> Path:
        """A clip of ``models.num_frames`` frames as ``<stem>.<video_format>`` (gif | mp4), 8 fps."""
        output = pipe(**request, num_frames=models.num_frames, output_type="pt")
        frames = output.frames[0]  # (F, C, H, W) in [0, 1]
        return export_video(frames.float().cpu(), stem.parent / f"{stem.name}.{video_format}", fps=8)

    def save_student(self, student: torch.nn.Module, folder: str) -> None:
        student.save_pretrained(f"{folder}/unet_motion", safe_serialization=True)
        student.save_motion_modules(f"{folder}/motion_adapter", safe_serialization=True)

    def write_extra_outputs(self, student, delta, out: Path, metadata_for: MetadataFor) -> dict[str, Path]:
        """With trained motion modules, for tools that read the original AnimateDiff layout (docs/method.md
        §8): their ΔW (``delta_weights_motion_original.safetensors``) and the whole accelerated motion
        module, pos_encoder included (``perflow_motion_module.safetensors``)."""
        if not any(is_motion_key(k) for k in delta):
            return {}
        delta_path = out / "delta_weights_motion_original.safetensors"
        layout = "animatediff_original"
        save_delta_weights(delta_to_layout(delta, layout), delta_path, metadata_for(layout))
        module_path = out / "perflow_motion_module.safetensors"
        export_motion_module_original(student, module_path)
        return {"delta_weights_motion_original": delta_path, "motion_module_original": module_path}
