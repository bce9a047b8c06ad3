"""The time convention of docs/method.md §1, tested at both ends."""

import pytest
import torch

from perflow_video.method.noise_schedule import make_alphas_cumprod
from perflow_video.method.time_windows import (
    abar_at,
    abar_index_of_time,
    time_of_timestep,
    timestep_of_time,
    window_bounds,
    window_index,
    window_of_time,
)


def test_window_bounds_cover_unit_interval_noisy_to_clean():
    K = 4
    bounds = [window_bounds(k, K) for k in range(K)]
    assert bounds == [(1.0, 0.75), (0.75, 0.5), (0.5, 0.25), (0.25, 0.0)]
    with pytest.raises(ValueError):
        window_bounds(4, 4)


@pytest.mark.parametrize(
    "t, expected",
    [(1.0, 0), (0.9, 0), (0.75, 1), (0.7500000001, 1), (0.76, 0), (0.5, 2), (0.25, 3), (0.1, 3), (0.0, 3)],
)
def test_window_membership_start_inclusive_end_exclusive(t, expected):
    assert int(window_index(torch.tensor([t], dtype=torch.float64), 4)) == expected


def test_window_of_time_contains_time():
    t = torch.rand(1000, dtype=torch.float64)
    for K in (1, 2, 3, 4, 7):
        t_s, t_e = window_of_time(t, K)
        assert torch.all(t <= t_s + 1e-4) and torch.all(t > t_e)
        assert torch.allclose(t_s - t_e, torch.full_like(t, 1.0 / K))


def test_timestep_endpoints_and_round_trip_float64_and_float32():
    assert int(timestep_of_time(torch.tensor(1.0))) == 1000
    assert int(timestep_of_time(torch.tensor(0.0))) == 0
    tau = torch.arange(0, 1001)
    assert torch.equal(timestep_of_time(time_of_timestep(tau)), tau)
    # float32 times (what a pipeline hands around) must not lose a step: 0.7 is 0.69999998 in float32.
    assert torch.equal(timestep_of_time(time_of_timestep(tau).float()), tau)


def test_timestep_truncates_between_grid_points():
    assert int(timestep_of_time(torch.tensor(0.91666, dtype=torch.float64))) == 916


def test_abar_at_window_edges():
    abar = make_alphas_cumprod()
    t = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    assert abar_index_of_time(t).tolist() == [999, 749, 499, 249, 0]
    assert torch.equal(abar_at(t, abar), abar[[999, 749, 499, 249, 0]])


def test_scheduler_config_abar_is_diffusers_own_and_zero_terminal_snr_is_refused():
    from diffusers import DDIMScheduler

    from perflow_video.method.noise_schedule import alphas_cumprod_from_scheduler_config
    from perflow_video.tiny.teacher_models import teacher_scheduler_config

    config = teacher_scheduler_config("animatediff")
    assert torch.equal(alphas_cumprod_from_scheduler_config(config), DDIMScheduler(**config).alphas_cumprod)
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):  # else: silently the wrong schedule
        alphas_cumprod_from_scheduler_config(teacher_scheduler_config("zero-snr-v"))
    from perflow_video.scheduler import perflow_scheduler_for

    assert torch.equal(
        perflow_scheduler_for(config, "ddim_eps", 4).alphas_cumprod, DDIMScheduler(**config).alphas_cumprod
    )
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        perflow_scheduler_for(teacher_scheduler_config("zero-snr-v"), "velocity", 4)
