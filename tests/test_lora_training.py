"""LoRA training (``model.trainable=lora``): the student is the teacher network with PEFT adapters, the teacher
is that network with its adapters disabled. On the embedded tiny models, through the real setup and scripts:
only the adapters train, the teacher stays the base network, ΔW is the merged LoRA delta and goes out in every
format, resume reproduces the run, diffusers' own loader reads the adapter, and ``generate --run`` samples it.

The model is named explicitly (``tiny``, 64 px, the toy data), whatever the shipped tiny configs default to.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import offline_tiny_env
from diffusers import AnimateDiffPipeline, MotionAdapter, StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from perflow_video.errors import ConfigError
from perflow_video.families import get_family
from perflow_video.families.loading import resolve_model_path
from perflow_video.generation.cli import main as generate_main
from perflow_video.method.reflow_objective import ReflowConfig
from perflow_video.training.frozen_models import FrozenModel
from perflow_video.training.memory_plan import memory_plan
from perflow_video.training.optimizers import bitsandbytes_available, check_optimizer_device
from perflow_video.training.run_setup import family_spec, load_models
from perflow_video.training.step import per_sample_draws, perflow_step
from perflow_video.training.train_config import build_train_config
from perflow_video.training.trained_weights import LORA_ADAPTER_FILE, LoraWeights
from perflow_video.weights.delta_weights import load_delta_weights
from perflow_video.weights.lora_adapter import PROJECTIONS, adapters_disabled, is_adapter_parameter

REPO = Path(__file__).resolve().parent.parent
FRAMES, RANK, ALPHA = 4, 4, 8.0  # alpha / r = 2: the scale is not 1
VIDEO_MODEL = {
    "pretrained_model_name_or_path": "tiny", "motion_adapter": "tiny", "resolution": 64, "num_frames": FRAMES,
    "trainable": "lora", "lora_rank": RANK, "lora_alpha": ALPHA, "lora_targets": "both",
}  # fmt: skip
VIDEO_ARGS = [
    *(f"model.{k}={v}" for k, v in VIDEO_MODEL.items()),
    "data.train_data=data/toy_clips/captions.csv", "data.sample_stride=1", "reflow.solver_steps=2",
    "model.gradient_checkpointing=true",
    "optim.train_batch_size=1", "optim.lr_warmup_steps=2", "optim.learning_rate=1e-3", "run.log_every=1",
    "run.validation_steps=0", "run.eval_samples=2", "run.checkpointing_steps=2", "run.validation_prompts=[a red circle]",
]  # fmt: skip
IMAGE_ARGS = [
    "model.pretrained_model_name_or_path=tiny", "model.resolution=64", "model.trainable=lora",
    f"model.lora_rank={RANK}", f"model.lora_alpha={ALPHA}", "data.train_data=data/toy_images/captions.csv",
    "data.caption_column=caption", "reflow.solver_steps=2", "optim.lr_warmup_steps=2", "optim.learning_rate=1e-3",
    "optim.use_ema=true", "optim.ema_decay=0.5",
    "run.log_every=1", "run.validation_steps=0", "run.eval_samples=2", "run.checkpointing_steps=0",
    "run.validation_prompts=[a red circle]",
]  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with offline_tiny_env(tmp_path_factory.mktemp("lora")) as environment:
        yield environment


def train(env, script: list[str], out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *script, "--output_dir", str(out), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def train_video(env, out: Path, *args: str) -> subprocess.CompletedProcess:
    return train(env, [str(REPO / "scripts" / "train_animatediff.py")], out, *VIDEO_ARGS, *args)


@pytest.fixture(scope="module")
def video_run(env, tmp_path_factory) -> Path:
    """4 LoRA steps on motion and spatial attention of the tiny AnimateDiff, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("video") / "run"
    train_video(env, out, "--max_train_steps", "4")
    return out


@pytest.fixture(scope="module")
def image_run(env, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("image") / "run"
    script = [str(REPO / "scripts" / "train_image.py"), "--model", "sd15", "--tiny"]
    train(env, script, out, "--max_train_steps", "3", *IMAGE_ARGS)
    return out


def video_config(**model) -> object:
    return build_train_config(
        {"model": {**VIDEO_MODEL, **model}, "data": {"train_data": "data/toy_clips/captions.csv"}}
    )


def metric(out: Path, key: str) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m[key]) for m in lines if key in m]


def adapter_of(run: Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = run / LORA_ADAPTER_FILE
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    return load_file(str(path)), config


def base_unet_state() -> dict[str, torch.Tensor]:
    """The tiny AnimateDiff teacher as loaded, without adapters (what every ΔW is taken against)."""
    spec = family_spec(video_config(trainable="motion"))
    return {k: v.float() for k, v in get_family("animatediff").load(spec).teacher.state_dict().items()}


# ----------------------------------------------------------------------------------------------------
# The config
# ----------------------------------------------------------------------------------------------------


def test_lora_targets_default_to_the_familys_and_image_families_take_spatial_only():
    assert video_config(lora_targets="motion").model.lora_targets == "motion"
    image = build_train_config({"model": {"family": "sd15", "trainable": "lora"}})
    assert image.model.lora_targets == "spatial" and image.model.lora_rank == 16
    with pytest.raises(
        ConfigError, match=r"model: lora_targets='motion' does not fit family 'sd15'; choose 'spatial'"
    ):
        build_train_config({"model": {"family": "sd15", "trainable": "lora", "lora_targets": "motion"}})
    with pytest.raises(ConfigError, match=r"model: lora_rank must be >= 1, got 0"):
        video_config(lora_rank=0)


def test_a_lora_run_refuses_fsdp_naming_the_key():
    with pytest.raises(ConfigError, match="model.trainable=lora does not run under FSDP"):
        family_spec(video_config(), share_frozen=False)


@pytest.mark.skipif(bitsandbytes_available(), reason="bitsandbytes is installed here")
def test_adamw8bit_without_bitsandbytes_is_an_error_naming_the_key_at_dry_run(env):
    with pytest.raises(ConfigError, match=r"optim: optimizer='adamw8bit' but bitsandbytes is not installed"):
        build_train_config({"optim": {"optimizer": "adamw8bit"}})
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "train_animatediff.py"),
        "--dry-run",
        "optim.optimizer=adamw8bit",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and "optimizer='adamw8bit'" in errors[0] and "perflow-video[bnb]" in errors[0]


def test_adamw8bit_without_cuda_is_an_error_naming_the_key_at_startup():
    check_optimizer_device("adamw", cuda=False)
    check_optimizer_device("adamw8bit", cuda=True)
    with pytest.raises(ConfigError, match="optim.optimizer=adamw8bit needs a CUDA GPU"):
        check_optimizer_device("adamw8bit", cuda=False)


# ----------------------------------------------------------------------------------------------------
# The run's models, in process (the trainer's own setup)
# ----------------------------------------------------------------------------------------------------


def test_the_lora_student_is_the_teacher_network_and_only_its_adapters_train(env):
    cfg = video_config()
    family = get_family("animatediff")
    models = load_models(cfg, family, Accelerator(cpu=True))
    student, teacher = models.loaded.student, models.loaded.teacher
    assert student is teacher and isinstance(models.trained, LoraWeights)
    trained = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trained and all(is_adapter_parameter(n) for n in trained)
    adapted = {n.split(".lora_")[0] for n in trained}
    assert all(m.endswith(tuple(f".{p}" for p in PROJECTIONS)) for m in adapted)
    assert any("motion_modules" in m for m in adapted) and any("motion_modules" not in m for m in adapted)
    base = base_unet_state()

    # Adapters start at B = 0: the student is exactly the teacher; then a few PeRFlow steps.
    g = torch.Generator().manual_seed(0)
    z_0 = torch.randn(2, 4, FRAMES, 8, 8, generator=g)
    text = family.encode_text(models.loaded, ["a red circle", "a blue square"], "cpu")
    empty = family.encode_text(models.loaded, [""], "cpu")
    ehs = family.expand_conditioning(models.loaded, text).encoder_hidden_states
    probe = (z_0, torch.tensor([500.0, 500.0]), ehs)
    with torch.no_grad():
        teacher_before = models.teacher(*probe)
        assert torch.equal(student(*probe, return_dict=False)[0], teacher_before)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    reflow = ReflowConfig(num_time_windows=4, solver_steps=2, parameterization="ddim_eps")
    for step in range(3):
        draws = per_sample_draws(torch.tensor([0, 1]), (4, FRAMES, 8, 8), 0, step, 0.0, reflow, 1000)
        loss, _ = perflow_step(
            student, models.teacher, z_0, text, empty, draws, models.alphas_cumprod, reflow,
            expand=lambda c: family.expand_conditioning(models.loaded, c),
        )  # fmt: skip
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # The teacher is still the base network, bit for bit; the student has moved, through its adapters only.
    with torch.no_grad():
        assert torch.equal(models.teacher(*probe), teacher_before)
        assert not torch.equal(student(*probe, return_dict=False)[0], teacher_before)
    state = student.state_dict()
    for name, value in base.items():
        plain = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state[name if name in state else plain], value), name
    assert all(
        p.requires_grad for n, p in student.named_parameters() if n in trained
    )  # restored after solves


def test_the_teacher_call_is_the_base_unet_without_adapters(env):
    """FrozenModel on the LoRA network = a separately loaded base UNet, with the adapters far from zero."""
    models = get_family("animatediff").load(family_spec(video_config()))
    for name, param in models.student.named_parameters():
        if is_adapter_parameter(name):
            param.data.normal_()
    base = get_family("animatediff").load(family_spec(video_config(trainable="motion")))
    sample = torch.randn(1, 4, FRAMES, 8, 8, generator=torch.Generator().manual_seed(1))
    ehs = torch.randn(FRAMES, 77, models.text_encoders[0].config.hidden_size)
    with torch.no_grad():
        teacher = FrozenModel(models.teacher, torch.float32)(sample, torch.tensor([700.0]), ehs)
        reference = FrozenModel(base.teacher, torch.float32)(sample, torch.tensor([700.0]), ehs)
        with adapters_disabled(models.student):
            nested = FrozenModel(models.teacher, torch.float32)(sample, torch.tensor([700.0]), ehs)
        student = models.student(sample, torch.tensor([700.0]), ehs, return_dict=False)[0]
    assert torch.equal(teacher, reference) and torch.equal(nested, reference)
    assert not torch.allclose(student, reference)  # and the adapters are enabled again after each call


def test_the_memory_plan_counts_one_unet_and_the_adapters_only(env):
    lora, motion = memory_plan(video_config()), memory_plan(video_config(trainable="motion"))
    models = get_family("animatediff").load(family_spec(video_config()))
    adapters = sum(p.numel() for n, p in models.student.named_parameters() if is_adapter_parameter(n))
    unet = sum(p.numel() for n, p in models.student.named_parameters() if not is_adapter_parameter(n))
    lines = {x.name: x.bytes for x in lora.weights + lora.training}
    assert lines["student: trained weights"] == 4 * adapters
    buffers = sum(b.numel() * b.element_size() for b in models.student.buffers())
    assert lines["student = teacher: shared frozen weights"] == 4 * unet + buffers  # fp32, once
    assert "teacher: weights of its own" not in lines and "student: frozen weights of its own" not in lines
    assert (lines["gradients"], lines["AdamW moments"]) == (4 * adapters, 8 * adapters)
    assert lora.fsdp == [] and lora.single < motion.single


# ----------------------------------------------------------------------------------------------------
# A finished run
# ----------------------------------------------------------------------------------------------------


def test_delta_is_the_merged_lora_delta_and_the_student_the_merged_network(video_run):
    delta, meta = load_delta_weights(video_run / "delta_weights.safetensors")
    assert meta.family == "animatediff"
    adapter, config = adapter_of(video_run)
    assert (config["unet.r"], config["unet.lora_alpha"]) == (RANK, ALPHA)
    modules = {k.removeprefix("unet.").split(".lora_")[0] for k in adapter}
    assert (
        set(delta)
        == {f"{m}.weight" for m in modules}
        == {f"{m}.weight" for m in config["unet.target_modules"]}
    )
    for key, value in delta.items():  # exactly B·A·alpha/r of the trained factors
        a, b = (adapter[f"unet.{key.removesuffix('.weight')}.lora_{x}.weight"].double() for x in "AB")
        assert torch.equal(value, (b @ a * (ALPHA / RANK)).float()), key
    assert any(v.abs().max() > 0 for v in delta.values())
    student = load_file(str(video_run / "student" / "unet_motion" / "diffusion_pytorch_model.safetensors"))
    base = base_unet_state()
    assert set(student) == set(base)  # a plain UNetMotionModel: no adapter keys left
    for key, value in student.items():
        if key in delta:
            assert torch.equal(value, base[key] + delta[key]), key
            torch.testing.assert_close(value - base[key], delta[key], rtol=0, atol=1e-6)
        else:
            assert torch.equal(value, base[key]), key


def test_every_export_format_and_the_adapter_are_written(video_run):
    names = {p.name for p in video_run.iterdir()}
    assert {
        "delta_weights.safetensors", "delta_weights_motion_original.safetensors", "perflow_motion_module.safetensors",
        "perflow_motion_lora.safetensors", "perflow_motion_lora_comfyui.safetensors", "perflow_lora.safetensors",
        "perflow_lora_kohya.safetensors", "perflow_delta_full_kohya.safetensors", LORA_ADAPTER_FILE,
        "train_summary.json",
    } <= names  # fmt: skip
    assert list((video_run / "samples" / "final").glob("*.gif"))


def test_diffusers_load_lora_weights_on_the_base_pipeline_gives_the_student(env, video_run):
    base = resolve_model_path("tiny", "animatediff")
    pipe = AnimateDiffPipeline.from_pretrained(
        base, motion_adapter=MotionAdapter.from_pretrained(f"{base}/motion_adapter")
    )
    pipe.load_lora_weights(str(video_run / LORA_ADAPTER_FILE), adapter_name="perflow")
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the fused weights stay
    fused = pipe.unet.state_dict()
    student = load_file(str(video_run / "student" / "unet_motion" / "diffusion_pytorch_model.safetensors"))
    assert set(fused) == set(student)
    for key, value in student.items():
        torch.testing.assert_close(fused[key], value, rtol=1e-6, atol=1e-6, msg=key)


def test_resume_at_half_gives_the_same_losses_and_lora_weights(env, video_run, tmp_path):
    out = tmp_path / "resumed"
    train_video(env, out, "--max_train_steps", "2")
    proc = train_video(env, out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert "at step 2" in proc.stderr
    losses, full = metric(out, "loss"), metric(video_run, "loss")
    assert [s for s, _ in losses] == [s for s, _ in full] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(losses, full, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-9)
    resumed, uninterrupted = adapter_of(out)[0], adapter_of(video_run)[0]
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-7)


def test_generate_samples_the_lora_run(env, video_run, tmp_path, capsys):
    clip = tmp_path / "clip.gif"
    assert (
        generate_main(
            ["--run", str(video_run), "--device", "cpu", "--prompt", "a red circle", "--output", str(clip)]
        )
        == 0
    )
    assert clip.stat().st_size > 0 and "wrote" in capsys.readouterr().out


def test_an_image_family_lora_run_exports_spatial_formats_diffusers_reads(env, image_run, tmp_path):
    delta, _ = load_delta_weights(image_run / "delta_weights.safetensors")
    assert delta and all(k.endswith(tuple(f".{p}.weight" for p in PROJECTIONS)) for k in delta)
    names = {p.name for p in image_run.iterdir()}
    assert {"perflow_lora.safetensors", "perflow_lora_kohya.safetensors", LORA_ADAPTER_FILE} <= names
    assert not any("motion" in n for n in names)
    pipe = StableDiffusionPipeline.from_pretrained(resolve_model_path("tiny", "sd15"), safety_checker=None)
    pipe.load_lora_weights(str(image_run / LORA_ADAPTER_FILE))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    student = load_file(str(image_run / "student" / "unet" / "diffusion_pytorch_model.safetensors"))
    fused = pipe.unet.state_dict()
    assert set(fused) == set(student)
    for key, value in student.items():
        torch.testing.assert_close(fused[key], value, rtol=1e-6, atol=1e-6, msg=key)
    image = tmp_path / "circle.png"
    assert (
        generate_main(
            ["--run", str(image_run), "--device", "cpu", "--prompt", "a red circle", "--output", str(image)]
        )
        == 0
    )
    assert image.stat().st_size > 0


def test_two_data_parallel_processes_keep_identical_adapters(env, tmp_path):
    """DDP (the way a LoRA run uses several GPUs): the adapters stay the same on every rank."""
    out = tmp_path / "ddp"
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*ddp, "scripts/train_image.py", "--model", "sd15", "--tiny", "--output_dir", str(out)]
    args = [*IMAGE_ARGS, "--max_train_steps", "2", "optim.train_batch_size=1", "run.validation_prompts=[]"]
    proc = subprocess.run(cmd + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "train_summary.json").read_text())
    a, b = summary["param_checksums"]
    assert summary["num_processes"] == 2 and a == b
    assert (out / LORA_ADAPTER_FILE).is_file()
