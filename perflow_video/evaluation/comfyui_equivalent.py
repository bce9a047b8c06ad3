"""What ComfyUI does with a PeRFlow student, restated to measure it (README "Sampler settings there").

ComfyUI samples an epsilon model in sigma space, x = z / sqrt(abar) with sigma = sqrt((1 - abar) / abar):
the `simple` scheduler takes the sigmas of timesteps 999, 749, 499, 249 (for 4 steps of 1000) and 0; the
model sees z = x / sqrt(1 + sigma^2) at the timestep of its sigma; `euler` (and `ddim`, which ComfyUI runs
as Euler) steps x += (sigma_next - sigma) * eps. One such step between two sigmas is a DDIM step, so with
a parameterization-B student this is our 4-step schedule except that the student is queried at 999 / 749 /
499 / 249 instead of 1000 / 750 / 500 / 250, starts from noise * sigma_max and ends at sigma = 0 (abar = 1)
instead of abar_0. This module runs that loop on latents so the difference can be measured; it restates
ComfyUI's documented rules (comfy/samplers.py simple_scheduler, k-diffusion's sample_euler), it is not
ComfyUI.
"""

from __future__ import annotations

import torch
from torch import Tensor

from perflow_video.method.teacher_solver import Conditioning, unet_output


def simple_schedule_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """ComfyUI's `simple` scheduler: timestep indices -(1 + int(x * N / steps)) of the N-entry table."""
    stride = num_train_timesteps / steps
    return [num_train_timesteps - 1 - int(x * stride) for x in range(steps)]


@torch.no_grad()
def comfyui_euler_simple(
    unet: torch.nn.Module, noise: Tensor, cond: Conditioning, alphas_cumprod: Tensor, steps: int = 4
) -> Tensor:
    """The latent (z at abar = 1, i.e. x at sigma = 0) that ComfyUI's euler + simple would produce."""
    abar = alphas_cumprod.double()
    sigma_of = lambda tau: ((1 - abar[tau]) / abar[tau]).sqrt()  # noqa: E731
    taus = simple_schedule_timesteps(steps, abar.numel())
    sigmas = [sigma_of(t) for t in taus] + [torch.tensor(0.0, dtype=torch.float64)]
    x = noise.double() * sigmas[0]
    for i, tau in enumerate(taus):
        z = (x / (1 + sigmas[i] ** 2).sqrt()).to(noise.dtype)
        timestep = torch.full((noise.shape[0],), float(tau))
        eps = unet_output(unet(z, timestep, **cond.unet_kwargs())).double()
        x = x + (sigmas[i + 1] - sigmas[i]) * eps
    return x.to(noise.dtype)
