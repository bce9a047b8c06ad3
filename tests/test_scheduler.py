"""PeRFlowScheduler against docs/method.md §4, written out independently here, for every type, K and n."""

import logging
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler

from perflow_video.method.noise_schedule import make_alphas_cumprod
from perflow_video.method.teacher_solver import Conditioning, solve_window
from perflow_video.scheduler import PeRFlowScheduler
from perflow_video.tiny.tiny_models import tiny_scheduler
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


def official_timesteps(n: int, K: int) -> list[int]:
    """The official PeRFlow ``set_timesteps`` (n >= K), restated: window starts ``1.*i/K`` (i = K ... 1),
    ends the next start (0 for the last), ``np.linspace(t_s, t_e, m, endpoint=False)`` per window with
    the first ``n % K`` windows one step longer, then ``(t * 1000).astype(np.int64)``."""
    starts = [1.0 * i / K for i in range(1, K + 1)][::-1]
    ends = starts[1:] + [0]
    parts = [
        np.linspace(starts[i], ends[i], num=n // K + (1 if i < n % K else 0), endpoint=False)
        for i in range(K)
    ]
    return (np.concatenate(parts) * 1000).astype(np.int64).tolist()


def official_window(timestep: int, K: int) -> int:
    """The official ``Time_Windows.get_window`` on t = timestep / 1000: first window whose end t is above
    by more than a tenth of a timestep."""
    ends = [1.0 * i / K for i in range(1, K + 1)][::-1][1:] + [0]
    tp, idx = timestep / 1000, 0
    while tp - 0.1 / 1000 <= ends[idx]:
        idx += 1
    return idx


def test_timesteps_equal_the_official_rule_for_every_k_and_n():
    """Official: float64 points truncated with no slack. 263 of these 955 lists once differed by +1."""
    for K in range(1, 11):
        s = PeRFlowScheduler(num_time_windows=K)
        for n in range(K, 101):
            s.set_timesteps(n)
            assert s.timesteps.dtype == torch.int64
            assert s.timesteps.tolist() == official_timesteps(n, K), (K, n)


@pytest.mark.parametrize(
    "K, n, expected",
    [
        (1, 5, [1000, 800, 600, 399, 199]),
        (2, 10, [1000, 900, 800, 700, 600, 500, 400, 300, 199, 99]),
        (4, 20, [1000, 950, 900, 850, 800, 750, 700, 650, 600, 550, 500, 450, 400, 350, 300, 250, 200, 150, 99, 49]),
        (3, 3, [1000, 666, 333]),
    ],
)  # fmt: skip
def test_truncation_examples(K, n, expected):
    s = PeRFlowScheduler(num_time_windows=K)
    s.set_timesteps(n)
    assert s.timesteps.tolist() == expected


def test_every_truncated_timestep_is_stepped_in_the_window_it_was_generated_in():
    """Truncation lowers a point by < 1 timestep, so it stays in its window ([t_s, t_e), t_e excluded).
    ``step`` must find that window from the value, as the official lookup does: with the velocity type,
    v = 1 and z = 0, ``pred_window_end`` = z + (t_e - t) v exposes the t_e it used."""
    z, v = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    for K in range(1, 11):
        s = PeRFlowScheduler(num_time_windows=K, prediction_type="velocity")
        stepped = set()  # the window depends on (K, tau) only: step each value once (~6k steps, not ~48k)
        for n in range(K, 101):
            s.set_timesteps(n)
            generated = [k for k in range(K) for _ in range(n // K + (1 if k < n % K else 0))]
            for tau, k in zip(s.timesteps.tolist(), generated, strict=True):
                assert official_window(tau, K) == k, (K, n, tau)
                if tau in stepped:
                    continue
                stepped.add(tau)
                t_e_used = s.step(v, tau, z).pred_window_end.item() + tau / 1000
                assert t_e_used == pytest.approx((K - k - 1) / K, abs=1e-12), (K, n, tau)


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
@pytest.mark.parametrize("K", [1, 2, 3, 4])
@pytest.mark.parametrize(
    "n", [1, 3, 4, 5, 8, 10, 20]
)  # K=1 n=5, K=2 n=10, K=4 n=20: truncated 399 / 199 / 99 / 49
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


@pytest.mark.parametrize("family", ["sd15", "animatediff"])
def test_from_a_teachers_config_without_prediction_type_refuses_to_guess(family, tmp_path):
    """A teacher's DDIM config says prediction_type="epsilon" about the *teacher*; inheriting it used to
    make every converted scheduler ``diff_eps`` silently, wrong for a ``ddim_eps`` student."""
    cfg = tiny_scheduler(family).config
    assert cfg["prediction_type"] == "epsilon"
    with pytest.raises(ValueError, match=r"prediction_type=.*'ddim_eps'") as err:
        PeRFlowScheduler.from_config(cfg, num_time_windows=4)
    assert "teacher" in str(err.value)
    # the same through from_pretrained of a teacher's saved scheduler folder, and for another class
    tiny_scheduler(family).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="DDIMScheduler config"):
        PeRFlowScheduler.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="prediction_type"):
        PeRFlowScheduler.from_config(PNDMScheduler(prediction_type="epsilon").config)
    with pytest.raises(ValueError, match="prediction_type"):
        PeRFlowScheduler.from_config(cfg, prediction_type=None)
    # naming it is the documented path, and it wins over the teacher's value
    for name in ("ddim_eps", "diff_eps"):
        assert PeRFlowScheduler.from_config(cfg, prediction_type=name).config.prediction_type == name
        assert PeRFlowScheduler.from_pretrained(tmp_path, prediction_type=name).config.prediction_type == name


def test_perflow_configs_keep_their_own_prediction_type(tmp_path):
    """Our saved configs, released ones (legacy "epsilon", no _class_name) and a _class_name-only one."""
    s = PeRFlowScheduler(num_time_windows=3, prediction_type="ddim_eps")
    assert PeRFlowScheduler.from_config(s.config).config.prediction_type == "ddim_eps"
    s.save_pretrained(tmp_path)
    assert PeRFlowScheduler.from_pretrained(tmp_path).config.prediction_type == "ddim_eps"
    released = {"prediction_type": "epsilon", "num_time_windows": 4, "beta_schedule": "scaled_linear"}
    assert PeRFlowScheduler.from_config(released).config.prediction_type == "diff_eps"
    named = {"_class_name": "PeRFlowScheduler", "prediction_type": "velocity"}
    assert PeRFlowScheduler.from_config(named).config.prediction_type == "velocity"


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


# Video-to-video / img2img: add_noise at a kept window start and step_index bookkeeping (module docstring).
# abar_s of AnimateDiff's linear betas at the window starts, from docs/method.md §5's table.
ANIMATEDIFF_ABAR_AT_WINDOW_START = {1000: 0.001579, 750: 0.022729, 500: 0.161812, 250: 0.570866}


def hand_linear_abar(index: int) -> float:
    """abar[index] of linear betas 0.00085 -> 0.012 over 1000 steps, computed here in float64 from scratch."""
    betas = np.linspace(0.00085, 0.012, 1000, dtype=np.float32).astype(np.float64)
    return float(np.prod(1.0 - betas[: index + 1]))


@pytest.mark.parametrize("tau", [1000, 750, 500, 250])
def test_add_noise_at_a_window_start_is_the_teachers_marginal_the_student_was_trained_on(tau):
    """z_s = sqrt(abar_s) z_0 + sqrt(1 - abar_s) eps with abar_s = abar[tau - 1] (Algorithm 1 step 3), on
    the (B, F, C, H, W) layout AnimateDiffVideoToVideoPipeline hands add_noise, one timestep per sample."""
    s = PeRFlowScheduler.from_config(animatediff_ddim_config(), prediction_type="ddim_eps")
    abar = hand_linear_abar(tau - 1)
    assert abar == pytest.approx(ANIMATEDIFF_ABAR_AT_WINDOW_START[tau], abs=1e-6)
    g = torch.Generator().manual_seed(tau)
    z0, eps = torch.randn(2, 3, 4, 2, 2, generator=g), torch.randn(2, 3, 4, 2, 2, generator=g)
    out = s.add_noise(z0, eps, torch.tensor([tau, tau]))
    expected = (math.sqrt(abar) * z0.double() + math.sqrt(1 - abar) * eps.double()).float()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert out.dtype == z0.dtype
    # one timestep for the whole batch broadcasts; bf16 samples stay bf16
    torch.testing.assert_close(s.add_noise(z0, eps, torch.tensor(tau)), out)
    assert s.add_noise(z0.bfloat16(), eps.bfloat16(), torch.tensor([tau])).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="no timestep"):
        s.add_noise(z0, eps, torch.tensor([], dtype=torch.long))


def test_set_begin_index_starts_the_step_index_there_and_step_advances_it():
    s = PeRFlowScheduler(num_time_windows=4)
    s.set_timesteps(4)
    assert s.step_index is None and s.begin_index is None
    s.set_begin_index(2)  # what img2img pipelines do for strength 0.5
    z = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    eps = torch.randn_like(z)
    via_begin = [s.step(eps, 500, z).prev_sample]
    assert s.step_index == 3 and s.begin_index == 2
    via_begin.append(s.step(eps, 250, via_begin[0]).prev_sample)
    assert s.step_index == 4
    # without a begin index (AnimateDiffVideoToVideoPipeline in diffusers 0.42.1): found from the timestep
    s.set_timesteps(4)
    assert s.step_index is None and s.begin_index is None  # set_timesteps resets both
    first = s.step(eps, 500, z).prev_sample
    assert s.step_index == 3
    torch.testing.assert_close(first, via_begin[0])
    with pytest.raises(ValueError, match="out of range"):
        s.set_begin_index(4)


def test_step_index_resynchronises_when_the_caller_steps_another_timestep():
    """Timesteps are unique, so the timestep given names its step even out of order (as before)."""
    s = PeRFlowScheduler(num_time_windows=4)
    s.set_timesteps(4)
    z, eps = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    s.step(eps, 1000, z)
    assert s.step_index == 1
    s.step(eps, 250, z)  # skipped ahead
    assert s.step_index == 4
    with pytest.raises(ValueError, match="not one of the scheduler's timesteps"):
        s.step(eps, 999, z)
