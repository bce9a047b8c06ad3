"""The teacher window solver phi(z_s, t_s, t_e; c, w) of paper Algorithm 1 (docs/method.md §3, step 4).

Deterministic DDIM (eta = 0) in M steps inside one window, without gradients. The teacher is any
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
) -> Tensor:
    """phi(z_s, t_s, t_e; c, w): the teacher's DDIM trajectory from t_s to t_e in ``num_steps`` steps.

    Step j goes from t_j = t_s + (t_e - t_s) j / M to t_{j+1}; the teacher is evaluated at the discrete
    timestep whose abar it denoises (``abar_index_of_time``), and abar at every point follows docs/method.md §1.

    Args:
        teacher: frozen UNet-like module.
        z_s: (B, C, H, W) or (B, C, F, H, W) latents at t_s.
        t_s, t_e: (B,) window edges per sample (t_s > t_e; samples may sit in different windows).
        alphas_cumprod: (N,) the teacher's abar.
        cond / uncond: conditioning of the (possibly dropped) prompt and of the empty prompt.
        guidance_scale: w; 1 for CFG-sync, w* (e.g. 7.5) for CFG-fixed.
        num_steps: M (paper: 8).
        prediction_type: the teacher's: "epsilon" or "v_prediction".
    Returns:
        z_e: same shape as z_s.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not torch.all(t_s > t_e):
        raise ValueError("every window must have t_s > t_e (t = 1 is noise, t = 0 is data)")
    n_train = alphas_cumprod.numel()
    abar_table = alphas_cumprod.to(device=z_s.device, dtype=torch.float32)
    t_s64, t_e64 = t_s.double().cpu(), t_e.double().cpu()
    z = z_s
    for j in range(num_steps):
        t_now = t_s64 + (t_e64 - t_s64) * (j / num_steps)
        t_next = t_s64 + (t_e64 - t_s64) * ((j + 1) / num_steps)
        idx_now = abar_index_of_time(t_now, n_train).to(z.device)
        idx_next = abar_index_of_time(t_next, n_train).to(z.device)
        abar_now = abar_table[idx_now].to(z.dtype)
        abar_next = abar_table[idx_next].to(z.dtype)
        eps = guided_eps(teacher, z, idx_now, abar_now, cond, uncond, guidance_scale, prediction_type)
        z = ddim_step(z, eps.to(z.dtype), abar_now, abar_next)
    return z
