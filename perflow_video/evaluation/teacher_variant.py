"""A fine-tuned variant of a tiny teacher: the stand-in for a community SD1.5 checkpoint (docs/evidence.md,
claim (f), "plug-and-play").

Community checkpoints that AnimateDiff users swap in are *image* fine-tunes of SD1.5: new spatial UNet
weights, the same VAE, text encoder and motion module. The variant here is made the same way: the teacher's
spatial ``UNet2DConditionModel`` alone is fine-tuned with its objective (epsilon, or v for a zero-SNR teacher) on single frames of a
shape world whose objects are drawn smaller (radius 3 - 4.5 pixels instead of 4.5 - 7; the teacher's VAE
reconstructs them at ~32 dB, while a new background or palette it has never seen it cannot: 8 - 19 dB).
The VAE, text encoder, tokenizer, scheduler and motion adapter are copied unchanged, so the variant is a
diffusers AnimateDiff folder like the teacher's, and a ΔW trained on the teacher can be added to it as is.

:func:`finetune_variant` resumes from ``<out>/training/checkpoint.pt`` (written to a temporary name, then
renamed; a checkpoint of other settings is refused) and writes the folder so that a crash never leaves one
that looks complete; :func:`object_area` measures what changed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

from perflow_video.atomic_files import atomic_destination
from perflow_video.errors import ConfigError
from perflow_video.tiny.teacher_training import draw_timesteps, prediction_errors
from perflow_video.toy.probe import FOREGROUND_DISTANCE
from perflow_video.toy.shape_world import ShapeWorld, ShapeWorldConfig
from perflow_video.toy.toy_clips import BACKGROUND

VARIANT_INFO = "variant_info.json"
CHECKPOINT = "checkpoint.pt"
MODEL_INDEX = "model_index.json"  # its presence marks a complete diffusers folder


@dataclass(frozen=True)
class VariantConfig:
    """What the variant learns and how (the defaults made docs/evidence/tiny-variant-cfg5's variant)."""

    min_radius: float = 3.0  # the variant's objects: half-size bounds in pixels (the teacher's: 4.5 - 7)
    max_radius: float = 4.5
    steps: int = 600  # optimizer steps
    frames_per_step: int = 32  # single frames, each from its own clip and caption
    learning_rate: float = 1e-4  # AdamW, linear warm-up then constant
    warmup: int = 50
    drop_prompt: float = 0.1  # captions replaced by "" (keeps classifier-free guidance working)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.min_radius <= self.max_radius:
            raise ConfigError(
                f"radius bounds must satisfy 0 < min <= max, got {self.min_radius}, {self.max_radius}"
            )
        for name in ("steps", "frames_per_step"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be >= 0, got {self.warmup}")

    def world(self) -> ShapeWorld:
        """All 72 prompts, objects within the variant's radius bounds."""
        cfg = ShapeWorldConfig(min_radius=self.min_radius, max_radius=self.max_radius)
        return ShapeWorld("all", seed=self.seed + 0xA11, config=cfg, drop_prompt=self.drop_prompt)


@dataclass
class VariantParts:
    """The frozen parts of the teacher and the spatial UNet being fine-tuned."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    alphas_cumprod: Tensor
    prediction_type: str  # the teacher's: epsilon (AnimateDiff's) or v_prediction (zero terminal SNR)

    @classmethod
    def load(cls, teacher: Path) -> VariantParts:
        vae = AutoencoderKL.from_pretrained(teacher / "vae").eval().requires_grad_(False)
        text = CLIPTextModel.from_pretrained(teacher / "text_encoder").eval().requires_grad_(False)
        scheduler = DDIMScheduler.from_pretrained(teacher / "scheduler")
        unet = UNet2DConditionModel.from_pretrained(teacher / "unet")
        return cls(unet, vae, text, CLIPTokenizer.from_pretrained(teacher / "tokenizer"),
                   scheduler.alphas_cumprod, scheduler.config.prediction_type)  # fmt: skip

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> Tensor:
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids  # fmt: skip
        return self.text_encoder(ids)[0]


def frame_batch(world: ShapeWorld, step: int, n: int) -> tuple[Tensor, list[str]]:
    """``n`` single frames for ``step``, one random frame of each of ``n`` consecutive clips, with captions."""
    clips, captions = world.batch(step * n, n)
    idx = np.random.default_rng([world.seed, 0xF4A, step]).integers(0, clips.shape[2], n)
    return clips[torch.arange(n), :, torch.as_tensor(idx)], captions


def denoising_loss(parts: VariantParts, frames: Tensor, captions: list[str], gen: torch.Generator) -> Tensor:
    """The teacher's DDPM objective (epsilon or v) for the spatial UNet on (n, 3, H, W) frames (uniform t)."""
    with torch.no_grad():
        z0 = parts.vae.encode(frames).latent_dist.sample(generator=gen) * parts.vae.config.scaling_factor
    noise = torch.randn(z0.shape, generator=gen)
    t = draw_timesteps(z0.shape[0], gen, "uniform", len(parts.alphas_cumprod))
    hidden = parts.encode_text(captions)
    return prediction_errors(
        parts.unet, z0, noise, t, hidden, parts.alphas_cumprod, parts.prediction_type
    ).mean()


def _lr_factor(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


def _run_identity(teacher: Path, config: VariantConfig) -> dict:
    """What a checkpoint must agree on to be resumed: the teacher and every setting but the step count."""
    return {"teacher": str(teacher), **{k: v for k, v in asdict(config).items() if k != "steps"}}


def _save_checkpoint(path: Path, parts: VariantParts, optimizer, step: int, losses: list[float],
                     identity: dict) -> None:  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_destination(path) as tmp:
        state = {"unet": parts.unet.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
        torch.save({**state, "losses": losses, "identity": identity}, tmp)


def _check_resumable(path: Path, state: dict, identity: dict, steps: int) -> None:
    """A checkpoint of another teacher or other settings, or past ``steps``, is an error naming the keys."""
    differ = sorted(k for k in identity if state.get("identity", {}).get(k) != identity[k])
    if differ:
        raise ConfigError(
            f"{path}: this checkpoint was made with other settings ({', '.join(differ)}); use another "
            "--out or the same settings"
        )
    if state["step"] > steps:
        raise ConfigError(f"{path}: the checkpoint is at step {state['step']}, past --steps {steps}")


def finetune_variant(
    teacher: Path,
    out: Path,
    config: VariantConfig,
    progress: Callable[[int, int, float], None] | None = None,
    checkpoint_every: int = 100,
) -> dict:
    """Fine-tune ``teacher``'s spatial UNet into the variant and write the variant folder to ``out``.

    Resumes from ``out/training/checkpoint.pt`` when one exists. ``progress(step, steps, loss)`` is called
    after every step. Returns the run's summary (also in ``out/variant_info.json``).
    """
    parts = VariantParts.load(teacher)
    parts.unet.train()
    optimizer = torch.optim.AdamW(parts.unet.parameters(), lr=config.learning_rate, weight_decay=0.0)
    ckpt_path, identity = out / "training" / CHECKPOINT, _run_identity(teacher, config)
    step, losses = 0, []
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, weights_only=True)
        _check_resumable(ckpt_path, state, identity, config.steps)
        parts.unet.load_state_dict(state["unet"])
        optimizer.load_state_dict(state["optimizer"])
        step, losses = state["step"], list(state["losses"])
    world = config.world()
    while step < config.steps:
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * _lr_factor(step, config.warmup)
        frames, captions = frame_batch(world, step, config.frames_per_step)
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        loss = denoising_loss(parts, frames, captions, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parts.unet.parameters(), 1.0)
        optimizer.step()
        step += 1
        losses.append(round(loss.item(), 6))
        if progress is not None:
            progress(step, config.steps, losses[-1])
        if step % checkpoint_every == 0 or step == config.steps:
            _save_checkpoint(ckpt_path, parts, optimizer, step, losses, identity)
    summary = {"teacher": str(teacher), "config": asdict(config), "steps_done": step,
               "loss_first_50": _mean(losses[:50]), "loss_last_50": _mean(losses[-50:])}  # fmt: skip
    write_variant_folder(teacher, out, parts.unet.eval(), summary)
    return summary


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 6) if values else None


def write_variant_folder(teacher: Path, out: Path, unet: UNet2DConditionModel, summary: dict) -> None:
    """``teacher``'s folder with ``unet/`` replaced by ``unet`` and a ``variant_info.json``.

    Built in ``out/.variant.tmp`` and moved into ``out`` part by part (``out/training/`` is kept), with
    ``model_index.json`` — what makes a folder a loadable model — removed first and moved in last: a crash
    midway leaves a folder that does not load, never one that looks complete (a rerun finishes it).
    """
    staging = out / ".variant.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(teacher, staging, ignore=shutil.ignore_patterns("unet", "training", ".*"))
    unet.save_pretrained(staging / "unet", safe_serialization=True)
    (staging / VARIANT_INFO).write_text(json.dumps(summary, indent=2) + "\n")
    (out / MODEL_INDEX).unlink(missing_ok=True)
    for name in sorted(os.listdir(staging), key=lambda n: (n == MODEL_INDEX, n)):
        dest = out / name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(staging / name, dest)
    staging.rmdir()


def object_area(pixels: Tensor, background: tuple[int, int, int] = BACKGROUND) -> float:
    """Mean object area in pixels over the frames of (3, F, H, W) clips in [-1, 1]: pixels further than the
    probe's foreground distance from the background (frames without an object count as 0)."""
    rgb = (pixels.float().clamp(-1, 1) + 1) * 127.5
    bg = torch.tensor(background, dtype=torch.float32).view(3, 1, 1, 1)
    return float(((rgb - bg).norm(dim=0) > FOREGROUND_DISTANCE).float().sum(dim=(1, 2)).mean())


def disc_area(radius: float) -> float:
    """Area of a disc of ``radius`` pixels (for reading :func:`object_area`)."""
    return math.pi * radius * radius
