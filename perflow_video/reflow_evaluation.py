"""The reflow objective on fixed draws: the number that shows a run learning (logged as ``eval_loss``).

The training loss is a poor progress signal. Each step draws new data, noise and t, and the loss varies
~100x with t alone: inside a window the straight segment z_s -> z_e passes close to where the teacher
(= the student at step 0) already points, and the loss there is ~1/70 of its value at the window start
(measured on the tiny AnimateDiff default). At the window starts t_s the student must do in one step
what the teacher does in M: that is where a K-step sampler queries it (DESIGN.md §4) and where
training has most to gain.

So a run evaluates, every ``run.eval_steps``, the same objective (same K, M, parameterization, CFG
and weighting) on one fixed set of draws: the first ``run.eval_samples`` training items, noise from a
generator of its own, windows 0..K-1 in turn and t = t_s. The teacher's half (``reflow_targets``) is
computed once; each evaluation is then one no-grad student forward per sample. The set comes from the
training data (there is no held-out split): it measures fitting the teacher's windows, not
generalisation to new prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .reflow_objective import (
    ReflowConfig,
    ReflowTargets,
    reflow_targets,
    student_loss,
    window_start_times,
)
from .teacher_solver import Conditioning

#: Offset of the evaluation draws' seed from ``optim.seed`` (kept apart from the training draws).
EVAL_SEED_OFFSET = 1_000_003


@dataclass
class FixedReflowDraws:
    """Precomputed teacher targets of one evaluation batch and the student's conditioning for it."""

    targets: ReflowTargets
    cond: Conditioning


def eval_generator(seed: int) -> torch.Generator:
    """The generator of the evaluation noise (independent of every training draw)."""
    return torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET)


def fixed_draws(
    teacher: torch.nn.Module,
    z_0: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    alphas_cumprod: Tensor,
    config: ReflowConfig,
    first_index: int,
    generator: torch.Generator,
) -> FixedReflowDraws:
    """Targets for one batch of evaluation items at window starts.

    Args:
        teacher: the frozen teacher.
        z_0: (B, ...) clean latents of the items.
        cond / uncond: the items' conditioning (no prompt dropout) and, for CFG-fixed, the empty prompt's.
        alphas_cumprod: the teacher's abar.
        config: the run's recipe.
        first_index: position of the batch's first item in the evaluation set (windows cycle over it).
        generator: :func:`eval_generator`; consumed in order, so the set is the same on every run.
    """
    bsz = z_0.shape[0]
    t, k = window_start_times(first_index + bsz, config.num_time_windows)
    noise = torch.randn(z_0.shape, generator=generator, dtype=z_0.dtype).to(z_0.device)
    times = (t[first_index:], k[first_index:])
    targets = reflow_targets(teacher, z_0, alphas_cumprod, config, cond, uncond, noise, times=times)
    return FixedReflowDraws(targets, cond)


@torch.no_grad()
def evaluate_student(student: torch.nn.Module, draws: list[FixedReflowDraws], num_windows: int) -> dict:
    """The mean loss over all fixed draws (``eval_loss``) and per window (``eval_loss_window_k``).

    The student is put in eval mode for the evaluation and back in its previous mode after.
    """
    was_training = student.training
    student.eval()
    try:
        per_sample, windows = [], []
        for d in draws:
            out = student_loss(student, d.targets, d.cond)
            per_sample.append(out.loss_per_sample.float().cpu())
            windows.append(out.window.cpu())
    finally:
        student.train(was_training)
    losses, window = torch.cat(per_sample), torch.cat(windows)
    result = {"eval_loss": float(losses.mean())}
    for w in range(num_windows):
        if (window == w).any():
            result[f"eval_loss_window_{w}"] = float(losses[window == w].mean())
    return result
