"""The teacher window solver phi: composition, v-prediction teachers, CFG, conditioning pass-through."""

import os
from pathlib import Path

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from perflow_video.evaluation.solver_study import (
    load_tiny_teacher,
    restricted_scheduler,
    run_study,
    window_grid,
    window_starts,
)
from perflow_video.method.noise_schedule import make_alphas_cumprod
from perflow_video.method.teacher_solver import (
    GRID_SPACINGS,
    Conditioning,
    ddim_step,
    half_log_snr,
    solve_window,
    solver_grid,
)
from perflow_video.method.time_windows import abar_index_of_time, window_bounds
from perflow_video.tiny.embedded_teacher import tiny_teacher_folder
from perflow_video.toy.toy_problem import GaussianMixture, MixtureTeacher

ABAR = make_alphas_cumprod()


def toy_teacher():
    return MixtureTeacher(GaussianMixture.ring(), ABAR)


def ones(n=32):
    return torch.ones(n, dtype=torch.float64)


def test_solving_two_half_windows_equals_one_window_with_twice_the_steps():
    teacher, z = toy_teacher(), torch.randn(32, 2, dtype=torch.float64)
    whole = solve_window(teacher, z, 1.0 * ones(), 0.5 * ones(), ABAR, Conditioning(), num_steps=8)
    half = solve_window(teacher, z, 1.0 * ones(), 0.75 * ones(), ABAR, Conditioning(), num_steps=4)
    half = solve_window(teacher, half, 0.75 * ones(), 0.5 * ones(), ABAR, Conditioning(), num_steps=4)
    torch.testing.assert_close(whole, half, rtol=1e-12, atol=1e-12)


def test_one_step_is_ddim_with_teacher_eps_at_its_own_noise_level():
    teacher, z = toy_teacher(), torch.randn(32, 2, dtype=torch.float64)
    out = solve_window(teacher, z, 0.75 * ones(), 0.5 * ones(), ABAR, Conditioning(), num_steps=1)
    eps = teacher(z, torch.full((32,), 749))
    a_s, a_e = ABAR[749].double(), ABAR[499].double()
    torch.testing.assert_close(out, ddim_step(z, eps, a_s * ones(), a_e * ones()))


def test_samples_in_different_windows_are_solved_independently():
    teacher, z = toy_teacher(), torch.randn(2, 2, dtype=torch.float64)
    t_s, t_e = torch.tensor([1.0, 0.5], dtype=torch.float64), torch.tensor([0.75, 0.25], dtype=torch.float64)
    both = solve_window(teacher, z, t_s, t_e, ABAR, Conditioning(), num_steps=3)
    for i in range(2):
        single = solve_window(
            teacher, z[i : i + 1], t_s[i : i + 1], t_e[i : i + 1], ABAR, Conditioning(), num_steps=3
        )
        torch.testing.assert_close(both[i : i + 1], single)


class VTeacher(torch.nn.Module):
    """The same mixture teacher, answering in v-prediction (SD2.1 style): v = sqrt(a) eps - sqrt(1-a) x0."""

    def __init__(self, eps_teacher):
        super().__init__()
        self.eps_teacher = eps_teacher

    def forward(self, sample, timestep, encoder_hidden_states=None):
        eps = self.eps_teacher(sample, timestep)
        a = ABAR.double()[timestep.long()][:, None]
        x0 = (sample - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0


def test_v_prediction_teacher_gives_the_same_trajectory():
    teacher, z = toy_teacher(), torch.randn(32, 2, dtype=torch.float64)
    ref = solve_window(teacher, z, ones(), 0.75 * ones(), ABAR, Conditioning(), num_steps=8)
    out = solve_window(
        VTeacher(teacher),
        z,
        ones(),
        0.75 * ones(),
        ABAR,
        Conditioning(),
        num_steps=8,
        prediction_type="v_prediction",
    )
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


class CondTeacher(torch.nn.Module):
    """eps = z * mean(encoder_hidden_states) (+ text_embeds): makes conditioning observable."""

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None):
        scale = encoder_hidden_states.mean(dim=(1, 2))
        if added_cond_kwargs is not None:
            scale = scale + added_cond_kwargs["text_embeds"].mean(dim=1)
        return sample * 0.1 * scale.reshape(-1, *([1] * (sample.ndim - 1)))


def test_cfg_fixed_is_linear_extrapolation_and_cfg_with_equal_prompts_is_a_no_op():
    teacher, z = CondTeacher(), torch.randn(3, 4, 2, 5, 5, dtype=torch.float64)  # 5-D video latents
    cond = Conditioning(torch.full((3, 7, 8), 2.0, dtype=torch.float64), {"text_embeds": torch.ones(3, 4)})
    uncond = Conditioning(torch.zeros(3, 7, 8, dtype=torch.float64), {"text_embeds": torch.zeros(3, 4)})
    kw = dict(alphas_cumprod=ABAR, num_steps=1)
    t_s, t_e = ones(3), 0.75 * ones(3)
    no_cfg = solve_window(teacher, z, t_s, t_e, cond=cond, guidance_scale=1.0, **kw)
    same = solve_window(teacher, z, t_s, t_e, cond=cond, uncond=cond, guidance_scale=7.5, **kw)
    torch.testing.assert_close(no_cfg, same)
    guided = solve_window(teacher, z, t_s, t_e, cond=cond, uncond=uncond, guidance_scale=3.0, **kw)
    eps_c, eps_u = z * 0.1 * 3.0, z * 0.0
    a_s, a_e = ABAR[999].double() * t_s, ABAR[749].double() * t_s
    torch.testing.assert_close(guided, ddim_step(z, eps_u + 3.0 * (eps_c - eps_u), a_s, a_e))
    with pytest.raises(ValueError, match="unconditional"):
        solve_window(teacher, z, t_s, t_e, cond=cond, guidance_scale=2.0, **kw)


def test_rejects_windows_going_the_wrong_way():
    with pytest.raises(ValueError, match="t_s > t_e"):
        solve_window(toy_teacher(), torch.zeros(2, 2), 0.5 * ones(2), 0.75 * ones(2), ABAR, Conditioning())


# ----------------------------------------------------------------------------------------------------
# The multistep solvers (solver="dpm++" / "unipc") and the solver grid (docs/teacher_solver.md)
# ----------------------------------------------------------------------------------------------------

MULTISTEP = ("dpm++", "unipc")


def _solve(teacher, z, t_s, t_e, num_steps, solver, spacing=None):
    n = z.shape[0]
    return solve_window(teacher, z, t_s * ones(n), t_e * ones(n), ABAR, Conditioning(), num_steps=num_steps,
                        solver=solver, spacing=spacing)  # fmt: skip


def _diffusers_solve(kind, teacher, z, t_s, t_e, num_steps, spacing):
    """The same window by diffusers' own scheduler, restricted to the window (solver_study)."""
    grid = window_grid(t_s, t_e, num_steps, spacing, ABAR)
    sched = restricted_scheduler(kind, grid, 0.00085, 0.012, "scaled_linear")
    for i in range(num_steps):
        eps = teacher(z, torch.full((z.shape[0],), grid[i]))
        z = sched.step(eps, sched.timesteps[i], z).prev_sample
    return z


@pytest.mark.parametrize("spacing", GRID_SPACINGS)
@pytest.mark.parametrize("solver", MULTISTEP)
@pytest.mark.parametrize(
    ("t_s", "t_e", "num_steps"),
    [(1.0, 0.75, 4), (0.5, 0.25, 3), (0.25, 0.0, 2), (0.25, 0.0, 4), (1.0, 0.0, 10)],
)
def test_multistep_solvers_are_diffusers_schedulers_restricted_to_the_window(
    solver, spacing, t_s, t_e, num_steps
):
    teacher, z = (
        toy_teacher(),
        torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
    )
    ours = _solve(teacher, z, t_s, t_e, num_steps, solver, spacing)
    ref = _diffusers_solve(solver, teacher, z, t_s, t_e, num_steps, spacing)
    # diffusers keeps its sigmas in float32: agreement to ~1e-7 of a displacement of order 1
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6)
    assert (ours - z).abs().max() > 1e-3  # the solve moved


def test_dpm_solver_plus_plus_is_the_unmodified_diffusers_scheduler_over_the_full_interval():
    """No restriction trick: [1, 0] ends at abar[0], which is diffusers' final sigma "sigma_min"."""
    teacher, z = (
        toy_teacher(),
        torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
    )
    grid = window_grid(1.0, 0.0, 6, "log_snr", ABAR)
    assert grid[0] == 999 and grid[-1] == 0
    sched = DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, algorithm_type="dpmsolver++",
        solver_order=2, lower_order_final=False, final_sigmas_type="sigma_min",
    )  # fmt: skip
    sched.set_timesteps(timesteps=grid[:-1])
    x = z
    for tau in sched.timesteps:
        x = sched.step(teacher(x, torch.full((16,), int(tau))), tau, x).prev_sample
    torch.testing.assert_close(_solve(teacher, z, 1.0, 0.0, 6, "dpm++"), x, rtol=0, atol=2e-6)


def test_solver_grids():
    t_s, t_e = torch.tensor([1.0, 0.25], dtype=torch.float64), torch.tensor([0.75, 0.0], dtype=torch.float64)
    time_grid = torch.stack(solver_grid(t_s, t_e, 4, ABAR, "time", strict=True))
    assert time_grid[:, 0].tolist() == [999, 936, 874, 811, 749]
    assert time_grid[:, 1].tolist() == [249, 186, 124, 61, 0]
    snr_grid = torch.stack(solver_grid(t_s, t_e, 4, ABAR, "log_snr", strict=True))
    assert snr_grid[0].tolist() == [999, 249] and snr_grid[-1].tolist() == [749, 0]
    assert torch.all(snr_grid[1:] < snr_grid[:-1])
    assert (snr_grid[:, 0] - time_grid[:, 0]).abs().max() <= 15  # away from the data: near the time grid
    assert snr_grid[:, 1].tolist()[2] < 40  # last window: points pulled towards the data
    lam = half_log_snr(ABAR.double())[snr_grid[:, 1]]
    steps = lam[1:] - lam[:-1]
    assert steps.max() / steps.min() < 1.5  # about uniform in lambda, up to index rounding
    dense = torch.stack(solver_grid(t_s[1:], t_e[1:], 200, ABAR, "log_snr", strict=True))
    assert torch.all(dense[1:] < dense[:-1])  # rounding collisions near abar[0] resolved
    with pytest.raises(ValueError, match="distinct timesteps"):
        solver_grid(t_s, t_e, 300, ABAR, "log_snr", strict=True)
    with pytest.raises(ValueError, match="grid spacing"):
        solver_grid(t_s, t_e, 4, ABAR, "karras", strict=True)


def _gaussian_teacher(mean: float, std: float):
    return MixtureTeacher(GaussianMixture(torch.full((1, 2), mean, dtype=torch.float64), std), ABAR)


def _exact_gaussian_endpoint(z, mean, std, t_s, t_e):
    """Probability-flow ODE of N(mean, std^2) data: the standardized point (z - sqrt(a) mean) / sd(a) is constant."""
    a_s = ABAR.double()[abar_index_of_time(torch.tensor([t_s]))[0]]
    a_e = ABAR.double()[abar_index_of_time(torch.tensor([t_e]))[0]]
    sd_s, sd_e = (a_s * std**2 + 1 - a_s).sqrt(), (a_e * std**2 + 1 - a_e).sqrt()
    return a_e.sqrt() * mean + (z - a_s.sqrt() * mean) * sd_e / sd_s


WINDOWS = [(1.0, 0.75), (0.75, 0.5), (0.5, 0.25), (0.25, 0.0)]


@pytest.mark.parametrize("spacing", GRID_SPACINGS)
@pytest.mark.parametrize("solver", ("ddim", *MULTISTEP))
@pytest.mark.parametrize(("t_s", "t_e"), WINDOWS)
def test_every_solver_is_exact_when_the_data_prediction_is_constant(solver, spacing, t_s, t_e):
    """Point-mass data: x0(z, t) = mean everywhere, and exponential integrators of any order are exact."""
    teacher, z = _gaussian_teacher(0.7, 0.0), torch.randn(8, 2, dtype=torch.float64)
    exact = _exact_gaussian_endpoint(z, 0.7, 0.0, t_s, t_e)
    for m in (1, 2, 3, 4):
        torch.testing.assert_close(
            _solve(teacher, z, t_s, t_e, m, solver, spacing), exact, rtol=1e-10, atol=1e-10
        )


@pytest.mark.parametrize(("t_s", "t_e"), WINDOWS)
def test_multistep_solvers_converge_at_second_order_to_the_exact_gaussian_endpoint(t_s, t_e):
    """N(0.3, 0.5^2) data: the exact window end is known. Halving the step (M = 4 -> 8) divides DDIM's error by
    ~2 and the multistep solvers' by > 3 (second order; UniPC's corrector makes it ~6), at M = 4 both beat
    DDIM at M = 8 in every window, and at M = 64 they are exact to 1e-3 of the displacement (in the last window
    the integer timesteps near abar[0] keep the log-SNR grid from being uniform, which caps them at ~4e-4)."""
    teacher, z = _gaussian_teacher(0.3, 0.5), torch.randn(64, 2, dtype=torch.float64)
    exact = _exact_gaussian_endpoint(z, 0.3, 0.5, t_s, t_e)

    def err(solver, m):
        return (_solve(teacher, z, t_s, t_e, m, solver) - exact).pow(2).mean().sqrt().item()

    assert 1.6 < err("ddim", 4) / err("ddim", 8) < 2.5
    for solver in MULTISTEP:
        assert err(solver, 4) / err(solver, 8) > 3.0
        assert err(solver, 4) < err("ddim", 8)
        assert err(solver, 64) < 1e-3 * (exact - z).pow(2).mean().sqrt().item()


def test_multistep_solvers_handle_samples_in_different_windows_and_reject_bad_input():
    teacher, z = toy_teacher(), torch.randn(2, 2, dtype=torch.float64)
    t_s, t_e = torch.tensor([1.0, 0.25], dtype=torch.float64), torch.tensor([0.75, 0.0], dtype=torch.float64)
    for solver in MULTISTEP:
        both = solve_window(teacher, z, t_s, t_e, ABAR, Conditioning(), num_steps=3, solver=solver)
        for i in range(2):
            one = solve_window(teacher, z[i : i + 1], t_s[i : i + 1], t_e[i : i + 1], ABAR, Conditioning(),
                               num_steps=3, solver=solver)  # fmt: skip
            torch.testing.assert_close(both[i : i + 1], one)
    with pytest.raises(ValueError, match="unknown teacher solver"):
        solve_window(teacher, z, t_s, t_e, ABAR, Conditioning(), solver="euler")
    with pytest.raises(ValueError, match="distinct timesteps"):
        solve_window(teacher, z, t_s, t_e, ABAR, Conditioning(), num_steps=300, solver="dpm++")


def test_ddim_default_is_unchanged_by_the_solver_option():
    teacher, z = toy_teacher(), torch.randn(8, 2, dtype=torch.float64)
    default = solve_window(teacher, z, ones(8), 0.75 * ones(8), ABAR, Conditioning(), num_steps=5)
    explicit = _solve(teacher, z, 1.0, 0.75, 5, "ddim", "time")
    assert torch.equal(default, explicit)


# The teacher shipped in the package (or another snapshot of scripts/train_tiny_teacher.py).
TINY_TEACHER = Path(os.environ.get("PERFLOW_TINY_TEACHER", str(tiny_teacher_folder())))


@pytest.mark.parametrize("solver", MULTISTEP)
def test_on_the_trained_tiny_teacher_four_multistep_steps_beat_eight_ddim_steps(solver):
    """The measured property of docs/teacher_solver.md, on a trained tiny AnimateDiff teacher (16 x 8 x 8
    latents, window starts as the trainer draws them, CFG-sync): in every window the endpoint error of the
    multistep solver with M = 4 is at most 0.8 times DDIM's with M = 8, against a UniPC-16 log-SNR reference
    (the study's references agree with it to < 1 % of the displacement)."""
    torch.set_num_threads(1)
    teacher = load_tiny_teacher(TINY_TEACHER)
    starts = window_starts(teacher, 2, 4, seed=1)
    cond = teacher.conditioning(starts.prompts)
    for k in range(4):
        t_s, t_e = window_bounds(k, 4)
        z_s = starts.z_s(k, 4, teacher.alphas_cumprod)

        def solve(name, m, z=z_s, edges=(t_s, t_e)):
            ts, te = (torch.full((2,), v, dtype=torch.float64) for v in edges)
            return solve_window(
                teacher.unet, z, ts, te, teacher.alphas_cumprod, cond, num_steps=m, solver=name
            )

        ref = solve("unipc", 16)
        err = {
            name: (solve(name, m) - ref).pow(2).mean().sqrt().item() for name, m in (("ddim", 8), (solver, 4))
        }
        assert err[solver] <= 0.8 * err["ddim"], (k, err)


def test_the_study_scores_its_reference_at_zero_and_fewer_steps_worse_and_matches_diffusers():
    """run_study on the shipped teacher, tiny: DDIM at the reference's own M reproduces it exactly, DDIM-2 is
    farther from it than DDIM-4 in every window, and diffusers' DPM-Solver++ restricted to the window agrees
    with ours (the cross-check the study reports)."""
    torch.set_num_threads(1)
    runs = (("ddim", 2, "time"), ("ddim", 4, "time"), ("ddim", 8, "time"), ("dpm++", 4, "log_snr"))
    result = run_study(
        load_tiny_teacher(TINY_TEACHER), num_samples=3, reference_steps=8, guidance_scale=2.0, runs=runs,
        timing_batch=1, timing_repeats=1, chunk=2, alt_reference_steps=4, self_check_samples=2, log=lambda s: None,
    )  # fmt: skip
    rows = {(r.solver, r.steps, r.window): r for r in result.rows}
    assert len(result.rows) == 4 * len(runs) and len(result.displacement) == 4
    for k in range(4):
        assert rows[("ddim", 8, k)].rms_error == 0.0
        assert rows[("ddim", 2, k)].rms_error > rows[("ddim", 4, k)].rms_error > 0
        assert rows[("dpm++", 4, k)].diffusers_gap < 1e-3 * result.displacement[k]
