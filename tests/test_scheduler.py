"""PeRFlowScheduler against docs/method.md §4, written out independently here, for every type, K and n."""

import logging
from fractions import Fraction

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from perflow_video.method.noise_schedule import make_alphas_cumprod
from perflow_video.method.teacher_solver import Conditioning, solve_window
from perflow_video.scheduler import PeRFlowScheduler
from perflow_video.toy.toy_problem import GaussianMixture, MixtureTeacher, TeacherAsStudent


def animatediff_ddim_config():
    return DDIMScheduler(
        beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    ).config  # fmt: skip


@pytest.mark.parametrize(
    "n, expected",
    [
        (4, [1000, 750, 500, 250]),
        (6, [1000, 875, 750, 625, 500, 250]),
        (8, [1000, 875, 750, 625, 500, 375, 250, 125]),
    ],
)
def test_design_timestep_tables(n, expected):
    s = PeRFlowScheduler(num_time_windows=4)
    s.set_timesteps(n)
    assert s.timesteps.tolist() == expected


@pytest.mark.parametrize("K", [1, 2, 3, 4, 5])
def test_steps_are_spread_over_windows_first_windows_get_extra(K):
    s = PeRFlowScheduler(num_time_windows=K)
    for n in range(K, 41):
        s.set_timesteps(n)
        taus = s.timesteps.tolist()
        assert len(taus) == n and taus[0] == 1000 and all(a > b for a, b in zip(taus, taus[1:], strict=False))
        per_window = [sum(1 for tau in taus if Fraction(1000 * (K - k - 1), K) < tau <= Fraction(1000 * (K - k), K))
                      for k in range(K)]  # fmt: skip
        assert per_window == [n // K + (1 if k < n % K else 0) for k in range(K)]


def test_fewer_steps_than_windows_runs_exactly_n_steps_and_warns(caplog):
    s = PeRFlowScheduler(num_time_windows=4)
    with caplog.at_level(logging.WARNING):
        s.set_timesteps(2)
    assert s.timesteps.tolist() == [1000, 500]
    assert "2 steps < 4 time windows" in caplog.text
    s.set_timesteps(1)
    z = torch.randn(2, 4, 8, 8)
    out = s.step(torch.randn_like(z), s.timesteps[0], z).prev_sample
    assert out.shape == z.shape and torch.isfinite(out).all()


def design_step(prediction_type, K, abar, model_output, tau, tau_next, z):
    """docs/method.md §2/§4 written out with exact window arithmetic (independent of the library)."""
    t = Fraction(int(tau), 1000)
    k = next(k for k in range(K) if Fraction(K - k, K) >= t > Fraction(K - k - 1, K))
    t_s, t_e = Fraction(K - k, K), Fraction(K - k - 1, K)
    a_s = float(abar[int(1000 * t_s) - 1])
    a_e = float(abar[max(int(1000 * t_e) - 1, 0)])
    t, t_s, t_e = float(t), float(t_s), float(t_e)
    if prediction_type == "velocity":
        v = model_output
    else:
        lam = (a_e / a_s) ** 0.5
        if prediction_type == "diff_eps":
            eta = -((a_e / a_s - 1) ** 0.5)
        else:
            eta = (1 - a_e) ** 0.5 - (a_e * (1 - a_s) / a_s) ** 0.5
        v = ((1 - lam) * z - eta * model_output) / (t - t_e + lam * t_s - lam * t)
    return z + (int(tau_next) - int(tau)) / 1000 * v


@pytest.mark.parametrize("prediction_type", ["ddim_eps", "diff_eps", "velocity"])
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("n", [1, 3, 4, 5, 8, 10])
def test_step_matches_design_formula(prediction_type, K, n):
    s = PeRFlowScheduler(num_time_windows=K, prediction_type=prediction_type, beta_schedule="linear")
    abar = s.alphas_cumprod.double()
    s.set_timesteps(n)
    g = torch.Generator().manual_seed(n * 10 + K)
    z = torch.randn(2, 4, 3, 5, 5, generator=g, dtype=torch.float64)
    taus = s.timesteps.tolist() + [0]
    for i, tau in enumerate(s.timesteps):
        out = torch.randn(z.shape, generator=g, dtype=torch.float64)
        expected = design_step(prediction_type, K, abar, out, taus[i], taus[i + 1], z)
        z = s.step(out, tau, z).prev_sample
        torch.testing.assert_close(z, expected, rtol=1e-10, atol=1e-10)


def test_config_round_trip_and_released_keys(tmp_path):
    s = PeRFlowScheduler(num_time_windows=4, prediction_type="ddim_eps", beta_schedule="linear")
    s.save_pretrained(tmp_path)
    loaded = PeRFlowScheduler.from_pretrained(tmp_path)
    public = {k: v for k, v in s.config.items() if not k.startswith("_")}
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == public
    torch.testing.assert_close(loaded.alphas_cumprod, s.alphas_cumprod)
    released = {  # the keys of a released PeRFlow scheduler_config.json
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "trained_betas": None, "set_alpha_to_one": False, "prediction_type": "epsilon", "t_noise": 1,
        "t_clean": 0, "num_time_windows": 4,
    }  # fmt: skip
    legacy = PeRFlowScheduler.from_config(released)
    assert legacy.config.prediction_type == "diff_eps"


def test_from_animatediff_ddim_config_uses_teachers_linear_betas():
    cfg = animatediff_ddim_config()
    s = PeRFlowScheduler.from_config(cfg, prediction_type="ddim_eps", num_time_windows=4)
    assert s.config.beta_schedule == "linear" and s.config.num_time_windows == 4
    torch.testing.assert_close(s.alphas_cumprod, DDIMScheduler.from_config(cfg).alphas_cumprod)
    with pytest.raises(ValueError, match="v_prediction"):
        PeRFlowScheduler.from_config(cfg, prediction_type="v_prediction")


def test_add_noise_uses_abar_at_tau_minus_one():
    s = PeRFlowScheduler()
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    out = s.add_noise(x0, eps, torch.tensor([1000, 750, 1]))
    a = s.alphas_cumprod[[999, 749, 0]][:, None, None, None]
    torch.testing.assert_close(out, a.sqrt() * x0 + (1 - a).sqrt() * eps)


@pytest.mark.parametrize("K", [1, 2, 4])
def test_parameterization_b_untrained_student_reproduces_teacher_ddim_through_window_edges(K):
    abar = make_alphas_cumprod()
    teacher = MixtureTeacher(GaussianMixture.ring(), abar)
    student = TeacherAsStudent(teacher)
    s = PeRFlowScheduler(num_time_windows=K, prediction_type="ddim_eps")
    s.set_timesteps(K)
    z = z_teacher = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for k, tau in enumerate(s.timesteps):
        z = s.step(student(z, tau.reshape(1)), tau, z).prev_sample
        ones = torch.ones(64, dtype=torch.float64)
        t_s, t_e = 1 - k / K, 1 - (k + 1) / K
        z_teacher = solve_window(
            teacher, z_teacher, t_s * ones, t_e * ones, abar, Conditioning(), num_steps=1
        )
        torch.testing.assert_close(z, z_teacher, rtol=1e-10, atol=1e-10)


def test_time_points_helper_is_float64_and_decreasing():
    from perflow_video.scheduler import perflow_time_points

    pts = perflow_time_points(7, 4)
    assert pts.dtype == np.float64 and np.all(np.diff(pts) < 0) and pts[0] == 1.0
