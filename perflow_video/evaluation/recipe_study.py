"""Does training bring the student closer to its teacher? The recipe study (docs/recipe_study.md).

The quantity that matters is not the training loss but the *fidelity*: the distance of the student's
K-step samples to the teacher's many-step samples from the same noise. This module measures how it moves
as a student trains under different optimisation recipes (learning rate, effective batch, EMA, optimizer)
at an equal number of training samples, on one fixed pool of teacher targets so that the recipes see
exactly the same data:

* :func:`build_target_pool` runs the teacher once (paper Algorithm 1, steps 2-6, ``reflow_targets``) over
  clean latents and keeps (z_t, timestep, target, weight, prompt embedding) per item;
* :class:`Fidelity` holds fixed noise, prompts and the teacher's reference latents and scores a student's
  PeRFlow samples against them;
* :func:`train_recipe` trains a fresh copy of the student on the pool with one :class:`Recipe` and scores
  it every ``eval_every`` samples, with the student's drift from its start (relative weight change).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from perflow_video.evaluation.sampling import per_sample_rms, rms_distance, sample_latents
from perflow_video.method.reflow_objective import ReflowConfig, ReflowTargets, reflow_targets, student_loss
from perflow_video.method.teacher_solver import Conditioning, solve_window

OptimizerName = Literal["adamw", "adam_large_eps", "sgd"]
#: Per-prompt text embeddings (B, seq, dim) -> the UNet's conditioning (per frame for a motion UNet).
Expand = Callable[[Tensor], Conditioning]


@dataclass
class TargetPool:
    """Teacher targets of N items, computed once (CPU tensors, item-major)."""

    z_t: Tensor
    timestep: Tensor
    target: Tensor
    weight: Tensor
    t: Tensor
    window: Tensor
    text: Tensor  # (N, seq, dim) per-prompt embeddings (after prompt dropout)

    def __len__(self) -> int:
        return self.z_t.shape[0]

    def batch(self, rows: Tensor) -> tuple[ReflowTargets, Tensor]:
        targets = ReflowTargets(
            self.z_t[rows], self.timestep[rows], self.target[rows], self.weight[rows], self.t[rows],
            self.window[rows],
        )  # fmt: skip
        return targets, self.text[rows]


@torch.no_grad()
def build_target_pool(
    teacher: torch.nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    alphas_cumprod: Tensor,
    reflow: ReflowConfig,
    expand: Expand,
    seed: int = 0,
) -> TargetPool:
    """The teacher's half of the objective for every (z_0, text) batch (CFG-sync: no unconditional pass)."""
    if reflow.guidance_scale != 1.0:
        raise ValueError("the recipe study pools CFG-sync targets (reflow.guidance_scale = 1)")
    gen = torch.Generator().manual_seed(seed)
    parts: list[tuple[Tensor, ...]] = []
    for z_0, text in batches:
        t = reflow_targets(teacher, z_0, alphas_cumprod, reflow, expand(text), generator=gen)
        parts.append((t.z_t, t.timestep, t.target, t.weight, t.t, t.window, text))
    return TargetPool(*(torch.cat(column) for column in zip(*parts, strict=True)))


@dataclass
class Fidelity:
    """Fixed noise and prompts, and the teacher's reference latents for them (``reference_steps`` DDIM)."""

    noise: Tensor
    cond: Conditioning
    reference: Tensor

    def distance(self, unet: torch.nn.Module, scheduler, steps: int) -> float:
        """RMS distance of ``unet`` sampled with ``scheduler`` in ``steps`` steps to the reference."""
        return rms_distance(
            sample_latents(unet, scheduler, self.noise, self.cond, None, steps), self.reference
        )


@torch.no_grad()
def reference_trajectory(
    teacher: torch.nn.Module,
    noise: Tensor,
    cond: Conditioning,
    alphas_cumprod: Tensor,
    num_windows: int,
    steps_per_window: int = 25,
) -> list[Tensor]:
    """The teacher's ODE trajectory at the K + 1 window edges t = 1, 1 - 1/K, ..., 0 (DDIM with
    ``steps_per_window`` steps per window: 100 in all for K = 4) from ``noise``; [0] is the noise, [K] the
    sample."""
    points, z = [noise], noise
    for k in range(num_windows):
        t_s = torch.full((noise.shape[0],), 1.0 - k / num_windows, dtype=torch.float64)
        t_e = torch.full_like(t_s, 1.0 - (k + 1) / num_windows)
        z = solve_window(teacher, z, t_s, t_e, alphas_cumprod, cond, num_steps=steps_per_window)
        points.append(z)
    return points


@torch.no_grad()
def window_errors(
    unet: torch.nn.Module, scheduler, trajectory: list[Tensor], cond: Conditioning
) -> list[float]:
    """The local error of one sampler step per window: from the reference point at t_s, the RMS distance of
    the step's result to the reference point at t_e (where the sampler is when every earlier step is exact)."""
    scheduler.set_timesteps(len(trajectory) - 1)
    errors = []
    for k, t in enumerate(scheduler.timesteps):
        out = unet(trajectory[k], t.expand(trajectory[k].shape[0]), **cond.unet_kwargs()).sample
        errors.append(rms_distance(scheduler.step(out, t, trajectory[k]).prev_sample, trajectory[k + 1]))
    return errors


@torch.no_grad()
def chains_from_windows(
    unet: torch.nn.Module, scheduler, trajectory: list[Tensor], cond: Conditioning
) -> list[Tensor]:
    """Where the K-step sampler ends when it starts exactly on the reference at window k's start, for each k
    (windows before k error-free): per-clip RMS to the reference sample, one (N,) tensor per k. Entry 0 is
    the plain K-step sample from the noise; the drop from entry 0 to entry 1 is what the first window costs."""
    num_windows = len(trajectory) - 1
    scheduler.set_timesteps(num_windows)
    ends = []
    for start in range(num_windows):
        z = trajectory[start]
        for t in scheduler.timesteps[start:]:
            out = unet(z, t.expand(z.shape[0]), **cond.unet_kwargs()).sample
            z = scheduler.step(out, t, z).prev_sample
        ends.append(per_sample_rms(z, trajectory[-1]))
    return ends


@dataclass(frozen=True)
class Recipe:
    """One way to optimise the student. ``batch`` x ``accumulation`` samples make one optimizer step."""

    name: str
    optimizer: OptimizerName = "adamw"
    lr: float = 1e-4
    batch: int = 4
    accumulation: int = 1
    ema: float = 0.0  # 0: sample the live weights; else an EMA with this decay per optimizer step
    weight_decay: float = 0.0


def make_optimizer(params: list[torch.nn.Parameter], recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW; Adam with eps = 1e-3 (updates proportional to the gradient when it is tiny); plain SGD."""
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr)
    eps = 1e-3 if recipe.optimizer == "adam_large_eps" else 1e-8
    return torch.optim.AdamW(params, lr=recipe.lr, eps=eps, weight_decay=recipe.weight_decay)


def relative_change(model: torch.nn.Module, start: dict[str, Tensor]) -> float:
    """||theta - theta_0|| / ||theta_0|| over the parameters in ``start``."""
    state = dict(model.named_parameters())
    num = sum(float((state[k].detach() - v).pow(2).sum()) for k, v in start.items())
    den = sum(float(v.pow(2).sum()) for v in start.values())
    return (num / den) ** 0.5


@dataclass
class RecipeResult:
    recipe: Recipe
    samples: list[int]
    scores: list  # what ``score`` returned at each of ``samples`` (a distance, or a dict of them)
    train_loss: list[float]
    weight_change: list[float]


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, names: list[str], decay: float) -> None:
    live, avg = dict(model.named_parameters()), dict(ema.named_parameters())
    for k in names:
        avg[k].data.mul_(decay).add_(live[k].detach(), alpha=1 - decay)


def train_recipe(
    student: torch.nn.Module,
    trainable: list[str],
    pool: TargetPool,
    recipe: Recipe,
    score: Callable[[torch.nn.Module], float | dict[str, float | list[float]]],
    expand: Expand,
    num_samples: int,
    eval_every: int,
    seed: int = 0,
) -> RecipeResult:
    """Train a copy of ``student`` (its ``trainable`` parameters) on ``pool`` for ``num_samples`` samples,
    scoring the sampled weights (the EMA with ``recipe.ema``) with ``score`` every ``eval_every`` samples."""
    model = copy.deepcopy(student).train()
    params = dict(model.named_parameters())
    for k, p in params.items():
        p.requires_grad_(k in trainable)
    ema = copy.deepcopy(model).eval() if recipe.ema else None
    start = {k: params[k].detach().clone() for k in trainable}
    opt = make_optimizer([params[k] for k in trainable], recipe)
    gen = torch.Generator().manual_seed(seed)
    result = RecipeResult(recipe, [0], [score(model.eval())], [float("nan")], [0.0])
    seen, losses, micro = 0, [], 0
    while seen < num_samples:
        rows = torch.randint(0, len(pool), (recipe.batch,), generator=gen)
        targets, text = pool.batch(rows)
        loss = student_loss(model.train(), targets, expand(text)).loss
        (loss / recipe.accumulation).backward()
        losses.append(loss.item())
        seen, micro = seen + recipe.batch, micro + 1
        if micro % recipe.accumulation == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                _ema_update(ema, model, trainable, recipe.ema)
        if seen % eval_every < recipe.batch:
            scored = ema if ema is not None else model.eval()
            result.samples.append(seen)
            result.scores.append(score(scored))
            result.train_loss.append(sum(losses) / len(losses))
            result.weight_change.append(relative_change(scored, start))
            losses = []
    return result
