"""evaluation/: the sampling loop, the target pool and the recipe trainer of the recipe study."""

from __future__ import annotations

import torch

from perflow_video.evaluation.recipe_study import (
    Fidelity,
    Recipe,
    build_target_pool,
    chains_from_windows,
    reference_trajectory,
    train_recipe,
    window_errors,
)
from perflow_video.evaluation.sampling import per_sample_rms, rms_distance, sample_latents
from perflow_video.method.noise_schedule import alphas_cumprod_from_scheduler_config
from perflow_video.method.reflow_objective import ReflowConfig, student_loss
from perflow_video.method.teacher_solver import Conditioning
from perflow_video.scheduler import perflow_scheduler_for
from perflow_video.tiny.tiny_models import tiny_scheduler, tiny_unet_motion

FRAMES = 2


def _expand(text: torch.Tensor) -> Conditioning:
    return Conditioning(text.repeat_interleave(FRAMES, dim=0))


def _setup():
    torch.manual_seed(0)
    unet = tiny_unet_motion(seed=0).eval()
    config = dict(tiny_scheduler("animatediff").config)
    return unet, config, alphas_cumprod_from_scheduler_config(config)


def test_perflow_b_sampling_with_the_teacher_is_one_ddim_step_per_window():
    """Parameterization B: the student's window step is DDIM from t_s to t_e with eps(z_s, 1000 t_s)."""
    unet, config, abar = _setup()
    noise = torch.randn(2, 4, FRAMES, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = _expand(torch.randn(2, 77, 32))
    got = sample_latents(unet, perflow_scheduler_for(config, "ddim_eps", 4), noise, cond, None, 4)
    z = noise.double()
    for k in range(4):
        a_s, a_e = abar[999 - 250 * k].double(), (abar[749 - 250 * k] if k < 3 else abar[0]).double()
        with torch.no_grad():
            eps = unet(
                z.float(), torch.tensor(1000.0 - 250 * k), encoder_hidden_states=cond.encoder_hidden_states
            )
        eps = eps.sample.double()
        x0 = (z - (1 - a_s).sqrt() * eps) / a_s.sqrt()
        z = a_e.sqrt() * x0 + (1 - a_e).sqrt() * eps
    assert torch.allclose(got.double(), z, atol=1e-4)


def test_chains_from_windows_start_on_the_reference_and_the_last_is_the_last_local_error():
    unet, config, abar = _setup()
    noise = torch.randn(3, 4, FRAMES, 8, 8, generator=torch.Generator().manual_seed(3))
    cond = _expand(torch.randn(3, 77, 32, generator=torch.Generator().manual_seed(4)))
    trajectory = reference_trajectory(unet, noise, cond, abar, 4, steps_per_window=3)
    sampler = perflow_scheduler_for(config, "ddim_eps", 4)
    chains = chains_from_windows(unet, sampler, trajectory, cond)
    assert len(chains) == 4 and all(c.shape == (3,) for c in chains)
    plain = sample_latents(unet, perflow_scheduler_for(config, "ddim_eps", 4), noise, cond, None, 4)
    torch.testing.assert_close(chains[0], per_sample_rms(plain, trajectory[-1]), rtol=0, atol=1e-5)
    last_local = window_errors(unet, perflow_scheduler_for(config, "ddim_eps", 4), trajectory, cond)[-1]
    assert abs(float(chains[-1].pow(2).mean().sqrt()) - last_local) < 1e-5
    assert float(chains[-1].mean()) < float(chains[0].mean())  # fewer sampled windows, closer


def test_distances():
    a, b = torch.zeros(2, 3), torch.tensor([[3.0, 3.0, 3.0], [0.0, 0.0, 0.0]])
    assert rms_distance(a, b) == torch.tensor(4.5).sqrt().item()
    assert per_sample_rms(a, b).tolist() == [3.0, 0.0]


def _pool_and_fidelity(unet, config, abar):
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 4, FRAMES, 8, 8, generator=gen), torch.randn(4, 77, 32, generator=gen))]
    reflow = ReflowConfig(num_time_windows=2, solver_steps=2)
    pool = build_target_pool(unet, batches, abar, reflow, _expand, seed=0)
    noise = torch.randn(2, 4, FRAMES, 8, 8, generator=gen)
    cond = _expand(torch.randn(2, 77, 32, generator=gen))
    fid = Fidelity(noise, cond, torch.zeros_like(noise))
    perflow = perflow_scheduler_for(config, "ddim_eps", 2)
    return pool, lambda model: fid.distance(model, perflow, 2)


def test_a_zero_learning_rate_changes_nothing_and_motion_only_keeps_the_spatial_weights():
    unet, config, abar = _setup()
    pool, score = _pool_and_fidelity(unet, config, abar)
    motion = [k for k, _ in unet.named_parameters() if "motion_modules" in k]
    still = train_recipe(unet, motion, pool, Recipe("zero", lr=0.0), score, _expand, 8, 4)
    assert still.weight_change == [0.0, 0.0, 0.0] and len(set(still.scores)) == 1
    moved = train_recipe(unet, motion, pool, Recipe("sgd", optimizer="sgd", lr=10.0), score, _expand, 8, 4)
    assert moved.weight_change[-1] > 0 and moved.samples == [0, 4, 8]


def test_training_on_the_pool_lowers_its_loss():
    unet, config, abar = _setup()
    pool, _ = _pool_and_fidelity(unet, config, abar)
    everything = [k for k, _ in unet.named_parameters()]
    targets, text = pool.batch(torch.arange(len(pool)))

    def pool_loss(model) -> float:
        with torch.no_grad():
            return student_loss(model, targets, _expand(text)).loss.item()

    result = train_recipe(unet, everything, pool, Recipe("adamw", lr=1e-3), pool_loss, _expand, 160, 160)
    assert result.scores[-1] < 0.7 * result.scores[0]  # measured: 0.56 x in 40 steps


def test_lora_delta_at_full_rank_is_the_delta_on_its_keys_and_samples_approach_the_full_student():
    from perflow_video.evaluation.lora_fidelity import lora_delta, sample_distance

    unet, config, _ = _setup()
    gen = torch.Generator().manual_seed(4)
    delta = {k: 1e-2 * torch.randn(p.shape, generator=gen) for k, p in unet.named_parameters()}
    full = lora_delta(delta, rank=4096)
    assert full and all(torch.allclose(full[k], delta[k], atol=1e-6) for k in full)
    assert all(delta[k].ndim >= 2 for k in full)  # biases / norms are not in a LoRA
    noise = torch.randn(2, 4, FRAMES, 8, 8, generator=gen)
    cond = _expand(torch.randn(2, 77, 32, generator=gen))
    d = sample_distance(unet, delta, [1, 4096], perflow_scheduler_for(config, "ddim_eps", 4), noise, cond)
    assert d["4096"] < d["1"] < d["0"] * 1.5 and d["4096"] < 0.5 * d["0"]


def test_lora_delta_of_a_motion_only_delta_is_its_motion_lora():
    from perflow_video.evaluation.lora_fidelity import lora_delta

    unet, _, _ = _setup()
    gen = torch.Generator().manual_seed(5)
    delta = {
        k: torch.randn(p.shape, generator=gen) for k, p in unet.named_parameters() if "motion_modules" in k
    }
    lora = lora_delta(delta, rank=2)
    assert lora and all(
        "motion_modules" in k and k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"))
        for k in lora
    )
