"""SD 1.5 (eps teacher, parameterization A, 512) and SD 2.1 (v teacher, velocity, 768): docs/method.md §6."""

from __future__ import annotations

import logging

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from perflow_video.errors import ConfigError
from perflow_video.families.base import (
    FamilyModels,
    FamilySpec,
    ModelFamily,
    encode_clip_prompts,
    encode_pixels_to_latents,
    is_single_file,
)
from perflow_video.families.loading import (
    ComponentConfigs,
    load_component,
    load_scheduler_config,
    random_text_encoder,
    random_weights,
    resolve_model_path,
    shipped_configs,
)
from perflow_video.family_names import FamilyName
from perflow_video.method.teacher_solver import Conditioning
from perflow_video.tiny.tiny_tokenizer import tiny_tokenizer

logger = logging.getLogger(__name__)
FLAG = "model.pretrained_model_name_or_path"


def load_single_file_pipeline(path: str, config: str) -> StableDiffusionPipeline:
    """diffusers' ``from_single_file`` of an original-layout SD checkpoint with the configs of ``config``.

    A local config folder is read without the network (diffusers then never looks at the hub). When the
    file and the configs do not fit together (another architecture, a folder that is no SD pipeline, a hub
    id that is not cached offline), diffusers raises one of several errors; they become one that names the
    file and the key to set.
    """
    try:
        return StableDiffusionPipeline.from_single_file(
            path, config=config, safety_checker=None, requires_safety_checker=False
        )
    except torch.OutOfMemoryError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ConfigError(
            f"could not load the single checkpoint file {path} with the component configs of "
            f"model.single_file_config={config!r} ({type(err).__name__}: {str(err)[:300]}). Set "
            "model.single_file_config to a local diffusers folder (or a hub id available offline) of the same "
            "architecture as the file, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5 for an SD1.5 checkpoint"
        ) from err


def load_sd_parts(spec: FamilySpec, family: str) -> tuple:
    """(unet, vae, text_encoder, tokenizer, scheduler_config, source) of an SD 1.x/2.x model.

    A single ``.safetensors``/``.ckpt`` file (a community SD1.5 checkpoint) is read with diffusers'
    ``from_single_file``; its component configs come from ``model.single_file_config`` (a diffusers
    folder or hub id of the same architecture).
    """
    path = resolve_model_path(spec.pretrained_model_name_or_path, family)
    if is_single_file(path):
        if spec.single_file_config is None:
            raise ConfigError(
                f"{path} is a single checkpoint file: set model.single_file_config to a diffusers folder or hub id "
                "of the same architecture (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) for its configs"
            )
        pipe = load_single_file_pipeline(path, spec.single_file_config)
        return pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, dict(pipe.scheduler.config), path
    if spec.single_file_config is not None:
        logger.warning(
            "model.single_file_config=%s is ignored: %s is not a single checkpoint file (an original "
            "motion-module file takes its config from model.motion_adapter_config)",
            spec.single_file_config,
            path,
        )
    unet = load_component(UNet2DConditionModel, path, "unet", spec.revision, spec.variant, FLAG)
    vae = load_component(AutoencoderKL, path, "vae", spec.revision, spec.variant, FLAG)
    text_encoder = load_component(CLIPTextModel, path, "text_encoder", spec.revision, spec.variant, FLAG)
    tokenizer = load_component(CLIPTokenizer, path, "tokenizer", spec.revision, None, FLAG)
    return unet, vae, text_encoder, tokenizer, load_scheduler_config(path, spec.revision, FLAG), path


def random_sd_parts(configs: ComponentConfigs) -> tuple:
    """What :func:`load_sd_parts` returns, with random weights from ``configs`` and the tiny tokenizer."""
    with random_weights():
        unet = UNet2DConditionModel.from_config(configs.read("unet"))
        vae = AutoencoderKL.from_config(configs.read("vae"))
        text_encoder = random_text_encoder(CLIPTextModel, configs.read("text_encoder"))
    return unet, vae, text_encoder, tiny_tokenizer(), configs.read("scheduler"), configs.base_model


class StableDiffusionFamily(ModelFamily):
    """SD 1.x / 2.x text-to-image UNets."""

    default_trainable = "all"
    trainable_choices = ("all", "lora")  # no motion modules: the whole UNet, or LoRA on its attention

    def __init__(self, name: FamilyName, default_parameterization: str, default_resolution: int):
        self.name = name
        self.default_parameterization = default_parameterization
        self.default_resolution = default_resolution

    def load(self, spec: FamilySpec) -> FamilyModels:
        if spec.init == "random":
            return self.random_models(spec, shipped_configs(self.name, None))
        return self.models_of(spec, load_sd_parts(spec, self.name))

    def random_models(self, spec: FamilySpec, configs: ComponentConfigs) -> FamilyModels:
        return self.models_of(spec, random_sd_parts(configs))

    def models_of(self, spec: FamilySpec, parts: tuple) -> FamilyModels:
        """FamilyModels of the (unet, vae, text_encoder, tokenizer, scheduler_config, source) of a load."""
        unet, vae, text_encoder, tokenizer, sched_cfg, source = parts
        for module in (unet, vae, text_encoder):
            module.requires_grad_(False)
        student = self.student_of(unet, spec)
        return FamilyModels(
            unet, student, vae, [text_encoder], [tokenizer], sched_cfg, source, spec.resolution
        )

    def encode_text(self, models, prompts, device) -> Conditioning:
        return Conditioning(
            encode_clip_prompts(models.text_encoders[0], models.tokenizers[0], prompts, device)
        )

    def encode_pixels(self, models, pixel_values):
        return encode_pixels_to_latents(models.vae, pixel_values)

    def pipeline(self, models, student, scheduler):
        pipe = StableDiffusionPipeline(
            vae=models.vae,
            text_encoder=models.text_encoders[0],
            tokenizer=models.tokenizers[0],
            unet=student,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save_student(self, student: torch.nn.Module, folder: str) -> None:
        student.save_pretrained(f"{folder}/unet", safe_serialization=True)
