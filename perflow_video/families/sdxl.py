"""SDXL: eps teacher, parameterization B, 1024; two text encoders, pooled embeds and time_ids."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from perflow_video.families.base import (
    FamilyModels,
    FamilySpec,
    ModelFamily,
    encode_pixels_to_latents,
    tokenize,
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
from perflow_video.method.teacher_solver import Conditioning
from perflow_video.tiny.tiny_tokenizer import tiny_tokenizer

FLAG = "model.pretrained_model_name_or_path"


class SDXLFamily(ModelFamily):
    """SDXL base. Empty prompts are zero embeddings, as the SDXL pipeline's force_zeros_for_empty_prompt."""

    name = "sdxl"
    default_parameterization = "ddim_eps"
    default_resolution = 1024
    default_trainable = "all"
    trainable_choices = ("all", "lora")  # no motion modules: the whole UNet, or LoRA on its attention

    def load(self, spec: FamilySpec) -> FamilyModels:
        if spec.init == "random":
            return self.random_models(spec, shipped_configs(self.name, None))
        path = resolve_model_path(spec.pretrained_model_name_or_path, self.name)
        rev, var = spec.revision, spec.variant
        unet = load_component(UNet2DConditionModel, path, "unet", rev, var, FLAG)
        vae = load_component(AutoencoderKL, path, "vae", rev, var, FLAG)
        te1 = load_component(CLIPTextModel, path, "text_encoder", rev, var, FLAG)
        te2 = load_component(CLIPTextModelWithProjection, path, "text_encoder_2", rev, var, FLAG)
        tok1 = load_component(CLIPTokenizer, path, "tokenizer", rev, None, FLAG)
        tok2 = load_component(CLIPTokenizer, path, "tokenizer_2", rev, None, FLAG)
        sched = load_scheduler_config(path, rev, FLAG)
        return self.models_of(spec, (unet, vae, [te1, te2], [tok1, tok2], sched, path))

    def random_models(self, spec: FamilySpec, configs: ComponentConfigs) -> FamilyModels:
        with random_weights():
            unet = UNet2DConditionModel.from_config(configs.read("unet"))
            vae = AutoencoderKL.from_config(configs.read("vae"))
            te1 = random_text_encoder(CLIPTextModel, configs.read("text_encoder"))
            te2 = random_text_encoder(CLIPTextModelWithProjection, configs.read("text_encoder_2"))
        tokenizers = [tiny_tokenizer(), tiny_tokenizer()]
        parts = (unet, vae, [te1, te2], tokenizers, configs.read("scheduler"), configs.base_model)
        return self.models_of(spec, parts)

    def models_of(self, spec: FamilySpec, parts: tuple) -> FamilyModels:
        """FamilyModels of the (unet, vae, text_encoders, tokenizers, scheduler_config, source) of a load."""
        unet, vae, text_encoders, tokenizers, sched, source = parts
        for module in (unet, vae, *text_encoders):
            module.requires_grad_(False)
        student = self.student_of(unet, spec)
        return FamilyModels(unet, student, vae, text_encoders, tokenizers, sched, source, spec.resolution)

    @staticmethod
    def time_ids(resolution: int, batch: int, device) -> torch.Tensor:
        """(original_size, crop_top_left, target_size) micro-conditioning for uncropped square images, (B, 6)."""
        r = resolution
        return torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32, device=device).repeat(batch, 1)

    def encode_text(self, models, prompts, device) -> Conditioning:
        hidden, pooled = [], None
        for encoder, tokenizer in zip(models.text_encoders, models.tokenizers, strict=True):
            ids = tokenize(tokenizer, prompts, device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer of both encoders
            pooled = out[0]  # the projected pooled output of the second encoder
        ehs = torch.cat(hidden, dim=-1)
        empty = torch.tensor([p == "" for p in prompts], device=device)
        ehs = torch.where(empty[:, None, None], torch.zeros_like(ehs), ehs)
        pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        time_ids = self.time_ids(models.resolution, len(prompts), device).to(pooled.dtype)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return Conditioning(ehs, added)

    def encode_pixels(self, models, pixel_values):
        return encode_pixels_to_latents(models.vae, pixel_values)

    def pipeline(self, models, student, scheduler):
        pipe = StableDiffusionXLPipeline(
            vae=models.vae,
            text_encoder=models.text_encoders[0],
            text_encoder_2=models.text_encoders[1],
            tokenizer=models.tokenizers[0],
            tokenizer_2=models.tokenizers[1],
            unet=student,
            scheduler=scheduler,
            add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save_student(self, student: torch.nn.Module, folder: str) -> None:
        student.save_pretrained(f"{folder}/unet", safe_serialization=True)
