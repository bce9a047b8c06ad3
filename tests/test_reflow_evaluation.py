"""eval_loss: the reflow objective on fixed draws at window starts (perflow_video/method/reflow_evaluation.py)."""

import pytest
import torch

from perflow_video.method.noise_schedule import make_alphas_cumprod
from perflow_video.method.reflow_evaluation import evaluate_student, fixed_draws
from perflow_video.method.reflow_objective import ReflowConfig
from perflow_video.method.teacher_solver import Conditioning
from perflow_video.toy.toy_problem import GaussianMixture, MixtureTeacher, TeacherAsStudent, ToyStudent

ABAR = make_alphas_cumprod()
MIXTURE = GaussianMixture.ring()


def draws_for(teacher, cfg, n=10, batch=4, seed=0):
    z0 = MIXTURE.sample(n, torch.Generator().manual_seed(5))
    index = torch.arange(n)
    return [
        fixed_draws(teacher, z0[i : i + batch], Conditioning(), None, ABAR, cfg, index[i : i + batch], seed)
        for i in range(0, n, batch)
    ]


def test_draws_sit_at_window_starts_and_cycle_over_windows_across_batches():
    teacher = MixtureTeacher(MIXTURE, ABAR)
    draws = draws_for(teacher, ReflowConfig(num_time_windows=4, solver_steps=2))
    window = torch.cat([d.targets.window for d in draws])
    t = torch.cat([d.targets.t for d in draws])
    assert window.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    torch.testing.assert_close(t, 1.0 - window.double() / 4)
    timestep = torch.cat([d.targets.timestep for d in draws])
    assert timestep.tolist() == [1000.0, 750.0, 500.0, 250.0] * 2 + [1000.0, 750.0]


def test_the_set_depends_on_the_seed_but_not_on_how_it_is_batched():
    teacher, cfg = MixtureTeacher(MIXTURE, ABAR), ReflowConfig(solver_steps=2)

    def targets(seed, batch):
        return torch.cat([d.targets.target for d in draws_for(teacher, cfg, batch=batch, seed=seed)])

    a, b, c = targets(0, 4), targets(0, 3), targets(1, 4)
    assert torch.equal(a, b)  # batches of 4 or 3 (or processes): the same draws per item
    assert not torch.allclose(a, c)


def test_fixed_targets_carry_no_graph_even_from_a_trainable_teacher():
    """The stored targets must not keep the teacher's graph alive (memory) nor pass gradients back to it.
    The teacher has trainable parameters here (the mixture teacher has none, so it could not tell)."""
    teacher = ToyStudent().double()
    assert all(p.requires_grad for p in teacher.parameters())
    draws = draws_for(teacher, ReflowConfig(solver_steps=2))
    for d in draws:
        for name in ("z_t", "target", "weight"):
            tensor = getattr(d.targets, name)
            assert not tensor.requires_grad and tensor.grad_fn is None, name
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("weighting", ["uniform", "endpoint"])
def test_untrained_student_scores_zero_with_one_solver_step_and_more_with_eight(weighting):
    # Parameterization B at t = t_s with M = 1: the target is the teacher's own eps (paper eq. 8), so the
    # student that starts as the teacher is exact; with M = 8 it is not (the curvature training removes).
    teacher = MixtureTeacher(MIXTURE, ABAR)
    student = TeacherAsStudent(teacher)
    one = ReflowConfig(solver_steps=1, parameterization="ddim_eps", loss_weighting=weighting)
    eight = ReflowConfig(solver_steps=8, parameterization="ddim_eps", loss_weighting=weighting)
    exact = evaluate_student(student, draws_for(teacher, one), 4)
    curved = evaluate_student(student, draws_for(teacher, eight), 4)
    assert exact["eval_loss"] < 1e-20
    assert curved["eval_loss"] > 1e-4
    assert set(curved) == {"eval_loss", *(f"eval_loss_window_{w}" for w in range(4))}
    # the overall number is the sample mean: 3, 3, 2, 2 samples in windows 0..3
    per_window = [curved[f"eval_loss_window_{w}"] for w in range(4)]
    expected = (3 * per_window[0] + 3 * per_window[1] + 2 * per_window[2] + 2 * per_window[3]) / 10
    assert curved["eval_loss"] == pytest.approx(expected, rel=1e-6)


def test_evaluation_restores_the_students_mode_and_changes_no_weight():
    teacher, student = MixtureTeacher(MIXTURE, ABAR), ToyStudent().double()
    draws = draws_for(teacher, ReflowConfig(solver_steps=2))
    before = [p.detach().clone() for p in student.parameters()]
    student.train()
    evaluate_student(student, draws, 4)
    assert student.training
    student.eval()
    evaluate_student(student, draws, 4)
    assert not student.training
    assert all(torch.equal(p, q) for p, q in zip(before, student.parameters(), strict=True))
