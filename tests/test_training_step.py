"""The PeRFlow training step (training/step.py) on the tiny AnimateDiff motion UNet, without accelerate:
it is the reflow objective on its draws, prompt dropout swaps exactly the dropped rows, the per-window
logs add up to the loss, and gradient descent on it lowers it."""

import copy

import pytest
import torch

from perflow_video.method.noise_schedule import make_alphas_cumprod
from perflow_video.method.reflow_objective import ReflowConfig, reflow_loss
from perflow_video.method.teacher_solver import Conditioning
from perflow_video.tiny.tiny_models import tiny_unet_motion
from perflow_video.training.step import (
    StepDraws,
    drop_prompts,
    per_sample_draws,
    perflow_step,
)

B, F, K = 4, 2, 4  # clips, frames per clip, time windows
LATENT = (4, F, 8, 8)  # (C, F, h, w) of the tiny motion UNet
ABAR = make_alphas_cumprod(beta_schedule="linear")  # AnimateDiff's motion-module betas
REFLOW = ReflowConfig(num_time_windows=K, solver_steps=2, parameterization="ddim_eps")


def per_frame(cond: Conditioning) -> Conditioning:
    """What AnimateDiffFamily.expand_conditioning does: one embedding per frame, b-major."""
    return cond.map(lambda x: x.repeat_interleave(F, dim=0))


class Recording(torch.nn.Module):
    """Calls the real UNet and keeps the text embeddings it was given (one tensor per call)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, sample, timestep, encoder_hidden_states=None, **kwargs):
        self.seen.append(encoder_hidden_states.detach().clone())
        return self.model(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)


@pytest.fixture(scope="module")
def teacher():
    return tiny_unet_motion(seed=0).requires_grad_(False)


@pytest.fixture()
def student(teacher):
    return copy.deepcopy(teacher).requires_grad_(True)  # the student starts as the teacher (Algorithm 1)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    z_0 = torch.randn(B, *LATENT, generator=g)
    text = Conditioning(torch.randn(B, 77, 32, generator=g))  # four different prompts
    empty = Conditioning(torch.randn(1, 77, 32, generator=g))  # the empty prompt, unlike any of them
    window = torch.tensor([0, 2, 2, 3])  # window 1 has no sample
    t = 1.0 - (window.double() + torch.tensor([0.3, 0.1, 0.8, 0.5], dtype=torch.float64)) / K
    draws = StepDraws(
        torch.tensor([True, False, False, True]), t, window, torch.randn(B, *LATENT, generator=g)
    )
    return z_0, text, empty, draws


def expected_conditioning(text: Conditioning, empty: Conditioning, drop: torch.Tensor) -> Conditioning:
    rows = [
        empty.encoder_hidden_states[0] if d else text.encoder_hidden_states[i] for i, d in enumerate(drop)
    ]
    return Conditioning(torch.stack(rows))


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])  # CFG-sync, CFG-fixed
@torch.no_grad()  # the losses, not their gradients
def test_step_loss_is_the_reflow_objective_on_the_same_draws(teacher, student, batch, guidance_scale):
    z_0, text, empty, draws = batch
    reflow = ReflowConfig(**{**REFLOW.__dict__, "guidance_scale": guidance_scale})
    loss, _ = perflow_step(student, teacher, z_0, text, empty, draws, ABAR, reflow, per_frame)
    cond = per_frame(expected_conditioning(text, empty, draws.drop))
    uncond = (
        None
        if guidance_scale == 1.0
        else per_frame(Conditioning(empty.encoder_hidden_states.expand(B, -1, -1)))
    )
    expected = reflow_loss(
        student, teacher, z_0, ABAR, reflow, cond, uncond, noise=draws.noise, times=(draws.t, draws.window)
    )
    torch.testing.assert_close(loss, expected.loss, rtol=1e-6, atol=0)
    # The comparison can tell: without the dropout the objective is another number.
    undropped = reflow_loss(
        student, teacher, z_0, ABAR, reflow, per_frame(text), uncond, noise=draws.noise,
        times=(draws.t, draws.window),
    )  # fmt: skip
    assert abs(undropped.loss.item() - loss.item()) > 1e-3 * loss.item()


def test_prompt_dropout_replaces_exactly_the_dropped_rows():
    g = torch.Generator().manual_seed(1)
    # SDXL-like conditioning: every tensor, added_cond_kwargs included, is dropped row by row.
    text = Conditioning(torch.randn(B, 77, 64, generator=g), {"text_embeds": torch.randn(B, 32, generator=g)})
    empty = Conditioning(torch.zeros(1, 77, 64), {"text_embeds": torch.zeros(1, 32)})
    drop = torch.tensor([False, True, True, False])
    cond = drop_prompts(text, empty, drop)
    for b in range(B):
        mine = (text.encoder_hidden_states[b], text.added_cond_kwargs["text_embeds"][b])
        want = (torch.zeros(77, 64), torch.zeros(32)) if drop[b] else mine
        assert torch.equal(cond.encoder_hidden_states[b], want[0])
        assert torch.equal(cond.added_cond_kwargs["text_embeds"][b], want[1])


@torch.no_grad()  # the losses, not their gradients
def test_student_and_cfg_sync_teacher_see_the_dropped_prompts_once_per_frame(teacher, student, batch):
    z_0, text, empty, draws = batch
    recording_student, recording_teacher = Recording(student), Recording(teacher)
    perflow_step(recording_student, recording_teacher, z_0, text, empty, draws, ABAR, REFLOW, per_frame)
    (seen,) = recording_student.seen  # one student forward
    assert len(recording_teacher.seen) == REFLOW.solver_steps
    for b in range(B):
        want = empty.encoder_hidden_states[0] if draws.drop[b] else text.encoder_hidden_states[b]
        for f in range(F):
            assert torch.equal(seen[b * F + f], want), (b, f)
    for teacher_seen in recording_teacher.seen:  # CFG-sync: w = 1 on the student's own (dropped) prompts
        assert torch.equal(teacher_seen, seen)


@torch.no_grad()  # the losses, not their gradients
def test_window_logs_are_the_per_window_means_of_the_batch_loss(teacher, student, batch):
    z_0, text, empty, draws = batch
    loss, logs = perflow_step(student, teacher, z_0, text, empty, draws, ABAR, REFLOW, per_frame)
    assert set(logs) == {"loss_window_0", "loss_window_2", "loss_window_3"}  # no sample in window 1
    per_sample = reflow_loss(
        student, teacher, z_0, ABAR, REFLOW, per_frame(expected_conditioning(text, empty, draws.drop)),
        noise=draws.noise, times=(draws.t, draws.window),
    ).loss_per_sample  # fmt: skip
    for k in (0, 2, 3):
        torch.testing.assert_close(logs[f"loss_window_{k}"], per_sample[draws.window == k].mean())
    counts = {k: int((draws.window == k).sum()) for k in (0, 2, 3)}
    weighted = sum(counts[k] * logs[f"loss_window_{k}"] for k in counts) / B
    torch.testing.assert_close(weighted, loss.detach())


def test_a_step_of_gradient_descent_on_the_step_loss_lowers_it(teacher, student, batch):
    z_0, text, empty, draws = batch
    loss, logs = perflow_step(student, teacher, z_0, text, empty, draws, ABAR, REFLOW, per_frame)
    assert loss.requires_grad and not any(v.requires_grad for v in logs.values())  # logs hold no graph
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())  # only the student learns
    params = [p for p in student.parameters() if p.grad is not None]
    assert params
    grad_sq = sum(float((p.grad**2).sum()) for p in params)
    lr = 0.05 * loss.item() / grad_sq  # a first-order decrease of 5%
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
    after, _ = perflow_step(student, teacher, z_0, text, empty, draws, ABAR, REFLOW, per_frame)
    assert after.item() < 0.98 * loss.item(), (loss.item(), after.item())


def test_per_sample_draws_depend_on_the_item_not_on_the_batch():
    args = dict(
        latent_shape=(4, 2, 3), seed=0, epoch=1, prompt_dropout=0.5, reflow=REFLOW, num_train_timesteps=1000
    )
    together = per_sample_draws(torch.tensor([3, 7, 11]), **args)
    for row, index in enumerate([3, 7, 11]):
        alone = per_sample_draws(torch.tensor([index]), **args)
        for name in StepDraws._fields:
            assert torch.equal(getattr(together, name)[row], getattr(alone, name)[0]), (index, name)
    next_epoch = per_sample_draws(torch.tensor([3, 7, 11]), **{**args, "epoch": 2})
    assert not torch.equal(next_epoch.noise, together.noise)


def test_per_sample_draws_drop_at_the_configured_rate_and_put_t_in_its_window():
    draws = per_sample_draws(
        torch.arange(4000), (1,), seed=0, epoch=0, prompt_dropout=0.1, reflow=REFLOW, num_train_timesteps=1000
    )
    assert draws.drop.dtype == torch.bool and 0.08 < draws.drop.float().mean().item() < 0.12
    t_s, t_e = 1.0 - draws.window.double() / K, 1.0 - (draws.window.double() + 1) / K
    assert ((draws.t <= t_s) & (draws.t > t_e)).all()  # t in (t_e, t_s] of its window
    assert set(draws.window.tolist()) == set(range(K)) and draws.noise.shape == (4000, 1)
