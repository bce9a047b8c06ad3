"""The windowed reflow objective of paper Algorithm 1 (docs/method.md §3), usable without any training loop.

For each sample: draw t and its window [t_s, t_e]; z_s from real data; z_e = phi(z_s) by the frozen
teacher; z_t on the straight segment; the student's output at (z_t, 1000 t, c) regresses the target
of the chosen parameterization.

Loss weighting (``loss_weighting``):

* ``uniform`` — plain MSE on the prediction (the reference implementation).
* ``endpoint`` — MSE times eta_t**2, the squared sensitivity of the window end the prediction implies
  (``Parameterization.endpoint_sensitivity``). An eps error reaches the sampled latent multiplied by
  about |eta_k| (~2.5 in SD's first window), so this weights the loss by its effect on the sample.
  On the 2-D toy benchmark (``scripts/benchmark_toy.py``) it gives the better 4-step sampler; it is
  the project's default (see README, "Loss weighting").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, get_args

import torch
from torch import Tensor

from perflow_video.method.parameterization import PredictionType, expand_like, get_parameterization
from perflow_video.method.teacher_solver import (
    TEACHER_SOLVERS,
    Conditioning,
    TeacherPredictionType,
    TeacherSolver,
    solve_window,
    unet_output,
)
from perflow_video.method.time_windows import abar_at, window_index

LossWeighting = Literal["uniform", "endpoint"]  # plain MSE | MSE times eta_t**2 (module docstring)
LOSS_WEIGHTINGS: tuple[str, ...] = get_args(LossWeighting)


@dataclass
class ReflowConfig:
    """The PeRFlow recipe (paper defaults for SD: K = 4, M = 8)."""

    # Each annotation carries the field's one-line meaning (listed by the training CLI's --help-config).
    num_time_windows: Annotated[int, "K, uniform windows on t in [0, 1]"] = 4
    solver_steps: Annotated[int, "M, teacher forwards inside one window (DDIM steps for solver=ddim)"] = 8
    solver: Annotated[
        TeacherSolver, "teacher ODE solver in a window: ddim (paper) | dpm++ | unipc (docs/teacher_solver.md)"
    ] = "ddim"
    parameterization: Annotated[
        PredictionType, "what the student predicts: ddim_eps = B (eq. 8), diff_eps = A (eq. 7)"
    ] = "ddim_eps"
    guidance_scale: Annotated[float, "teacher CFG w: 1.0 = CFG-sync, e.g. 7.5 = CFG-fixed"] = 1.0
    loss_weighting: Annotated[LossWeighting, "endpoint: MSE times eta_t**2; uniform: plain MSE"] = "endpoint"
    discrete_time: Annotated[bool, "draw t on the grid {1/N, ..., 1} instead of uniformly in (0, 1]"] = False
    teacher_prediction_type: Annotated[
        TeacherPredictionType, "what the teacher predicts (SD2.1: v_prediction)"
    ] = "epsilon"

    def __post_init__(self):
        if self.num_time_windows < 1:
            raise ValueError(f"num_time_windows must be >= 1, got {self.num_time_windows}")
        if self.solver_steps < 1:
            raise ValueError(f"solver_steps must be >= 1, got {self.solver_steps}")
        if self.solver not in TEACHER_SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {TEACHER_SOLVERS}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"unknown loss_weighting {self.loss_weighting!r}; choose one of {LOSS_WEIGHTINGS}"
            )
        if self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 = CFG-sync), got {self.guidance_scale}")
        get_parameterization(self.parameterization)  # validates the name


@dataclass
class ReflowOutput:
    """What one evaluation of the objective returns.

    Attributes:
        loss: scalar, the batch mean of ``loss_per_sample``.
        loss_per_sample: (B,) weighted MSE per sample.
        t: (B,) the drawn times; window: (B,) their window indices (for per-window logging).
    """

    loss: Tensor
    loss_per_sample: Tensor
    t: Tensor
    window: Tensor


def sample_times(
    batch_size: int,
    num_windows: int,
    num_train_timesteps: int,
    discrete: bool,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Draw t in (0, 1] and its window index, float64 / long, shape (B,), on the CPU."""
    if discrete:
        tau = torch.randint(1, num_train_timesteps + 1, (batch_size,), generator=generator)
        t = tau.double() / num_train_timesteps
        return t, window_index(t, num_windows, num_train_timesteps)
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64)  # in [0, 1)
    # The window comes from u directly, so t = t_s exactly is in window k and no t sits on a wrong edge.
    return 1.0 - u, torch.floor(u * num_windows).long().clamp(max=num_windows - 1)


@dataclass
class ReflowTargets:
    """The teacher's half of one evaluation of the objective: where the student is queried and what it
    must predict there. Independent of the student, so a fixed set can be computed once (evaluation).

    Attributes:
        z_t: (B, ...) the point on the straight segment z_s -> z_e at time t.
        timestep: (B,) float32, 1000 t, the student's timestep input.
        target: (B, ...) the parameterization's regression target.
        weight: (B,) the per-sample loss weight (1, or eta_t**2 for ``endpoint``).
        t: (B,) float64 times; window: (B,) long window indices.
    """

    z_t: Tensor
    timestep: Tensor
    target: Tensor
    weight: Tensor
    t: Tensor
    window: Tensor


def window_start_times(indices: Tensor, num_windows: int) -> tuple[Tensor, Tensor]:
    """Item i at t = t_s of window i mod K (where a K-step sampler queries the student); (t, window)."""
    k = torch.as_tensor(indices).reshape(-1).long() % num_windows
    return 1.0 - k.double() / num_windows, k


@torch.no_grad()
def reflow_targets(
    teacher: torch.nn.Module,
    z_0: Tensor,
    alphas_cumprod: Tensor,
    config: ReflowConfig,
    cond: Conditioning,
    uncond: Conditioning | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    times: tuple[Tensor, Tensor] | None = None,
) -> ReflowTargets:
    """Steps 2-6 of paper Algorithm 1: draw t and its window, z_s from data, z_e = phi(z_s) by the frozen
    teacher, z_t on the segment, and the parameterization's target (docs/method.md §3).

    Args: as :func:`reflow_loss` (without the student).
    """
    param = get_parameterization(config.parameterization)
    n_train = alphas_cumprod.numel()
    K = config.num_time_windows
    bsz = z_0.shape[0]
    t64, k = times if times is not None else sample_times(bsz, K, n_train, config.discrete_time, generator)
    t_s64 = 1.0 - k.double() / K
    t_e64 = 1.0 - (k.double() + 1.0) / K
    if noise is None:
        noise = torch.randn(z_0.shape, generator=generator, dtype=z_0.dtype).to(z_0.device)

    device, dtype = z_0.device, z_0.dtype
    abar_s = abar_at(t_s64, alphas_cumprod).to(device=device, dtype=dtype)
    abar_e = abar_at(t_e64, alphas_cumprod).to(device=device, dtype=dtype)
    t, t_s, t_e = (x.to(device=device, dtype=dtype) for x in (t64, t_s64, t_e64))

    z_s = expand_like(abar_s.sqrt(), z_0) * z_0 + expand_like((1.0 - abar_s).sqrt(), z_0) * noise
    z_e = solve_window(
        teacher,
        z_s,
        t_s64,
        t_e64,
        alphas_cumprod,
        cond,
        uncond,
        config.guidance_scale,
        config.solver_steps,
        config.teacher_prediction_type,
        solver=config.solver,
    ).to(dtype)
    z_t = z_s + (z_e - z_s) * expand_like((t - t_s) / (t_e - t_s), z_s)
    target = param.target(z_s, z_e, t_s, t_e, abar_s, abar_e)
    if config.loss_weighting == "endpoint":
        weight = param.endpoint_sensitivity(t, t_s, t_e, abar_s, abar_e).float() ** 2
    else:
        weight = torch.ones(bsz, device=device)
    timestep = (t64 * n_train).to(device=device, dtype=torch.float32)
    return ReflowTargets(z_t, timestep, target, weight, t64, k)


def student_loss(student: torch.nn.Module, targets: ReflowTargets, cond: Conditioning) -> ReflowOutput:
    """Steps 7-8 of paper Algorithm 1: the student's prediction at (z_t, 1000 t, c) against the target."""
    prediction = unet_output(student(targets.z_t, targets.timestep, **cond.unet_kwargs()))
    sq_err = (prediction.float() - targets.target.float()) ** 2
    per_sample = sq_err.reshape(sq_err.shape[0], -1).mean(dim=1) * targets.weight.to(sq_err.device)
    return ReflowOutput(
        loss=per_sample.mean(), loss_per_sample=per_sample, t=targets.t, window=targets.window
    )


def reflow_loss(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    z_0: Tensor,
    alphas_cumprod: Tensor,
    config: ReflowConfig,
    cond: Conditioning,
    uncond: Conditioning | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    times: tuple[Tensor, Tensor] | None = None,
) -> ReflowOutput:
    """One evaluation of the PeRFlow objective (paper Algorithm 1): :func:`reflow_targets` then
    :func:`student_loss`.

    Args:
        student: UNet-like module being trained (called with timestep 1000 t, float).
        teacher: frozen UNet-like module (see ``teacher_solver``).
        z_0: (B, C, H, W) or (B, C, F, H, W) clean latents (already times the VAE scaling factor).
        alphas_cumprod: (N,) the teacher's abar.
        config: the recipe.
        cond: conditioning of the prompts (after prompt dropout); the student sees only this.
        uncond: empty-prompt conditioning, needed when ``config.guidance_scale != 1`` (CFG-fixed).
        noise: optional eps ~ N(0, I) like z_0 (drawn with ``generator`` if None).
        generator: CPU generator for t (and noise); makes the draw reproducible.
        times: optional (t, window) pair overriding the draw (tests, evaluation).
    Returns:
        ReflowOutput.
    """
    targets = reflow_targets(teacher, z_0, alphas_cumprod, config, cond, uncond, noise, generator, times)
    return student_loss(student, targets, cond)
