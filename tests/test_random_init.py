"""``model.init=random``: the family's real architecture from the configs shipped in
``perflow_video/architectures``, random (seeded) weights, the tiny tokenizer, no download."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from huggingface_hub import constants

from perflow_video.architectures import component_config
from perflow_video.families import FamilySpec, get_family
from perflow_video.families.loading import (
    FAMILY_ARCHITECTURES,
    ComponentConfigs,
    motion_adapter_architecture,
    read_component_config,
    shipped_configs,
)
from perflow_video.tiny.tiny_models import save_tiny_model
from perflow_video.tiny.tiny_tokenizer import tiny_tokenizer
from perflow_video.training.config_io import ConfigError
from perflow_video.training.memory_plan import memory_plan
from perflow_video.training.preflight import check_before_loading
from perflow_video.training.train_config import load_train_config

REPO = Path(__file__).resolve().parent.parent
# Published parameter counts (tests/test_architectures.py).
UNETS = {"animatediff": 859_520_964, "sd15": 859_520_964, "sd21": 865_910_724, "sdxl": 2_567_463_684}
VAE, MOTION_V2 = 83_653_863, 453_209_280
# (published size, hidden size) of each family's text encoders; random init has the tiny tokenizer's vocabulary.
TEXT_ENCODERS = {
    "animatediff": [(123_060_480, 768)], "sd15": [(123_060_480, 768)], "sd21": [(340_387_840, 1024)],
    "sdxl": [(123_060_480, 768), (694_659_840, 1280)],
}  # fmt: skip
CLIP_VOCAB = 49_408


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def spec(**kw) -> FamilySpec:
    base = dict(
        pretrained_model_name_or_path="stable-diffusion-v1-5/stable-diffusion-v1-5", motion_adapter=None,
        single_file_config=None, revision=None, variant=None, resolution=64, num_frames=2, init="random",
    )  # fmt: skip
    return FamilySpec(**{**base, **kw})


@pytest.mark.parametrize(
    "value, architecture",
    [
        (None, "motion_adapter_v1_5_2"),
        ("tiny", "motion_adapter_v1_5_2"),
        ("guoyww/animatediff-motion-adapter-v1-5", "motion_adapter_v1_5"),
        ("guoyww/animatediff-motion-adapter-v1-5-2", "motion_adapter_v1_5_2"),
        ("guoyww/animatediff-motion-adapter-v1-5-3", "motion_adapter_v1_5_3"),
        ("/models/mm_sd_v15.ckpt", "motion_adapter_v1_5"),
        ("/models/mm_sd_v15_v2.ckpt", "motion_adapter_v1_5_2"),
        ("/models/v3_sd15_mm.ckpt", "motion_adapter_v1_5_3"),
    ],
)
def test_the_motion_adapter_value_names_the_architecture(value, architecture):
    assert motion_adapter_architecture(value) == architecture


def test_a_motion_adapter_naming_no_version_is_a_config_error_with_init_random():
    overrides = ["model.init=random", "model.motion_adapter=/models/my_adapter"]
    with pytest.raises(ConfigError, match="names no motion-adapter version"):
        load_train_config(None, {}, overrides)
    load_train_config(None, {}, ["model.motion_adapter=/models/my_adapter"])  # pretrained: any source


@pytest.mark.parametrize("family", sorted(UNETS))
def test_random_init_builds_the_published_architecture(family):
    tokenizer_vocab = len(tiny_tokenizer())
    with init_empty_weights(include_buffers=True):
        models = get_family(family).random_models(
            spec(student_trainable="motion" if family == "animatediff" else None),
            shipped_configs(family, None),
        )
    motion = MOTION_V2 if family == "animatediff" else 0
    assert n_params(models.teacher) == n_params(models.student) == UNETS[family] + motion
    assert n_params(models.vae) == VAE
    for encoder, (published, width) in zip(models.text_encoders, TEXT_ENCODERS[family], strict=True):
        assert n_params(encoder) == published - (CLIP_VOCAB - tokenizer_vocab) * width
        assert encoder.config.vocab_size == len(models.tokenizers[0]) == tokenizer_vocab
    assert models.base_model == f"random:{'sd15' if family == 'animatediff' else family}"
    expected = component_config(FAMILY_ARCHITECTURES[family], "scheduler")["prediction_type"]
    assert models.scheduler_config["prediction_type"] == expected


@pytest.mark.parametrize("version", ["v1-5", "v1-5-2", "v1-5-3"])
def test_the_animatediff_teacher_has_the_named_adapters_version(version):
    value = f"guoyww/animatediff-motion-adapter-{version}"
    with init_empty_weights(include_buffers=True):
        models = get_family("animatediff").random_models(spec(), shipped_configs("animatediff", value))
    config = component_config(motion_adapter_architecture(value))
    assert models.teacher.config.motion_max_seq_length == config["motion_max_seq_length"]
    mid = any(n.startswith("mid_block.motion_modules") for n, _ in models.teacher.named_parameters())
    assert mid == config["use_motion_mid_block"]
    assert models.motion_adapter == f"random:{motion_adapter_architecture(value)}"
    assert models.scheduler_config["beta_schedule"] == "linear"  # the motion modules' own betas


def tiny_configs(folder) -> ComponentConfigs:
    """The tiny model's configs (a real CPU build in a second), read like a downloaded folder's."""

    def read(component):
        if component == "scheduler":
            return component_config("sd15", "scheduler")
        source, sub = (
            (folder / "motion_adapter", None) if component == "motion_adapter" else (folder, component)
        )
        return read_component_config(str(source), sub)

    return ComponentConfigs(read, "random:tiny", "random:tiny-adapter")


def test_random_weights_are_seeded_and_the_models_run(tmp_path):
    folder = save_tiny_model("animatediff", tmp_path / "ad")
    family = get_family("animatediff")
    torch.manual_seed(123)
    first = family.random_models(spec(student_trainable="motion"), tiny_configs(folder))
    torch.manual_seed(456)  # the global RNG does not matter
    second = family.random_models(spec(student_trainable="motion"), tiny_configs(folder))
    for key, value in first.teacher.state_dict().items():
        assert torch.equal(value, second.teacher.state_dict()[key]), key
    cond = family.encode_prompts(first, ["a red circle"], "cpu")
    out = first.student(torch.randn(1, 4, 2, 8, 8), torch.tensor([500.0]), **cond.unet_kwargs()).sample
    assert out.shape == (1, 4, 2, 8, 8) and torch.isfinite(out).all()


def test_a_random_init_run_needs_no_weights(monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    overrides = [
        "model.pretrained_model_name_or_path=org/never-downloaded", "model.motion_adapter=org/v1-5-2",
        f"data.train_data={REPO / 'data' / 'toy_clips' / 'captions.csv'}",
    ]  # fmt: skip
    check_before_loading(load_train_config(None, {}, [*overrides, "model.init=random"]))
    with pytest.raises(FileNotFoundError, match="never-downloaded"):
        check_before_loading(load_train_config(None, {}, overrides))


REAL_SIZE = os.environ.get("PERFLOW_VIDEO_REAL_SIZE") == "1"


@pytest.mark.skipif(
    not REAL_SIZE, reason="real-size CPU run (~10 min, ~18 GB RAM): set PERFLOW_VIDEO_REAL_SIZE=1"
)
def test_the_animatediff_recipe_trains_its_real_architecture_on_the_cpu(tmp_path):
    """OPT-IN, REAL SIZE: configs/animatediff_sd15.yaml with model.init=random (SD1.5 + v1-5-2, 1.31B
    parameters) trains its motion modules with gradient checkpointing on the toy clips at 2 x 64 x 64, on the
    CPU. Measured on 2 shared cores: 9:44 wall for 2 steps, 17.7 GB peak RSS; the memory plan said
    15.06 GB + 1.81 GB ΔW reference + the process itself."""
    overrides = [
        "model.init=random", "model.num_frames=2", "model.resolution=64", "data.video_dir=null",
        "data.num_workers=0", "optim.gradient_accumulation_steps=1", "optim.lr_warmup_steps=1",
        'optim.mixed_precision="no"', "run.eval_steps=0", "run.validation_prompts=[]",
        "run.checkpointing_steps=0", "run.report_to=none", "run.export_formats=[]",
    ]  # fmt: skip
    cmd = [
        sys.executable, str(REPO / "scripts" / "train_animatediff.py"), "--config",
        str(REPO / "configs" / "animatediff_sd15.yaml"), "--train_data",
        str(REPO / "data" / "toy_clips" / "captions.csv"), "--output_dir", str(tmp_path), "--max_train_steps", "2",
        *overrides,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((tmp_path / "train_summary.json").read_text())["global_step"] == 2
    assert "student shares 686 frozen tensors (859.52M params)" in proc.stderr
    plan = memory_plan(load_train_config(str(REPO / "configs" / "animatediff_sd15.yaml"), {}, overrides))
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    assert peak < plan.single + plan.delta_reference + 2e9, (peak, plan.single)
