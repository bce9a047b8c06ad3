"""The reflow objective (Algorithm 1): zero loss for the exact student, weighting, shapes, gradients."""

import pytest
import torch

from perflow_video.method.noise_schedule import make_alphas_cumprod
from perflow_video.method.reflow_objective import (
    ReflowConfig,
    reflow_loss,
    sample_times,
    window_start_times,
)
from perflow_video.method.teacher_solver import Conditioning
from perflow_video.toy.toy_problem import GaussianMixture, MixtureTeacher, TeacherAsStudent, ToyStudent

ABAR = make_alphas_cumprod()


@pytest.mark.parametrize("weighting", ["uniform", "endpoint"])
def test_teacher_as_student_has_zero_loss_at_window_starts_with_b_and_one_solver_step(weighting):
    teacher = MixtureTeacher(GaussianMixture.ring(), ABAR)
    cfg = ReflowConfig(
        num_time_windows=4, solver_steps=1, parameterization="ddim_eps", loss_weighting=weighting
    )
    z0 = GaussianMixture.ring().sample(16)
    out = reflow_loss(
        TeacherAsStudent(teacher),
        teacher,
        z0,
        ABAR,
        cfg,
        Conditioning(),
        times=window_start_times(torch.arange(16), 4),
    )
    assert out.loss.item() < 1e-20
    # ...while parameterization A's target is not the teacher's eps, so the same student is wrong there.
    cfg_a = ReflowConfig(
        num_time_windows=4, solver_steps=1, parameterization="diff_eps", loss_weighting=weighting
    )
    out_a = reflow_loss(
        TeacherAsStudent(teacher),
        teacher,
        z0,
        ABAR,
        cfg_a,
        Conditioning(),
        times=window_start_times(torch.arange(16), 4),
    )
    assert out_a.loss.item() > 1e-3


def test_endpoint_weighting_is_uniform_times_squared_sensitivity():
    teacher = MixtureTeacher(GaussianMixture.ring(), ABAR)
    student = ToyStudent().double()
    z0, noise = GaussianMixture.ring().sample(64), torch.randn(64, 2, dtype=torch.float64)
    times = sample_times(64, 4, 1000, False, torch.Generator().manual_seed(1))
    outs = {}
    for w in ("uniform", "endpoint"):
        cfg = ReflowConfig(loss_weighting=w)
        outs[w] = reflow_loss(student, teacher, z0, ABAR, cfg, Conditioning(), noise=noise, times=times)
    ratio = outs["endpoint"].loss_per_sample / outs["uniform"].loss_per_sample
    # first-window samples weigh ~eta_B^2 ~ 6.3 at t_s; last-window ones less than 0.45
    first, last = times[1] == 0, times[1] == 3
    assert ratio[first].max() <= 2.5065**2 + 1e-3 and ratio[last].max() <= 0.6638**2 + 1e-3
    assert torch.all(ratio > 0)


@pytest.mark.parametrize("discrete", [False, True])
def test_sampled_times_lie_in_their_windows(discrete):
    t, k = sample_times(4096, 4, 1000, discrete, torch.Generator().manual_seed(0))
    t_s, t_e = 1 - k.double() / 4, 1 - (k.double() + 1) / 4
    assert torch.all(t <= t_s) and torch.all(t > t_e) and torch.all(t > 0) and torch.all(t <= 1)
    assert set(k.tolist()) == {0, 1, 2, 3}
    if discrete:
        assert torch.allclose(t * 1000, (t * 1000).round())


def test_gradients_reach_only_the_student_for_video_latents():
    class Conv3dUNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(4, 4, 3, padding=1)

        def forward(self, sample, timestep, encoder_hidden_states=None):
            return self.conv(sample) * (1 + 0 * timestep.float().mean())

    # The teacher is left trainable on purpose: the objective itself must keep it out of the graph (the
    # target and z_t come from the teacher's solve, so without no_grad there it would get a gradient).
    student, teacher = Conv3dUNet(), Conv3dUNet()
    assert all(p.requires_grad for p in teacher.parameters())
    z0 = torch.randn(2, 4, 3, 6, 6)  # (B, C, F, H, W)
    out = reflow_loss(student, teacher, z0, ABAR, ReflowConfig(solver_steps=2), Conditioning())
    out.loss.backward()
    assert out.loss_per_sample.shape == (2,) and torch.isfinite(out.loss)
    assert student.conv.weight.grad is not None and student.conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="loss_weighting"):
        ReflowConfig(loss_weighting="snr")
    with pytest.raises(ValueError, match="prediction_type"):
        ReflowConfig(parameterization="eps")
    with pytest.raises(ValueError, match="guidance_scale"):
        ReflowConfig(guidance_scale=0.5)


@pytest.mark.parametrize("solver", ["dpm++", "unipc"])
def test_reflow_solver_option_reaches_the_window_solve_and_lands_closer_than_ddim_at_equal_steps(solver):
    """``reflow.solver`` picks the teacher's solver. The target is linear in the solve's endpoint z_e (at a
    window start z_t = z_s), so its error measures z_e's: on the ring mixture, against a 256-step DDIM
    solve, M = 4 steps of the multistep solver land closer than M = 8 DDIM steps (docs/teacher_solver.md)."""
    from perflow_video.method.reflow_objective import reflow_targets

    teacher = MixtureTeacher(GaussianMixture.ring(), ABAR)
    z0 = GaussianMixture.ring().sample(64, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))
    times = window_start_times(torch.arange(64), 4)

    def target(name: str, steps: int):
        cfg = ReflowConfig(solver_steps=steps, solver=name)
        return reflow_targets(teacher, z0, ABAR, cfg, Conditioning(), noise=noise, times=times).target

    reference = target("ddim", 256)
    error = {
        name: (target(name, m) - reference).pow(2).mean().sqrt() for name, m in (("ddim", 8), (solver, 4))
    }
    assert error[solver] < 0.6 * error["ddim"]  # measured: 0.47x (dpm++), 0.34x (unipc)
    with pytest.raises(ValueError, match="solver"):
        ReflowConfig(solver="heun")
