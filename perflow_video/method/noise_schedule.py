"""The teacher's discrete noise schedule: betas -> alphas_cumprod (abar), as diffusers builds it.

PeRFlow never invents its own schedule: the teacher solver and the scheduler both read the
teacher's ``alphas_cumprod`` (docs/method.md §1; AnimateDiff uses ``linear`` betas, SD ``scaled_linear``).
We rebuild it exactly like diffusers' DDIM/DDPM schedulers (float32 betas) so that our windows land
on bit-identical abar values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Glide cosine schedule (diffusers ``betas_for_alpha_bar``, cosine)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Sequence[float] | None = None,
) -> torch.Tensor:
    """Betas of the teacher, float32, shape (num_train_timesteps,).

    Raises:
        ValueError: for an unknown ``beta_schedule`` (the message lists the valid ones).
    """
    if trained_betas is not None:
        betas = torch.tensor(list(trained_betas), dtype=torch.float32)
        if betas.numel() != num_train_timesteps:
            raise ValueError(
                f"trained_betas has {betas.numel()} entries, num_train_timesteps is {num_train_timesteps}"
            )
        return betas
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas(num_train_timesteps)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; choose one of {BETA_SCHEDULES}")


def make_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
    trained_betas: Sequence[float] | None = None,
) -> torch.Tensor:
    """abar[i] = prod_{j<=i} (1 - beta_j), float32, shape (num_train_timesteps,). Defaults: SD 1.x."""
    betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
    return torch.cumprod(1.0 - betas, dim=0)


def unsupported_schedule_reason(config: dict) -> str | None:
    """Why PeRFlow cannot train on or sample a teacher with this scheduler config, or None: a schedule rescaled to
    zero terminal SNR (``rescale_betas_zero_snr``) has abar_T = 0, and PeRFlow's first window (parameterizations A
    and B, the DDIM teacher solver) divides by sqrt(abar) at t = 1."""
    if config.get("rescale_betas_zero_snr"):
        return (
            "the teacher's scheduler config has rescale_betas_zero_snr=true (abar = 0 at the last timestep); "
            "PeRFlow's windows and teacher solver divide by sqrt(abar) at t = 1 and do not support it yet"
        )
    return None


def alphas_cumprod_from_scheduler_config(config: dict) -> torch.Tensor:
    """abar of any diffusers scheduler config (DDIM, DDPM, PeRFlow, ...), read the way diffusers reads it.

    Raises:
        ValueError: a schedule PeRFlow does not support (:func:`unsupported_schedule_reason`).
    """
    reason = unsupported_schedule_reason(config)
    if reason:
        raise ValueError(reason)
    return make_alphas_cumprod(
        num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        beta_start=float(config.get("beta_start", 0.0001)),
        beta_end=float(config.get("beta_end", 0.02)),
        beta_schedule=str(config.get("beta_schedule", "linear")),
        trained_betas=config.get("trained_betas"),
    )
