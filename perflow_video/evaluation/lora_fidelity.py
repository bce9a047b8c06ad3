"""How close a LoRA of ΔW comes to the full ΔW, in weights and in samples (README "ΔW in other tools").

:func:`lora_delta` is the ΔW a LoRA file of rank r applies (the truncated SVD of every weight it covers:
spatial linear / conv weights, motion attention projections); :func:`sample_distance` compares 4-step
samples of teacher + that ΔW with those of teacher + the full ΔW from the same noise.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor

from perflow_video.evaluation.sampling import rms_distance, sample_latents
from perflow_video.method.teacher_solver import Conditioning
from perflow_video.weights.delta_weights import apply_delta_weights, is_motion_key
from perflow_video.weights.lora_export import factorize, lora_target_keys
from perflow_video.weights.motion_lora import motion_delta_to_lora


def lora_delta(delta: Mapping[str, Tensor], rank: int) -> dict[str, Tensor]:
    """The ΔW that the rank-``rank`` LoRA files carry: spatial weights and motion attention projections
    as truncated SVDs; every other key (biases, norms, motion feed-forward) is dropped, as in the files."""
    out: dict[str, Tensor] = {}
    spatial = [k for k in delta if not is_motion_key(k)]
    for key in lora_target_keys(delta) if spatial else []:
        f = factorize(delta[key], rank=rank)
        if f.rank:
            out[key] = (f.up.flatten(1) @ f.down.flatten(1)).reshape(delta[key].shape)
    if any(is_motion_key(k) for k in delta):
        out.update(motion_delta_to_lora(delta, rank=rank).delta_weights())
    return out


def with_delta(teacher: torch.nn.Module, delta: Mapping[str, Tensor]) -> torch.nn.Module:
    """A copy of ``teacher`` with ``delta`` added (strict: every key must fit)."""
    model = copy.deepcopy(teacher).eval()
    apply_delta_weights(model, delta)
    return model


def sample_distance(
    teacher: torch.nn.Module,
    delta: Mapping[str, Tensor],
    ranks: list[int],
    scheduler,
    noise: Tensor,
    cond: Conditioning,
    steps: int = 4,
) -> dict[str, float]:
    """RMS latent distance of the ``steps``-step samples of teacher + rank-r LoRA ΔW (and of the teacher
    itself, "0") to those of teacher + full ΔW, from the same noise and prompts."""
    full = sample_latents(with_delta(teacher, delta), scheduler, noise, cond, None, steps)
    out = {"0": rms_distance(sample_latents(teacher, scheduler, noise, cond, None, steps), full)}
    for r in ranks:
        model = with_delta(teacher, lora_delta(delta, r))
        out[str(r)] = rms_distance(sample_latents(model, scheduler, noise, cond, None, steps), full)
    return out
