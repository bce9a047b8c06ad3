"""Parameterizations A, B and velocity (paper eq. 3-8): identities in float64."""

import pytest
import torch

from perflow_video.method.noise_schedule import make_alphas_cumprod
from perflow_video.method.parameterization import (
    canonical_prediction_type,
    eps_target,
    eps_to_velocity,
    get_parameterization,
    lambda_eta_ddim_eps,
    lambda_eta_diff_eps,
    velocity_to_eps,
)
from perflow_video.method.teacher_solver import ddim_step
from perflow_video.method.time_windows import abar_at

ABAR = make_alphas_cumprod().double()


def window(k: int, K: int = 4, batch: int = 5):
    t_s = torch.full((batch,), 1.0 - k / K, dtype=torch.float64)
    t_e = torch.full((batch,), 1.0 - (k + 1) / K, dtype=torch.float64)
    return t_s, t_e, abar_at(t_s, ABAR), abar_at(t_e, ABAR)


def test_sd_coefficients_match_design_table():
    # docs/method.md §2: (lambda, eta_A, eta_B) of SD's four windows. Labelled regression of the table.
    table = [(3.4858, -3.3393, -2.5064), (2.2145, -1.9758, -1.3009), (1.5596, -1.1969, -0.7558),
             (1.2163, -0.6923, -0.6638)]  # fmt: skip
    for k, (lam, eta_a, eta_b) in enumerate(table):
        _, _, abar_s, abar_e = window(k, batch=1)
        lam_a, eta_a_ = lambda_eta_diff_eps(abar_s, abar_e)
        lam_b, eta_b_ = lambda_eta_ddim_eps(abar_s, abar_e)
        assert lam_a.item() == pytest.approx(lam, abs=1e-4) and lam_b.item() == pytest.approx(lam, abs=1e-4)
        assert eta_a_.item() == pytest.approx(eta_a, abs=1e-4)
        assert eta_b_.item() == pytest.approx(eta_b, abs=1e-4)


@pytest.mark.parametrize("name", ["diff_eps", "ddim_eps"])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_eq6_segment_point_with_exact_eps_gives_segment_velocity(name, k):
    param = get_parameterization(name)
    t_s, t_e, abar_s, abar_e = window(k)
    g = torch.Generator().manual_seed(k)
    z_s = torch.randn(5, 4, 3, 6, 6, generator=g, dtype=torch.float64)  # 5-D video latents
    z_e = torch.randn(5, 4, 3, 6, 6, generator=g, dtype=torch.float64)
    eps = param.target(z_s, z_e, t_s, t_e, abar_s, abar_e)
    v_segment = (z_e - z_s) / (t_e - t_s)[:, None, None, None, None]
    for frac in torch.rand(6, generator=g, dtype=torch.float64):
        t = t_s + frac * (t_e - t_s)
        z_t = z_s + frac * (z_e - z_s)
        v = param.velocity(eps, z_t, t, t_s, t_e, abar_s, abar_e)
        torch.testing.assert_close(v, v_segment, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["diff_eps", "ddim_eps", "velocity"])
@pytest.mark.parametrize("num_steps", [1, 2, 3, 7])
def test_euler_inside_window_lands_on_window_end(name, num_steps):
    param = get_parameterization(name)
    t_s, t_e, abar_s, abar_e = window(1)
    g = torch.Generator().manual_seed(num_steps)
    z_s = torch.randn(5, 4, 8, 8, generator=g, dtype=torch.float64)
    z_e = torch.randn(5, 4, 8, 8, generator=g, dtype=torch.float64)
    prediction = param.target(z_s, z_e, t_s, t_e, abar_s, abar_e)  # constant along the segment
    z, ts = z_s, torch.linspace(float(t_s[0]), float(t_e[0]), num_steps + 1, dtype=torch.float64)
    for a, b in zip(ts[:-1], ts[1:], strict=True):
        t = torch.full((5,), float(a), dtype=torch.float64)
        z = z + (b - a) * param.velocity(prediction, z, t, t_s, t_e, abar_s, abar_e)
    torch.testing.assert_close(z, z_e, rtol=1e-9, atol=1e-9)


def test_eps_velocity_round_trip_float64():
    t_s, t_e, abar_s, abar_e = window(2)
    for lam_eta in (lambda_eta_diff_eps, lambda_eta_ddim_eps):
        lam, eta = lam_eta(abar_s, abar_e)
        z = torch.randn(5, 4, 8, 8, dtype=torch.float64)
        eps = torch.randn(5, 4, 8, 8, dtype=torch.float64)
        t = t_s - 0.3 * (t_s - t_e)
        v = eps_to_velocity(eps, z, t, t_s, t_e, lam, eta)
        torch.testing.assert_close(velocity_to_eps(v, z, t, t_s, t_e, lam, eta), eps, rtol=1e-12, atol=1e-12)


def test_parameterization_b_one_step_is_ddim_step():
    for k in range(4):
        t_s, t_e, abar_s, abar_e = window(k)
        z = torch.randn(5, 4, 8, 8, dtype=torch.float64)
        eps = torch.randn(5, 4, 8, 8, dtype=torch.float64)
        v = get_parameterization("ddim_eps").velocity(eps, z, t_s, t_s, t_e, abar_s, abar_e)
        z_next = z + (t_e - t_s)[:, None, None, None] * v
        torch.testing.assert_close(z_next, ddim_step(z, eps, abar_s, abar_e), rtol=1e-10, atol=1e-10)
        # and the eps target of that DDIM endpoint is the eps we started from
        lam, eta = lambda_eta_ddim_eps(abar_s, abar_e)
        torch.testing.assert_close(eps_target(z, z_next, lam, eta), eps, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["diff_eps", "ddim_eps", "velocity"])
def test_endpoint_sensitivity_is_derivative_of_implied_window_end(name):
    param = get_parameterization(name)
    t_s, t_e, abar_s, abar_e = window(0)
    t = t_s - torch.tensor([0.0, 0.1, 0.2, 0.24, 0.2499], dtype=torch.float64)
    z = torch.randn(5, 4, dtype=torch.float64)
    pred = torch.randn(5, 4, dtype=torch.float64)
    delta = 1e-3 * torch.randn(5, 4, dtype=torch.float64)

    def implied_end(p):
        return z + (t_e - t)[:, None] * param.velocity(p, z, t, t_s, t_e, abar_s, abar_e)

    sens = param.endpoint_sensitivity(t, t_s, t_e, abar_s, abar_e)
    torch.testing.assert_close(implied_end(pred + delta) - implied_end(pred), sens[:, None] * delta)
    if name != "velocity":  # at the window start the sensitivity is |eta_k| (~2.5 for B in SD's first window)
        assert abs(sens[0].item()) == pytest.approx(abs(param.lambda_eta(abar_s, abar_e)[1][0].item()))


def test_prediction_type_names():
    assert canonical_prediction_type("epsilon") == "diff_eps"
    for name in ("ddim_eps", "diff_eps", "velocity"):
        assert canonical_prediction_type(name) == name
    with pytest.raises(ValueError, match="velocity"):
        canonical_prediction_type("v_prediction")
    with pytest.raises(ValueError, match="ddim_eps"):
        get_parameterization("nonsense")
