"""The reflow objective on fixed draws: the number that shows a run learning (logged as ``eval_loss``).

The training loss is a poor progress signal. Each step draws new data, noise and t, and the loss varies
~100x with t alone: inside a window the straight segment z_s -> z_e passes close to where the teacher
(= the student at step 0) already points, and the loss there is ~1/70 of its value at the window start
(measured on the tiny AnimateDiff default). At the window starts t_s the student must do in one step
what the teacher does in M: that is where a K-step sampler queries it (docs/method.md §4) and where
training has most to gain.

So a run evaluates, every ``run.eval_steps``, the same objective (same K, M, parameterization, CFG
and weighting) on one fixed set of draws: the first ``run.eval_samples`` training items, noise of their
own per item (:func:`eval_noise`), item i in window i mod K at t = t_s. The teacher's half
(``reflow_targets``) is computed once; each evaluation is then one no-grad student forward per batch. The set comes from the
training data (there is no held-out split): it measures fitting the teacher's windows, not
generalisation to new prompts. Item i is always scored in window i mod K, so the per-window numbers are
measured on different items. With ``optim.use_ema`` it scores the live weights, not the exported average.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from perflow_video.method.reflow_objective import (
    ReflowConfig,
    ReflowTargets,
    reflow_targets,
    student_loss,
    window_start_times,
)
from perflow_video.method.teacher_solver import Conditioning

#: Tag of the evaluation noise stream: item seeds are SeedSequence([seed, EVAL_STREAM, index]), a stream of
#: its own (training draws are keyed by (seed, epoch, index) in another way, training.step.sample_generator).
EVAL_STREAM = 0x65F41


@dataclass
class FixedReflowDraws:
    """Precomputed teacher targets of one evaluation batch and the student's conditioning for it."""

    targets: ReflowTargets
    cond: Conditioning


def eval_noise(seed: int, index: int, shape: tuple[int, ...]) -> Tensor:
    """The evaluation noise of dataset item ``index``: the same whatever the batch size or process count."""
    state = np.random.SeedSequence([seed, EVAL_STREAM, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(state) % (2**63 - 1)))


def fixed_draws(
    teacher: torch.nn.Module,
    z_0: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    alphas_cumprod: Tensor,
    config: ReflowConfig,
    indices: Tensor,
    seed: int,
) -> FixedReflowDraws:
    """Targets for one batch of evaluation items at window starts.

    Args:
        teacher: the frozen teacher.
        z_0: (B, ...) clean latents of the items.
        cond / uncond: the items' conditioning (no prompt dropout) and, for CFG-fixed, the empty prompt's.
        alphas_cumprod: the teacher's abar.
        config: the run's recipe.
        indices: (B,) the items' dataset indices: item i is scored in window i mod K with noise
            :func:`eval_noise` (seed, i), so the set does not depend on how it is batched.
        seed: the run's seed.
    """
    indices = torch.as_tensor(indices).reshape(-1).long()
    t, k = window_start_times(indices, config.num_time_windows)
    noise = torch.stack([eval_noise(seed, int(i), tuple(z_0.shape[1:])) for i in indices])
    noise = noise.to(device=z_0.device, dtype=z_0.dtype)
    targets = reflow_targets(teacher, z_0, alphas_cumprod, config, cond, uncond, noise, times=(t, k))
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
