"""Latent sampling with any diffusers scheduler, and the distances the evidence reports.

One loop serves every row of the evidence: the teacher with DDIM / DPM-Solver++ / Euler / UniPC and the
student with :class:`~perflow_video.scheduler.PeRFlowScheduler`. It works on latents (no VAE, no text
encoder), so the same noise and conditioning go to every sampler and the comparison is of samplers only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from perflow_video.method.teacher_solver import Conditioning, unet_output


def guided_output(
    unet: torch.nn.Module,
    x: Tensor,
    timestep: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    guidance_scale: float,
) -> Tensor:
    """The UNet's output, with classifier-free guidance w = ``guidance_scale`` when w != 1 (paper eq. 9)."""
    if guidance_scale == 1.0 or uncond is None:
        return unet_output(unet(x, timestep, **cond.unet_kwargs()))
    timesteps = torch.cat([timestep, timestep]) if timestep.ndim == 1 else timestep  # one per row of [x, x]
    both = unet_output(unet(torch.cat([x, x]), timesteps, **Conditioning.cat(uncond, cond).unet_kwargs()))
    out_u, out_c = both.chunk(2)
    return out_u + guidance_scale * (out_c - out_u)


@torch.no_grad()
def sample_latents(
    unet: torch.nn.Module,
    scheduler,
    noise: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None = None,
    steps: int = 4,
    guidance_scale: float = 1.0,
) -> Tensor:
    """Run ``scheduler`` for ``steps`` steps from ``noise`` (B, ...) and return the final latents.

    ``cond`` / ``uncond`` are already in the UNet's layout (per frame for a motion UNet). The number of
    UNet evaluations is ``steps`` (x2 with guidance), times the scheduler's order for multistep ones.
    """
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        out = guided_output(unet, model_in, t.expand(x.shape[0]), cond, uncond, guidance_scale)
        x = scheduler.step(out, t, x).prev_sample
    return x


def rms_distance(a: Tensor, b: Tensor) -> float:
    """Root-mean-square difference of two batches of latents (one number for the whole batch)."""
    return float((a.float() - b.float()).pow(2).mean().sqrt())


def per_sample_rms(a: Tensor, b: Tensor) -> Tensor:
    """(B,) root-mean-square difference per sample."""
    return (a.float() - b.float()).pow(2).reshape(a.shape[0], -1).mean(dim=1).sqrt()
