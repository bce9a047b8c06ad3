"""PeRFlowScheduler with tiny *real* diffusers UNets and pipelines (docs/method.md §1, §2, §4).

Nothing here is mocked: the UNets are ``UNet2DConditionModel`` / ``UNetMotionModel`` and the pipelines are
diffusers' own ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` and ``AnimateDiffPipeline`` built
by :mod:`perflow_video.tiny.tiny_models`. The tests check

1. the parameterization-B identity (docs/method.md §2) on real networks, 4-D and 5-D, in float64: an untrained
   student sampled with one step per window *is* the teacher's DDIM through every window edge;
2. that the pipelines run with our scheduler swapped in, on docs/method.md §4's timesteps, with CFG before ``step``;
3. that a pipeline's output equals a hand-written UNet + scheduler loop (the pipeline adds nothing);
4. the teacher's (AnimateDiff: linear) noise schedule and the save / load round trip of a pipeline folder;
5. video-to-video and img2img: the timesteps strength keeps, ``add_noise`` at the first of them against a
   hand computation, and the steps from there (``set_begin_index`` or not).
"""

import functools
import json
import logging
import math
from fractions import Fraction

import pytest
import torch
from diffusers import (
    AnimateDiffPipeline,
    AnimateDiffVideoToVideoPipeline,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from perflow_video.method.noise_schedule import make_alphas_cumprod
from perflow_video.method.teacher_solver import Conditioning, solve_window
from perflow_video.scheduler import PeRFlowScheduler
from perflow_video.tiny.tiny_models import tiny_pipeline, tiny_scheduler, tiny_unet, tiny_unet_motion

DESIGN_TIMESTEPS = {  # docs/method.md §4 for K = 4 (n = 2 < K: t = 1 - j / n, the module docstring's rule)
    2: [1000, 500],
    4: [1000, 750, 500, 250],
    6: [1000, 875, 750, 625, 500, 250],
}
PIPELINE_CLASSES = {
    "sd15": StableDiffusionPipeline,
    "sd21": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "animatediff": AnimateDiffPipeline,
}
PARAMETERIZATION = {"sd15": "diff_eps", "sd21": "velocity", "sdxl": "ddim_eps", "animatediff": "ddim_eps"}
FRAMES = 4


def perflow_pipeline(family: str, num_time_windows: int = 4, prediction_type: str | None = None):
    """The family's tiny teacher pipeline with the scheduler swapped for PeRFlow, the documented user path."""
    pipe = tiny_pipeline(family)
    pipe.scheduler = PeRFlowScheduler.from_config(
        pipe.scheduler.config,
        prediction_type=prediction_type or PARAMETERIZATION[family],
        num_time_windows=num_time_windows,
    )
    return pipe


def size_kwargs(family: str, num_frames: int = FRAMES) -> dict:
    """Small resolutions: SD / AnimateDiff 64 px (8 latents), SDXL 128 px (its tiny default, 16 latents)."""
    side = 128 if family == "sdxl" else 64
    kwargs = {"height": side, "width": side}
    if family == "animatediff":
        kwargs["num_frames"] = num_frames
    return kwargs


def record_steps(pipe) -> list[dict]:
    """Wrap ``pipe.scheduler.step`` (on the instance) to record what the pipeline hands the scheduler."""
    calls: list[dict] = []
    original = pipe.scheduler.step

    def step(model_output, timestep, sample, *args, **kwargs):
        out = original(model_output, timestep, sample, *args, **kwargs)
        prev = out[0] if isinstance(out, tuple) else out.prev_sample
        calls.append(
            {"t": int(timestep), "model_output": model_output.clone(), "sample": sample.clone(), "prev": prev}
        )
        return out

    pipe.scheduler.step = step
    return calls


def record_vae_decode(pipe) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Wrap ``pipe.vae.decode`` (on the instance) to record its input latents and its raw, unclamped output."""
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    original = pipe.vae.decode

    def decode(z, *args, **kwargs):
        out = original(z, *args, **kwargs)
        inputs.append(z.clone())
        outputs.append((out[0] if isinstance(out, tuple) else out.sample).clone())
        return out

    pipe.vae.decode = decode
    return inputs, outputs


@functools.cache
def teacher_ddim_latent_std(family: str) -> float:
    """std of the final latent of the family's tiny *teacher* pipeline, diffusers' DDIM (trailing, 4 steps),
    same prompt and seed as test_pipeline_runs_on_design_timesteps: the scale an untrained student
    (θ = φ) sampled with PeRFlow must land on."""
    pipe = tiny_pipeline(family)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    out = pipe(
        "a red ball moving left",
        num_inference_steps=4,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        **size_kwargs(family),
    )
    return float((out.frames if family == "animatediff" else out.images).std())


def check_steps_follow_design(calls: list[dict], family: str, K: int = 4) -> None:
    """Every step the pipeline made, recomputed from docs/method.md §2 / §4 (eq. 6, then Euler) in float64 with exact
    window arithmetic, on exactly what the pipeline handed the scheduler. abar is the teacher DDIM's."""
    abar = DDIMScheduler.from_config(tiny_scheduler(family).config).alphas_cumprod.double()
    prediction_type = PARAMETERIZATION[family]
    taus = [c["t"] for c in calls] + [0]
    for call, tau_next in zip(calls, taus[1:], strict=True):
        z, out = call["sample"].double(), call["model_output"].double()
        t = Fraction(call["t"], 1000)
        t_s = Fraction(math.ceil(t * K), K)  # the window whose start t equals or is below
        t_e = t_s - Fraction(1, K)
        if prediction_type == "velocity":
            v = out
        else:
            a_s, a_e = abar[int(1000 * t_s) - 1], abar[max(int(1000 * t_e) - 1, 0)]
            lam = (a_e / a_s).sqrt()
            if prediction_type == "diff_eps":
                eta = -(a_e / a_s - 1).sqrt()
            else:
                eta = (1 - a_e).sqrt() - (a_e * (1 - a_s) / a_s).sqrt()
            v = ((1 - lam) * z - eta * out) / (float(t - t_e) + lam * float(t_s - t))
        expected = z + (tau_next - call["t"]) / 1000 * v
        assert call["prev"].dtype == call["sample"].dtype
        torch.testing.assert_close(call["prev"].double(), expected, rtol=1e-5, atol=1e-5)


def clip_embeds(pipe, prompt: str) -> torch.Tensor:
    """(1, 77, 32) last hidden state of the pipeline's own text encoder (what SD / AnimateDiff condition on)."""
    ids = pipe.tokenizer(
        [prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


# ------------------------------------------------------------------------------------------------------
# 1. Parameterization B on real UNets: untrained student = teacher's DDIM at the window edges
# ------------------------------------------------------------------------------------------------------


def float64_teacher(family: str):
    """(network, z_1, conditioning) in float64: the tiny SD1.5 UNet on (2, 4, 8, 8) latents, or the tiny
    AnimateDiff UNetMotionModel on (2, 4, F, 8, 8) latents with per-frame prompt embeddings (B·F, 77, 32)."""
    g = torch.Generator().manual_seed(7)
    ehs = torch.randn(2, 77, 32, generator=g, dtype=torch.float64)
    if family == "sd15":
        net = tiny_unet("sd15").double()
        z = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    else:
        net = tiny_unet_motion().double()
        z = torch.randn(2, 4, FRAMES, 8, 8, generator=g, dtype=torch.float64)
        ehs = ehs.repeat_interleave(FRAMES, dim=0)  # b-major, as AnimateDiffPipeline and the family do
    return net, z, Conditioning(ehs)


def sample_student(net, z, cond, scheduler, timestep_shift: int) -> list[torch.Tensor]:
    """Sample the untrained student (= the teacher network) with ``scheduler``; returns z after every step.

    ``timestep_shift`` = 1 feeds the network tau - 1 = int(1000 t) - 1, the discrete index whose abar the
    teacher denoises (docs/method.md §1); 0 feeds tau itself, as real sampling of a student does.
    """
    edges = []
    with torch.no_grad():
        for tau in scheduler.timesteps:
            eps = net(z, tau - timestep_shift, **cond.unet_kwargs()).sample
            z = scheduler.step(eps, tau, z).prev_sample
            edges.append(z)
    return edges


def diffusers_ddim_edges(net, z, cond, family: str, K: int) -> list[torch.Tensor]:
    """The teacher's K-step DDIM with diffusers' own DDIMScheduler: ``trailing`` spacing gives the timesteps
    999, 999 - 1000/K, ... and the last step ends at final_alpha_cumprod = abar[0] (set_alpha_to_one=False),
    i.e. exactly the PeRFlow window edges. alphas_cumprod is promoted to float64 so that the comparison
    can be made at 1e-10 (the values are the float32 table's)."""
    ddim = DDIMScheduler.from_config(tiny_scheduler(family).config, timestep_spacing="trailing")
    ddim.alphas_cumprod = ddim.alphas_cumprod.double()
    ddim.final_alpha_cumprod = ddim.final_alpha_cumprod.double()
    ddim.set_timesteps(K)
    assert ddim.timesteps.tolist() == [1000 * (K - k) // K - 1 for k in range(K)]
    assert not ddim.config.set_alpha_to_one
    edges = []
    with torch.no_grad():
        for t in ddim.timesteps:
            z = ddim.step(net(z, t, **cond.unet_kwargs()).sample, t, z).prev_sample
            edges.append(z)
    return edges


@pytest.mark.parametrize("family", ["sd15", "animatediff"])
@pytest.mark.parametrize("K", [1, 2, 4])
def test_parameterization_b_untrained_real_unet_is_teacher_ddim_at_every_window_edge(family, K):
    net, z1, cond = float64_teacher(family)
    teacher_config = tiny_scheduler(family).config  # SD: scaled_linear, AnimateDiff: linear betas
    abar = DDIMScheduler.from_config(teacher_config).alphas_cumprod
    scheduler = PeRFlowScheduler.from_config(teacher_config, prediction_type="ddim_eps", num_time_windows=K)
    scheduler.set_timesteps(K)
    assert scheduler.timesteps.tolist() == [1000 * (K - k) // K for k in range(K)]

    student = sample_student(net, z1, cond, scheduler, timestep_shift=1)
    ddim = diffusers_ddim_edges(net, z1, cond, family, K)
    z_teacher = z1
    for k in range(K):
        ones = torch.ones(z1.shape[0], dtype=torch.float64)
        t_s, t_e = 1 - k / K, 1 - (k + 1) / K
        z_teacher = solve_window(net, z_teacher, t_s * ones, t_e * ones, abar, cond, num_steps=1)
        assert student[k].dtype == torch.float64 and student[k].shape == z1.shape
        torch.testing.assert_close(student[k], z_teacher, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(student[k], ddim[k], rtol=1e-10, atol=1e-10)
    # not vacuous: the network's prediction matters (the result is far from a pure rescaling of z1)
    assert (student[-1] - z1 * (abar[0] / abar[-1]).sqrt().double()).abs().max() > 0.1


@pytest.mark.parametrize("family", ["sd15", "animatediff"])
def test_without_the_timestep_shift_the_student_is_close_to_but_not_the_teacher(family):
    """Real sampling feeds the student tau = 1000 t (1000 at t = 1), the teacher was evaluated at the index
    tau - 1 (999). The sinusoidal timestep embedding of 1000 and 999 differ (its highest frequency turns by
    one radian per timestep), so the untrained student is only approximately the teacher's DDIM; training
    (docs/method.md §3 step 6 uses timestep 1000 t) absorbs the shift."""
    net, z1, cond = float64_teacher(family)
    K = 4
    scheduler = PeRFlowScheduler.from_config(
        tiny_scheduler(family).config, prediction_type="ddim_eps", num_time_windows=K
    )
    scheduler.set_timesteps(K)
    exact = sample_student(net, z1, cond, scheduler, timestep_shift=1)[-1]
    unshifted = sample_student(net, z1, cond, scheduler, timestep_shift=0)[-1]
    diff = (unshifted - exact).abs().max().item()
    assert diff > 1e-6, "tau and tau - 1 must give different timestep embeddings"
    assert diff < 0.1 * exact.abs().max().item()
    # the one-step effect is small: eps(z, 1000) vs eps(z, 999)
    with torch.no_grad():
        e1000 = net(z1, torch.tensor(1000), **cond.unet_kwargs()).sample
        e999 = net(z1, torch.tensor(999), **cond.unet_kwargs()).sample
    assert 0 < (e1000 - e999).abs().max() < 0.1 * e999.abs().max()


# ------------------------------------------------------------------------------------------------------
# 2. diffusers' own pipelines, unchanged, driven by PeRFlowScheduler
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl", "animatediff"])
@pytest.mark.parametrize("n", [4, 6, 2])
def test_pipeline_runs_on_design_timesteps(family, n, caplog):
    pipe = perflow_pipeline(family)
    assert isinstance(pipe.scheduler, PeRFlowScheduler)
    assert pipe.scheduler.config.prediction_type == PARAMETERIZATION[family]
    calls = record_steps(pipe)
    decode_inputs, decoded = record_vae_decode(pipe)
    seen = []

    def on_step_end(pipeline, i, t, callback_kwargs):
        seen.append((i, int(t)))
        return callback_kwargs

    with caplog.at_level(logging.WARNING, logger="perflow_video.scheduler"):
        out = pipe(
            "a red ball moving left",
            num_inference_steps=n,
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
            callback_on_step_end=on_step_end,
            **size_kwargs(family),
        )
    expected = DESIGN_TIMESTEPS[n]
    assert pipe.scheduler.timesteps.tolist() == expected
    assert seen == list(enumerate(expected))
    assert [c["t"] for c in calls] == expected
    assert ("2 steps < 4 time windows" in caplog.text) == (n == 2)
    check_steps_follow_design(calls, family)
    # the scheduler's output is what the pipeline continues from
    for before, after in zip(calls, calls[1:], strict=False):
        assert torch.equal(after["sample"], before["prev"])
    side = size_kwargs(family)["height"]
    latent_shape = (
        (1, 4, FRAMES, side // 8, side // 8) if family == "animatediff" else (1, 4, side // 8, side // 8)
    )
    assert all(c["sample"].shape == c["model_output"].shape == latent_shape for c in calls)
    if family == "animatediff":
        result = out.frames
        assert result.shape == (1, FRAMES, 3, side, side)
    else:
        result = out.images
        assert result.shape == (1, 3, side, side)
    # Checked before diffusers' clamp to [0, 1] (which would hide a diverged or collapsed sample):
    # the VAE decodes exactly the scheduler's last latent, the output is that decode clamped and nothing
    # else, and the latent itself is on the scale of the teacher's own DDIM endpoint (untrained student).
    final = calls[-1]["prev"]
    assert torch.isfinite(final).all()
    sf = pipe.vae.config.scaling_factor
    if family == "animatediff":  # AnimateDiffPipeline decodes frame by frame: (B·F, C, H, W)
        final = final.permute(0, 2, 1, 3, 4).reshape(-1, *final.shape[1:2], *final.shape[-2:])
    torch.testing.assert_close(torch.cat(decode_inputs), final / sf, rtol=1e-6, atol=1e-6)  # 1/sf * z or z/sf
    raw = torch.cat(decoded)
    torch.testing.assert_close(result.reshape(raw.shape), (raw / 2 + 0.5).clamp(0, 1), rtol=1e-6, atol=1e-6)
    ratio = float(final.std()) / teacher_ddim_latent_std(family)
    assert 1 / 3 < ratio < 3, f"final latent std is {ratio:.3g} x the teacher DDIM's"


def test_animatediff_pipeline_eight_frames_latent_output():
    pipe = perflow_pipeline("animatediff")
    latents = pipe(
        "a blue square",
        num_inference_steps=4,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(1),
        output_type="latent",
        **size_kwargs("animatediff", num_frames=8),
    ).frames
    assert latents.shape == (1, 4, 8, 8, 8) and torch.isfinite(latents).all()
    assert pipe.scheduler.timesteps.tolist() == DESIGN_TIMESTEPS[4]


@pytest.mark.parametrize("family", ["sd15", "sdxl", "animatediff"])
def test_classifier_free_guidance_is_applied_before_step(family):
    """With guidance_scale > 1 the pipeline runs the UNet on [uncond, cond] and hands ``step`` the guided
    prediction u + w (c - u); our scheduler turns that into the window velocity (CFG on eps = CFG on v)."""
    w = 3.0
    pipe = perflow_pipeline(family)
    calls = record_steps(pipe)
    unet_outputs = []
    hook = pipe.unet.register_forward_hook(
        lambda module, args, output: unet_outputs.append(output[0].clone())
    )
    kwargs = {
        "num_inference_steps": 4,
        "generator": torch.Generator().manual_seed(0),
        "output_type": "latent",
        **size_kwargs(family),
    }
    guided = pipe("a red ball", negative_prompt="blurry", guidance_scale=w, **kwargs)
    hook.remove()
    assert [c["t"] for c in calls] == DESIGN_TIMESTEPS[4] and len(unet_outputs) == 4
    for call, both in zip(calls, unet_outputs, strict=True):
        assert both.shape[0] == 2 * call["sample"].shape[0]
        uncond, cond = both.chunk(2)
        torch.testing.assert_close(call["model_output"], uncond + w * (cond - uncond))
    kwargs["generator"] = torch.Generator().manual_seed(0)
    plain = pipe("a red ball", negative_prompt="blurry", guidance_scale=1.0, **kwargs)
    z_guided = guided.frames if family == "animatediff" else guided.images
    z_plain = plain.frames if family == "animatediff" else plain.images
    assert torch.isfinite(z_guided).all() and (z_guided - z_plain).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------------
# 3. The pipeline adds nothing: pipeline latents == a hand-written UNet + scheduler loop
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["animatediff", "sd15"])
@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_pipeline_latents_equal_hand_written_loop(family, guidance_scale):
    pipe = perflow_pipeline(family, prediction_type="ddim_eps")
    video = family == "animatediff"
    shape = (1, 4, FRAMES, 8, 8) if video else (1, 4, 8, 8)
    z1 = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    cond, uncond = clip_embeds(pipe, "a green circle moving up"), clip_embeds(pipe, "")
    extra = {"num_frames": FRAMES} if video else {}
    out = pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        latents=z1.clone(),
        num_inference_steps=4,
        guidance_scale=guidance_scale,
        output_type="latent",
        height=64,
        width=64,
        **extra,
    )
    pipe_latents = out.frames if video else out.images

    # the same UNet and a fresh scheduler of the same config, no pipeline
    scheduler = PeRFlowScheduler.from_config(pipe.scheduler.config)
    assert scheduler.init_noise_sigma == 1.0
    scheduler.set_timesteps(4)
    embeds = torch.cat([uncond, cond]) if guidance_scale > 1 else cond
    if video:
        embeds = embeds.repeat_interleave(FRAMES, dim=0)
    z = z1
    with torch.no_grad():
        for tau in scheduler.timesteps:
            z_in = torch.cat([z, z]) if guidance_scale > 1 else z
            pred = pipe.unet(z_in, tau, encoder_hidden_states=embeds).sample
            if guidance_scale > 1:
                u, c = pred.chunk(2)
                pred = u + guidance_scale * (c - u)
            z = scheduler.step(pred, tau, z).prev_sample
    assert pipe_latents.shape == shape
    torch.testing.assert_close(pipe_latents, z, rtol=1e-6, atol=1e-6)
    assert (z - z1).abs().max() > 0.1  # the loop did something


def test_untrained_student_through_animatediff_pipeline_is_the_teachers_ddim_pipeline():
    """End to end in float64: AnimateDiffPipeline + PeRFlowScheduler (ddim_eps, n = K = 4) with the UNet fed
    tau - 1 (a forward pre-hook) gives the same latents as AnimateDiffPipeline + DDIMScheduler (trailing,
    4 steps) with the plain UNet: the parameterization-B identity survives the whole pipeline."""
    pipe = tiny_pipeline("animatediff").to(torch.float64)
    cond = clip_embeds(pipe, "a red ball bouncing")
    z1 = torch.randn(1, 4, FRAMES, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    kwargs = {
        "prompt_embeds": cond,
        "num_inference_steps": 4,
        "guidance_scale": 1.0,
        "output_type": "latent",
        "num_frames": FRAMES,
        "height": 64,
        "width": 64,
    }
    teacher_config = pipe.scheduler.config

    ddim = DDIMScheduler.from_config(teacher_config, timestep_spacing="trailing")
    ddim.alphas_cumprod = ddim.alphas_cumprod.double()
    ddim.final_alpha_cumprod = ddim.final_alpha_cumprod.double()
    pipe.scheduler = ddim
    teacher = pipe(latents=z1.clone(), **kwargs).frames
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]

    pipe.scheduler = PeRFlowScheduler.from_config(
        teacher_config, prediction_type="ddim_eps", num_time_windows=4
    )
    hook = pipe.unet.register_forward_pre_hook(
        lambda module, args, kw: ((args[0], args[1] - 1, *args[2:]), kw), with_kwargs=True
    )
    student = pipe(latents=z1.clone(), **kwargs).frames
    hook.remove()
    assert student.dtype == torch.float64
    torch.testing.assert_close(student, teacher, rtol=1e-10, atol=1e-10)
    unshifted = pipe(latents=z1.clone(), **kwargs).frames
    assert (unshifted - teacher).abs().max() > 1e-6  # see test_without_the_timestep_shift_...


# ------------------------------------------------------------------------------------------------------
# 4. The teacher's noise schedule and saving / loading a pipeline folder with our scheduler
# ------------------------------------------------------------------------------------------------------


def test_scheduler_from_animatediff_teacher_config_uses_its_linear_alphas_cumprod():
    ddim = tiny_scheduler("animatediff")
    assert ddim.config.beta_schedule == "linear"
    s = PeRFlowScheduler.from_config(ddim.config, prediction_type="ddim_eps", num_time_windows=4)
    assert s.config.beta_schedule == "linear" and s.config.num_time_windows == 4
    assert s.alphas_cumprod.dtype == ddim.alphas_cumprod.dtype
    assert torch.equal(s.alphas_cumprod, ddim.alphas_cumprod)
    sd_abar = make_alphas_cumprod(beta_schedule="scaled_linear")
    assert torch.equal(tiny_scheduler("sd15").alphas_cumprod, sd_abar)
    assert (s.alphas_cumprod - sd_abar).abs().max() > 1e-3  # the schedule choice matters


def public(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.mark.parametrize("family", ["sd15", "animatediff"])
def test_pipeline_folder_round_trip_with_perflow_scheduler(family, tmp_path):
    pipe = perflow_pipeline(family)
    cls = PIPELINE_CLASSES[family]
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["perflow_video.scheduler", "PeRFlowScheduler"]
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "PeRFlowScheduler" and saved["num_time_windows"] == 4
    assert saved["prediction_type"] == PARAMETERIZATION[family]

    scheduler = PeRFlowScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert public(scheduler.config) == public(pipe.scheduler.config)
    assert torch.equal(scheduler.alphas_cumprod, pipe.scheduler.alphas_cumprod)

    # The explicit user path (scheduler passed in) and the plain one: model_index.json names the module
    # ``perflow_video.scheduler``, which diffusers imports, so the plain load also gives our scheduler.
    explicit = cls.from_pretrained(tmp_path, scheduler=scheduler)
    plain = cls.from_pretrained(tmp_path)
    generic = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(generic) is cls
    for loaded in (explicit, plain, generic):
        assert isinstance(loaded.scheduler, PeRFlowScheduler)
        assert public(loaded.scheduler.config) == public(pipe.scheduler.config)

    def latents(p):
        p.set_progress_bar_config(disable=True)
        out = p(
            "a yellow star",
            num_inference_steps=4,
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(2),
            output_type="latent",
            **size_kwargs(family),
        )
        return out.frames if family == "animatediff" else out.images

    # Both loads read the same files: identical. Against the in-memory original, float32 kernels may take
    # other code paths for the loaded (memory-mapped) weights: ~1e-6 per UNet call, so compare at 1e-4
    # (a wrong schedule, K or parameterization would move the latents by O(0.1)).
    reference = latents(explicit)
    torch.testing.assert_close(latents(plain), reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(reference, latents(pipe), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------------
# 5. Video-to-video / img2img: strength keeps the last steps, add_noise at the first kept window start
# ------------------------------------------------------------------------------------------------------

V2V_TIMESTEPS = {1.0: [1000, 750, 500, 250], 0.75: [750, 500, 250], 0.5: [500, 250]}  # 4 steps, K = 4


def hand_linear_abar(index: int) -> float:
    """abar[index] of AnimateDiff's linear betas 0.00085 -> 0.012 (1000 steps), float64, from scratch."""
    betas = torch.linspace(0.00085, 0.012, 1000, dtype=torch.float32).double()
    return float(torch.prod(1.0 - betas[: index + 1]))


def record_add_noise(pipe) -> list[dict]:
    """Wrap ``pipe.scheduler.add_noise`` (on the instance) to record its inputs and output."""
    calls: list[dict] = []
    original = pipe.scheduler.add_noise

    def add_noise(original_samples, noise, timesteps):
        out = original(original_samples, noise, timesteps)
        calls.append(
            {"z0": original_samples.clone(), "noise": noise.clone(), "t": timesteps.clone(), "out": out}
        )
        return out

    pipe.scheduler.add_noise = add_noise
    return calls


@pytest.mark.parametrize("strength", sorted(V2V_TIMESTEPS, reverse=True))
def test_video_to_video_pipeline_noises_the_input_at_the_first_kept_window_start(strength):
    """diffusers' AnimateDiffVideoToVideoPipeline, built from the PeRFlow AnimateDiff pipeline's components:
    it keeps the last int(4 x strength) timesteps, noises the encoded video to the teacher's marginal at the
    first one (hand-computed abar), and the scheduler steps on from there to the end."""
    v2v = AnimateDiffVideoToVideoPipeline.from_pipe(perflow_pipeline("animatediff"))
    assert v2v.scheduler.__class__ is PeRFlowScheduler
    noised, steps = record_add_noise(v2v), record_steps(v2v)
    video = torch.rand(1, FRAMES, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    v2v(
        video=video,
        prompt="a red ball moving left",
        strength=strength,
        num_inference_steps=4,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        height=64,
        width=64,
    )
    expected = V2V_TIMESTEPS[strength]
    assert v2v.get_timesteps(4, v2v.scheduler.timesteps, strength, "cpu")[0].tolist() == expected
    assert [c["t"] for c in steps] == expected
    assert len(noised) == 1 and noised[0]["t"].tolist() == [expected[0]]
    call = noised[0]
    abar = hand_linear_abar(expected[0] - 1)  # abar index tau - 1: the z_s of Algorithm 1 step 3
    hand = math.sqrt(abar) * call["z0"].double() + math.sqrt(1.0 - abar) * call["noise"].double()
    torch.testing.assert_close(call["out"].double(), hand, rtol=1e-5, atol=1e-5)
    assert call["z0"].shape == (1, FRAMES, 4, 8, 8)  # (B, F, C, h, w) as the pipeline encodes it
    # the first step starts from exactly that latent (permuted to (B, C, F, h, w)), and each continues the last
    assert torch.equal(steps[0]["sample"], call["out"].permute(0, 2, 1, 3, 4))
    for before, after in zip(steps, steps[1:], strict=False):
        assert torch.equal(after["sample"], before["prev"])
    check_steps_follow_design(steps, "animatediff")
    assert v2v.scheduler.step_index == 4  # stepped from the kept index to the end


def test_img2img_pipeline_sets_begin_index_and_steps_from_there():
    """StableDiffusionImg2ImgPipeline calls set_begin_index(t_start): strength 0.5 of 4 steps begins at 500."""
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(perflow_pipeline("sd15"))
    noised, steps = record_add_noise(img2img), record_steps(img2img)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    img2img(
        prompt="a red ball",
        image=image,
        strength=0.5,
        num_inference_steps=4,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    assert img2img.scheduler.begin_index == 2 and img2img.scheduler.step_index == 4
    assert [c["t"] for c in steps] == [500, 250] and noised[0]["t"].tolist() == [500]
    abar = float(DDIMScheduler.from_config(tiny_scheduler("sd15").config).alphas_cumprod[499])
    hand = math.sqrt(abar) * noised[0]["z0"] + math.sqrt(1.0 - abar) * noised[0]["noise"]
    torch.testing.assert_close(noised[0]["out"], hand, rtol=1e-5, atol=1e-5)
    assert torch.equal(steps[0]["sample"], noised[0]["out"])
    check_steps_follow_design(steps, "sd15")
