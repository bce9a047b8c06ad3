"""The teacher window solver phi: composition, v-prediction teachers, CFG, conditioning pass-through."""

import pytest
import torch

from perflow_video.method.noise_schedule import make_alphas_cumprod
from perflow_video.method.teacher_solver import Conditioning, ddim_step, solve_window
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
