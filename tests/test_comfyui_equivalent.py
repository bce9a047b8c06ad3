"""ComfyUI's euler + simple schedule (restated) against our 4-step PeRFlow-B schedule on the same UNet."""

from __future__ import annotations

import torch

from perflow_video.evaluation.comfyui_equivalent import comfyui_euler_simple, simple_schedule_timesteps
from perflow_video.evaluation.sampling import rms_distance, sample_latents
from perflow_video.method.noise_schedule import alphas_cumprod_from_scheduler_config
from perflow_video.method.teacher_solver import Conditioning
from perflow_video.scheduler import perflow_scheduler_for
from perflow_video.tiny.tiny_models import tiny_scheduler, tiny_unet_motion


def test_simple_schedule_picks_the_window_starts_minus_one():
    assert simple_schedule_timesteps(4) == [999, 749, 499, 249]
    assert simple_schedule_timesteps(8)[:3] == [999, 874, 749]


def test_comfyui_settings_follow_our_4_step_schedule_closely():
    """On a UNet where a step matters (the tiny motion UNet), ComfyUI's euler + simple at 4 steps lands
    within a few percent of our PeRFlow-4 sample (both B), far closer than a DDIM-4 with linspace spacing."""
    from diffusers import DDIMScheduler

    torch.manual_seed(0)
    unet = tiny_unet_motion(seed=0).eval()
    config = dict(tiny_scheduler("animatediff").config)
    abar = alphas_cumprod_from_scheduler_config(config)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 4, 4, 8, 8, generator=gen)
    cond = Conditioning(torch.randn(2, 77, 32, generator=gen).repeat_interleave(4, dim=0))
    ours = sample_latents(unet, perflow_scheduler_for(config, "ddim_eps", 4), noise, cond, None, 4)
    comfy = comfyui_euler_simple(unet, noise, cond, abar, 4)
    linspace = sample_latents(unet, DDIMScheduler.from_config(config), noise, cond, None, 4)
    scale = float(ours.pow(2).mean().sqrt())
    gap = rms_distance(comfy, ours)
    assert gap < 0.05 * scale, (gap, scale)
    assert gap < 0.2 * rms_distance(linspace, ours)
