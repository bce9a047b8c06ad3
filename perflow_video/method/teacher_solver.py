"""The teacher window solver phi(z_s, t_s, t_e; c, w) of paper Algorithm 1 (docs/method.md §3, step 4).

Deterministic DDIM (eta = 0) in M steps inside one window, without gradients (the paper's solver and the
default). Two second-order multistep solvers of the same probability-flow ODE can replace it
(``solver="dpm++"``: DPM-Solver++(2M); ``solver="unipc"``: UniPC-2 with B(h) = e^h - 1), on the same grid
and with the same M teacher evaluations: they reach the window end with fewer evaluations for the same
error (docs/teacher_solver.md). Both are written here as small per-sample functions, so that samples of one
batch may sit in different windows, and are tested against diffusers' ``DPMSolverMultistepScheduler`` and
``UniPCMultistepScheduler`` (tests/test_teacher_solver.py). The teacher is any
module called like a diffusers UNet: ``model(sample, timestep, encoder_hidden_states=..., ...)``
returning a tensor or an object with ``.sample`` — a ``UNet2DConditionModel`` (4-D latents), an SDXL
UNet (with ``added_cond_kwargs``) or a ``UNetMotionModel`` (5-D latents (B, C, F, H, W) and per-frame
prompt embeddings). The solver never looks inside the conditioning; the family adapter builds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from perflow_video.method.parameterization import expand_like
from perflow_video.method.time_windows import abar_index_of_time

TeacherPredictionType = Literal["epsilon", "v_prediction"]  # the teacher's diffusers prediction_type
TEACHER_PREDICTION_TYPES: tuple[str, ...] = get_args(TeacherPredictionType)
TeacherSolver = Literal["ddim", "dpm++", "unipc"]  # the ODE solver inside a window (module docstring)
TEACHER_SOLVERS: tuple[str, ...] = get_args(TeacherSolver)
GridSpacing = Literal[
    "time", "log_snr"
]  # solver grid uniform in t (the paper's) or in lambda = log(alpha/sigma)
GRID_SPACINGS: tuple[str, ...] = get_args(GridSpacing)


@dataclass
class Conditioning:
    """Everything a UNet needs besides (sample, timestep), passed through untouched.

    Attributes:
        encoder_hidden_states: text embeddings, (B, seq, dim); for a motion UNet already repeated per
            frame, (B·F, seq, dim) in b-major order. None for unconditional toy models.
        added_cond_kwargs: SDXL micro-conditioning, e.g. {"text_embeds": (B, D), "time_ids": (B, 6)}.
    """

    encoder_hidden_states: Tensor | None = None
    added_cond_kwargs: dict[str, Tensor] | None = None

    def unet_kwargs(self) -> dict:
        """Keyword arguments for a diffusers UNet call (only those that are set)."""
        kwargs = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = self.added_cond_kwargs
        return kwargs

    def map(self, fn) -> Conditioning:
        """Apply ``fn`` to every tensor (e.g. ``lambda x: x.to(device)``)."""
        ehs = None if self.encoder_hidden_states is None else fn(self.encoder_hidden_states)
        added = (
            None if self.added_cond_kwargs is None else {k: fn(v) for k, v in self.added_cond_kwargs.items()}
        )
        return Conditioning(ehs, added)

    def where(self, mask: Tensor, other: Conditioning) -> Conditioning:
        """Row b from ``other`` where mask[b] (prompt dropout), else from self; mask: (B,) bool."""

        def pick(mine: Tensor, theirs: Tensor) -> Tensor:
            return torch.where(
                mask.to(mine.device).reshape(-1, *[1] * (mine.ndim - 1)), theirs.to(mine.dtype), mine
            )

        ehs = None
        if self.encoder_hidden_states is not None:
            ehs = pick(self.encoder_hidden_states, other.encoder_hidden_states)
        added = None
        if self.added_cond_kwargs is not None:
            added = {k: pick(v, other.added_cond_kwargs[k]) for k, v in self.added_cond_kwargs.items()}
        return Conditioning(ehs, added)

    @staticmethod
    def cat(first: Conditioning, second: Conditioning) -> Conditioning:
        """Concatenate along the batch axis ([uncond, cond] for classifier-free guidance)."""
        ehs = None
        if first.encoder_hidden_states is not None:
            ehs = torch.cat([first.encoder_hidden_states, second.encoder_hidden_states])
        added = None
        if first.added_cond_kwargs is not None:
            added = {
                k: torch.cat([v, second.added_cond_kwargs[k]]) for k, v in first.added_cond_kwargs.items()
            }
        return Conditioning(ehs, added)


def unet_output(result) -> Tensor:
    """The tensor of a UNet call, whether it returned a tensor, a tuple or an output with ``.sample``."""
    if isinstance(result, Tensor):
        return result
    if hasattr(result, "sample"):
        return result.sample
    return result[0]


def eps_from_model_output(output: Tensor, z: Tensor, abar: Tensor, prediction_type: str) -> Tensor:
    """Teacher output -> eps. v_prediction (SD2.1): eps = sqrt(abar) v + sqrt(1 - abar) z."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return expand_like(abar.sqrt(), z) * output + expand_like((1.0 - abar).sqrt(), z) * z
    raise ValueError(
        f"unknown teacher prediction_type {prediction_type!r}; choose one of {TEACHER_PREDICTION_TYPES}"
    )


def ddim_step(z: Tensor, eps: Tensor, abar_from: Tensor, abar_to: Tensor) -> Tensor:
    """Deterministic DDIM (eta = 0) from noise level abar_from to abar_to with the given eps."""
    x0 = (z - expand_like((1.0 - abar_from).sqrt(), z) * eps) / expand_like(abar_from.sqrt(), z)
    return expand_like(abar_to.sqrt(), z) * x0 + expand_like((1.0 - abar_to).sqrt(), z) * eps


def guided_eps(
    model: torch.nn.Module,
    z: Tensor,
    timestep: Tensor,
    abar: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    guidance_scale: float,
    prediction_type: str,
) -> Tensor:
    """One teacher evaluation, with classifier-free guidance when guidance_scale != 1 (then in eps space)."""
    if guidance_scale == 1.0:
        out = unet_output(model(z, timestep, **cond.unet_kwargs()))
        return eps_from_model_output(out, z, abar, prediction_type)
    if uncond is None:
        raise ValueError("guidance_scale != 1 needs the unconditional (empty-prompt) conditioning")
    both = Conditioning.cat(uncond, cond)
    out = unet_output(model(torch.cat([z, z]), torch.cat([timestep, timestep]), **both.unet_kwargs()))
    eps_u, eps_c = eps_from_model_output(
        out, torch.cat([z, z]), torch.cat([abar, abar]), prediction_type
    ).chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


def half_log_snr(abar: Tensor) -> Tensor:
    """lambda = log(alpha / sigma) = (log abar - log(1 - abar)) / 2, the time variable of DPM-Solver."""
    return 0.5 * (torch.log(abar) - torch.log1p(-abar))


def x0_from_eps(z: Tensor, eps: Tensor, abar: Tensor) -> Tensor:
    """The data prediction x0 = (z - sqrt(1 - abar) eps) / sqrt(abar) of an eps prediction; abar: (B,)."""
    return (z - expand_like((1.0 - abar).sqrt(), z) * eps) / expand_like(abar.sqrt(), z)


def x0_from_model_output(output: Tensor, z: Tensor, abar: Tensor, prediction_type: str) -> Tensor:
    """Teacher output -> x0: (z - sqrt(1 - abar) eps) / sqrt(abar) for eps, sqrt(abar) z - sqrt(1 - abar) v for
    v_prediction (defined at abar = 0 too, where a zero-terminal-SNR teacher starts: x0 = -v)."""
    if prediction_type == "epsilon":
        return x0_from_eps(z, output, abar)
    if prediction_type == "v_prediction":
        return expand_like(abar.sqrt(), z) * z - expand_like((1.0 - abar).sqrt(), z) * output
    raise ValueError(
        f"unknown teacher prediction_type {prediction_type!r}; choose one of {TEACHER_PREDICTION_TYPES}"
    )


def dpmpp_2m_step(
    z: Tensor, x0: Tensor, x0_prev: Tensor, abar_prev: Tensor, abar: Tensor, abar_next: Tensor
) -> Tensor:
    """One second-order multistep DPM-Solver++ step (DPM-Solver++(2M): Lu et al. 2022, "DPM-Solver++: Fast
    Solver for Guided Sampling of Diffusion Probabilistic Models", arXiv:2211.01095, Algorithm 2):

        h = lambda_next - lambda,  r = (lambda - lambda_prev) / h,
        D = (1 + 1 / (2 r)) x0 - 1 / (2 r) x0_prev,
        z_next = (sigma_next / sigma) z - alpha_next (e^{-h} - 1) D,

    with alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma). ``x0`` is the data
    prediction at (z, abar), ``x0_prev`` the one of the previous grid point (abar_prev). The first step of a
    solve has no previous point and is DDIM (``ddim_step``), which is this formula with D = x0.
    Coefficients are computed in float64 from the (B,) abar tensors, then cast to z's dtype. Equal to
    diffusers' ``DPMSolverMultistepScheduler`` (``algorithm_type="dpmsolver++"``, ``solver_order=2``,
    ``solver_type="midpoint"``) on the same grid.
    """
    abar_prev, abar, abar_next = (a.double() for a in (abar_prev, abar, abar_next))
    lam_prev, lam, lam_next = half_log_snr(abar_prev), half_log_snr(abar), half_log_snr(abar_next)
    h = lam_next - lam
    half_over_r = 0.5 * h / (lam - lam_prev)
    c_z = ((1.0 - abar_next) / (1.0 - abar)).sqrt()
    c_d = -abar_next.sqrt() * torch.expm1(-h)
    d = expand_like(1.0 + half_over_r, x0) * x0 - expand_like(half_over_r, x0) * x0_prev
    return expand_like(c_z, z) * z + expand_like(c_d, z) * d


def unipc_bh2_update(
    z: Tensor,
    x0: Tensor,
    abar: Tensor,
    abar_next: Tensor,
    x0_prev: Tensor | None = None,
    abar_prev: Tensor | None = None,
    x0_next: Tensor | None = None,
) -> Tensor:
    """One UniPC update with B(h) = e^h - 1 in data-prediction form (Zhao et al. 2023, "UniPC: A Unified
    Predictor-Corrector Framework for Fast Sampling of Diffusion Models", arXiv:2302.04867, Algorithms 1-2).

    From z at abar (data prediction x0) to abar_next, with hh = -(lambda_next - lambda), B = e^{hh} - 1 and
    the first-order part ``base = (sigma_next / sigma) z - alpha_next (e^{hh} - 1) x0`` (DDIM):

    * predictor UniP (``x0_next`` None): ``base`` alone if there is no previous point (order 1), else
      order 2 with r = (lambda_prev - lambda) / h, D1 = (x0_prev - x0) / r and
      ``base - alpha_next B D1 / 2``;
    * corrector UniC (``x0_next`` given: the teacher's data prediction at the predicted point): D_t =
      x0_next - x0 and ``base - alpha_next B (rho_1 D1 + rho_t D_t)`` with rho_t = 1/2 (no previous point)
      or (rho_1, rho_t) solving [[1, 1], [r, 1]] rho = (phi_2 / B, 2 phi_3 / B) (phi_2 = (e^{hh} - 1) / hh
      - 1, phi_3 = phi_2 / hh - 1/2), i.e. one order higher than the predictor it corrects. The
      corrector reuses the teacher evaluation the next step needs anyway, so it costs no extra forward.

    Coefficients in float64 from the (B,) abar tensors. Equal to diffusers' ``UniPCMultistepScheduler``
    (``solver_type="bh2"``, ``solver_order=2``, ``predict_x0=True``) on the same grid.
    """
    has_prev = x0_prev is not None
    if has_prev != (abar_prev is not None):
        raise ValueError("x0_prev and abar_prev go together")
    abar, abar_next = abar.double(), abar_next.double()
    lam, lam_next = half_log_snr(abar), half_log_snr(abar_next)
    hh = -(lam_next - lam)
    b_h = torch.expm1(hh)  # B(h) of "bh2"; also h phi_1 of the first-order part
    alpha_next = abar_next.sqrt()
    out = (
        expand_like(((1.0 - abar_next) / (1.0 - abar)).sqrt(), z) * z - expand_like(alpha_next * b_h, z) * x0
    )
    d1 = None
    if has_prev:
        r = (half_log_snr(abar_prev.double()) - lam) / (lam_next - lam)
        d1 = (x0_prev - x0) / expand_like(r, x0)
    if x0_next is None:  # predictor
        if d1 is None:
            return out
        return out - expand_like(alpha_next * b_h * 0.5, z) * d1
    d_t = x0_next - x0
    if d1 is None:
        return out - expand_like(alpha_next * b_h * 0.5, z) * d_t
    phi_2 = b_h / hh - 1.0
    phi_3 = phi_2 / hh - 0.5
    b1, b2 = phi_2 / b_h, 2.0 * phi_3 / b_h
    rho_1 = (b1 - b2) / (1.0 - r)
    rho_t = b1 - rho_1
    correction = expand_like(rho_1, d1) * d1 + expand_like(rho_t, d_t) * d_t
    return out - expand_like(alpha_next * b_h, z) * correction


def solver_grid(
    t_s: Tensor, t_e: Tensor, num_steps: int, alphas_cumprod: Tensor, spacing: GridSpacing, strict: bool
) -> list[Tensor]:
    """The M + 1 abar indices (each a (B,) long CPU tensor) a window solve walks, from t_s's to t_e's.

    * ``time``: t_j = t_s + (t_e - t_s) j / M, index ``abar_index_of_time(t_j)`` (the paper's DDIM grid).
    * ``log_snr``: uniform in lambda = log(alpha / sigma) between the two edge indices, each point rounded to
      the index of nearest lambda, then made strictly decreasing (the DPM-Solver papers' "logSNR" steps). In
      the windows away from the data it is within a few indices of the ``time`` grid; in the last window
      (abar[249] -> abar[0], lambda 0.37 -> 3.5 on SD's schedule) it puts the points near the data, where
      the trajectory bends, instead of one long last step that a multistep solver extrapolates over.

    ``strict`` (multistep solvers) requires M distinct steps, i.e. M <= (index of t_s) - (index of t_e).
    """
    n_train = alphas_cumprod.numel()
    t_s, t_e = t_s.double().cpu(), t_e.double().cpu()
    if spacing == "time":
        grid = [
            abar_index_of_time(t_s + (t_e - t_s) * (j / num_steps), n_train) for j in range(num_steps + 1)
        ]
    elif spacing == "log_snr":
        lam = half_log_snr(alphas_cumprod.double().cpu())  # decreasing in the index
        first, last = abar_index_of_time(t_s, n_train), abar_index_of_time(t_e, n_train)
        if strict and torch.any(first - last < num_steps):
            raise ValueError(
                f"{num_steps} steps need distinct timesteps, and a window this short has fewer (log_snr grid)"
            )
        frac = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        targets = lam[first][:, None] + (lam[last] - lam[first])[:, None] * frac  # (B, M + 1)
        idx = (lam[None, None, :] - targets[:, :, None]).abs().argmin(dim=2)  # (B, M + 1)
        idx[:, 0], idx[:, -1] = first, last
        for j in range(1, num_steps):  # strictly decreasing, leaving room for the points still to come
            idx[:, j] = torch.minimum(idx[:, j], idx[:, j - 1] - 1)
        for j in range(num_steps - 1, 0, -1):
            idx[:, j] = torch.maximum(idx[:, j], idx[:, j + 1] + 1)
        grid = list(idx.T)
    else:
        raise ValueError(f"unknown grid spacing {spacing!r}; choose one of {GRID_SPACINGS}")
    if strict and any(torch.any(a <= b) for a, b in zip(grid[:-1], grid[1:], strict=True)):
        raise ValueError(
            f"{num_steps} steps need distinct timesteps on the grid, and a window this short has fewer"
        )
    return grid


@torch.no_grad()
def solve_window(
    teacher: torch.nn.Module,
    z_s: Tensor,
    t_s: Tensor,
    t_e: Tensor,
    alphas_cumprod: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None = None,
    guidance_scale: float = 1.0,
    num_steps: int = 8,
    prediction_type: str = "epsilon",
    solver: TeacherSolver = "ddim",
    spacing: GridSpacing | None = None,
) -> Tensor:
    """phi(z_s, t_s, t_e; c, w): the teacher's trajectory from t_s to t_e in ``num_steps`` teacher evaluations.

    The solver walks a grid of M + 1 abar indices from the window start to its end (:func:`solver_grid`) and
    evaluates the teacher at the first M, at the index whose abar it denoises (docs/method.md §1). ``solver``
    picks the update between grid points: ``ddim`` (the paper's, default), or the second-order multistep
    ``dpm++`` (:func:`dpmpp_2m_step`) or ``unipc`` (:func:`unipc_bh2_update`), whose first step is DDIM and
    whose last step lands exactly on t_e (no final lower-order step, no step to t = 0). ``spacing`` (default:
    ``time`` for ddim, ``log_snr`` for the multistep solvers) places the grid uniformly in t or in lambda.

    Args:
        teacher: frozen UNet-like module.
        z_s: (B, C, H, W) or (B, C, F, H, W) latents at t_s.
        t_s, t_e: (B,) window edges per sample (t_s > t_e; samples may sit in different windows).
        alphas_cumprod: (N,) the teacher's abar.
        cond / uncond: conditioning of the (possibly dropped) prompt and of the empty prompt.
        guidance_scale: w; 1 for CFG-sync, w* (e.g. 7.5) for CFG-fixed.
        num_steps: M, teacher evaluations (paper: 8 DDIM steps).
        prediction_type: the teacher's: "epsilon" or "v_prediction".
        solver: "ddim", "dpm++" or "unipc" (docs/teacher_solver.md).
        spacing: "time" or "log_snr"; None = the solver's default.
    Returns:
        z_e: same shape as z_s.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if solver not in TEACHER_SOLVERS:
        raise ValueError(f"unknown teacher solver {solver!r}; choose one of {TEACHER_SOLVERS}")
    if not torch.all(t_s > t_e):
        raise ValueError("every window must have t_s > t_e (t = 1 is noise, t = 0 is data)")
    abar_table = alphas_cumprod.to(device=z_s.device, dtype=torch.float32)
    t_s64, t_e64 = t_s.double().cpu(), t_e.double().cpu()
    spacing = spacing or ("time" if solver == "ddim" else "log_snr")
    grid = solver_grid(t_s64, t_e64, num_steps, alphas_cumprod, spacing, strict=solver != "ddim")
    abar64 = alphas_cumprod.double().cpu()
    z = z_s
    x0_prev = x0_prev2 = z_prev = None
    for j in range(num_steps):
        idx_now = grid[j].to(z.device)
        abar_now = abar_table[idx_now].to(z.dtype)
        eps = guided_eps(teacher, z, idx_now, abar_now, cond, uncond, guidance_scale, prediction_type)
        if solver == "ddim":
            z = ddim_step(z, eps.to(z.dtype), abar_now, abar_table[grid[j + 1].to(z.device)].to(z.dtype))
            continue
        a_prev, a_now, a_next = (
            abar64[grid[i]].to(z.device) if i >= 0 else None for i in (j - 1, j, j + 1)
        )  # fmt: skip
        x0 = x0_from_eps(z, eps.to(z.dtype), a_now.to(z.dtype))
        if solver == "dpm++":
            if x0_prev is None:
                z = ddim_step(z, eps.to(z.dtype), abar_now, abar_table[grid[j + 1].to(z.device)].to(z.dtype))
            else:
                z = dpmpp_2m_step(z, x0, x0_prev, a_prev, a_now, a_next).to(z.dtype)
        else:  # unipc: correct the point just reached with its own evaluation, then predict the next
            if x0_prev is not None:
                a_prev2 = abar64[grid[j - 2]].to(z.device) if x0_prev2 is not None else None
                z = unipc_bh2_update(z_prev, x0_prev, a_prev, a_now, x0_prev2, a_prev2, x0_next=x0).to(
                    z.dtype
                )
            z_prev = z
            z = unipc_bh2_update(z, x0, a_now, a_next, x0_prev, a_prev if x0_prev is not None else None).to(
                z.dtype
            )
        x0_prev2, x0_prev = x0_prev, x0
    return z
