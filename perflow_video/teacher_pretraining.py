"""Denoising pretraining of a tiny teacher on the toy data, so the embedded default has a real teacher.

A randomly initialised UNet predicts eps ~ 0 everywhere: its DDIM trajectories are straight, and PeRFlow
has nothing to learn from it. A few hundred steps of the ordinary diffusion loss (eps-prediction,
the teacher's own noise schedule) on the toy clips give it data-dependent, curved trajectories.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .families import FamilyModels, ModelFamily
from .teacher_solver import unet_output

logger = logging.getLogger(__name__)


def pretrain_teacher(
    family: ModelFamily,
    models: FamilyModels,
    alphas_cumprod: torch.Tensor,
    dataset: torch.utils.data.Dataset,
    steps: int,
    batch_size: int = 2,
    learning_rate: float = 1e-3,
    prompt_dropout: float = 0.1,
    seed: int = 0,
) -> list[float]:
    """Train ``models.teacher`` in place with the eps-prediction loss; returns the loss per step (CPU)."""
    teacher = models.teacher
    teacher.train().requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=gen
    )
    opt = torch.optim.AdamW(teacher.parameters(), lr=learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    losses: list[float] = []
    while len(losses) < steps:
        for batch in loader:
            with torch.no_grad():
                z0 = family.encode_pixels(models, batch["pixel_values"]).float()
                keep = torch.rand(len(batch["prompt"]), generator=gen) >= prompt_dropout
                prompts = [p if k else "" for p, k in zip(batch["prompt"], keep.tolist(), strict=True)]
                cond = family.encode_prompts(models, prompts, z0.device)
            tau = torch.randint(0, alphas_cumprod.numel(), (z0.shape[0],), generator=gen)
            noise = torch.randn(z0.shape, generator=gen)
            a = alphas_cumprod[tau].reshape(-1, *([1] * (z0.ndim - 1)))
            z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
            loss = F.mse_loss(unet_output(teacher(z_t, tau, **cond.unet_kwargs())), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if len(losses) % 50 == 0:
                logger.info("teacher pretraining step %d/%d: loss %.4f", len(losses), steps, loss.item())
            if len(losses) >= steps:
                break
    teacher.eval().requires_grad_(False)
    return losses
