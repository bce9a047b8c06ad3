"""One PeRFlow training step (paper Algorithm 1, docs/method.md §3) on a batch, without any training loop.

The trainer wraps it in accelerate (autocast, gradient accumulation, backward); everything the method
defines happens here: the per-sample draws of (prompt dropout, t, window, eps), the student's and the
teacher's conditioning after dropout, and the reflow objective with its per-window breakdown.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from perflow_video.method.reflow_objective import ReflowConfig, ReflowOutput, reflow_loss, sample_times
from perflow_video.method.teacher_solver import Conditioning

#: Per-prompt conditioning -> what the UNet takes (the family's ``expand_conditioning``: the motion UNet
#: repeats it per frame; identity for image UNets).
Expand = Callable[[Conditioning], Conditioning]


class StepDraws(NamedTuple):
    """The randomness of one step, one row per sample.

    Attributes:
        drop: (B,) bool, the sample trains on the empty prompt (prompt dropout).
        t: (B,) float64 times in (0, 1]; window: (B,) long, their window indices.
        noise: (B, ...) eps ~ N(0, I), shaped like one latent per row (float32, CPU).
    """

    drop: Tensor
    t: Tensor
    window: Tensor
    noise: Tensor


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """Per-sample randomness from (seed, epoch, dataset index): independent of how batches are split."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + index) % (2**63 - 1))


def per_sample_draws(
    indices: Tensor,
    latent_shape: tuple[int, ...],
    seed: int,
    epoch: int,
    prompt_dropout: float,
    reflow: ReflowConfig,
    num_train_timesteps: int,
) -> StepDraws:
    """Draw (drop, t, window, noise) for the dataset items ``indices`` (B,), each from its own generator.

    Args:
        latent_shape: shape of one clean latent, e.g. (C, F, h, w).
        prompt_dropout: probability of training a sample on the empty prompt.
        reflow: the recipe (K windows; t on the discrete grid or not).
        num_train_timesteps: N, the teacher's number of discrete steps (grid of discrete t).
    """
    drops, ts, ks, noises = [], [], [], []
    for idx in indices.tolist():
        g = sample_generator(seed, epoch, idx)
        drops.append(bool(torch.rand(1, generator=g) < prompt_dropout))
        t, k = sample_times(1, reflow.num_time_windows, num_train_timesteps, reflow.discrete_time, g)
        ts.append(t)
        ks.append(k)
        noises.append(torch.randn(latent_shape, generator=g))
    return StepDraws(torch.tensor(drops), torch.cat(ts), torch.cat(ks), torch.stack(noises))


def rows_of(empty_text: Conditioning, n: int) -> Conditioning:
    """The one-row empty-prompt conditioning as ``n`` rows (a view, no copy)."""
    return empty_text.map(lambda x: x.expand(n, *x.shape[1:]))


def drop_prompts(text: Conditioning, empty_text: Conditioning, drop: Tensor) -> Conditioning:
    """Prompt dropout: row b is the empty prompt's where ``drop[b]``, else the batch's own.

    Args:
        text: per-prompt conditioning, B rows.
        empty_text: the empty prompt's, 1 row.
        drop: (B,) bool.
    """
    return text.where(drop, rows_of(empty_text, len(drop)))


def teacher_uncond(
    empty_text: Conditioning, n: int, reflow: ReflowConfig, expand: Expand
) -> Conditioning | None:
    """The teacher's unconditional input for n samples: the empty prompt under CFG-fixed, None under
    CFG-sync (``reflow.guidance_scale == 1``: the teacher sees only the student's prompt)."""
    if reflow.guidance_scale == 1.0:
        return None
    return expand(rows_of(empty_text, n))


def window_losses(result: ReflowOutput, num_windows: int) -> dict[str, Tensor]:
    """``loss_window_<k>``: the mean loss of the batch's samples in window k (windows it has samples in).

    Detached 0-d tensors on the loss's device: reading them (``.item()``) is left to whoever logs them.
    """
    logs = {}
    for k in range(num_windows):
        in_window = result.window == k
        if in_window.any():
            per_sample = result.loss_per_sample.detach()
            logs[f"loss_window_{k}"] = per_sample[in_window.to(per_sample.device)].mean()
    return logs


def perflow_step(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    z_0: Tensor,
    text: Conditioning,
    empty_text: Conditioning,
    draws: StepDraws,
    alphas_cumprod: Tensor,
    reflow: ReflowConfig,
    expand: Expand = lambda cond: cond,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The PeRFlow objective on one batch (paper Algorithm 1): prompt dropout, then :func:`reflow_loss` on
    the given draws (the teacher solves each sample's window, the student regresses the target).

    CFG-sync (``reflow.guidance_scale == 1``): the teacher sees the student's (possibly dropped) prompt.
    CFG-fixed: it also sees the empty prompt and guides with w = ``reflow.guidance_scale``.

    Args:
        student: the UNet being trained.
        teacher: the frozen UNet.
        z_0: (B, C, H, W) or (B, C, F, H, W) clean latents (times the VAE scaling factor).
        text: per-prompt conditioning of the batch, B rows; empty_text: the empty prompt's, 1 row.
        draws: the step's per-sample randomness (:func:`per_sample_draws`).
        alphas_cumprod: (N,) the teacher's abar.
        reflow: the recipe.
        expand: per-prompt conditioning -> the UNet's (``ModelFamily.expand_conditioning``).

    Returns:
        (scalar loss with gradient to the student, {``loss_window_<k>``: detached mean loss in window k}).
    """
    cond = expand(drop_prompts(text, empty_text, draws.drop))
    uncond = teacher_uncond(empty_text, len(draws.drop), reflow, expand)
    result = reflow_loss(
        student, teacher, z_0, alphas_cumprod, reflow, cond, uncond,
        noise=draws.noise.to(z_0.device), times=(draws.t, draws.window),
    )  # fmt: skip
    return result.loss, window_losses(result, reflow.num_time_windows)
