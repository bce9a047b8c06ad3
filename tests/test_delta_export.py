"""export_delta / export_all: every format lands under its name and loads with its client's own loader."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from perflow_video.errors import ConfigError
from perflow_video.tiny.tiny_models import tiny_pipeline
from perflow_video.weights.delta_export import (
    DELTA_FORMATS,
    FILENAMES,
    applicable_formats,
    export_all,
    export_delta,
)
from perflow_video.weights.delta_weights import (
    DeltaMetadata,
    apply_delta_weights,
    compute_delta_weights,
    is_motion_key,
    load_delta_weights,
    trainable_parameter_names,
)


def _meta(layout: str) -> DeltaMetadata:
    return DeltaMetadata("animatediff", "tiny", "ddim_eps", 4, "sync", 1.0, layout)


@pytest.fixture(scope="module")
def pipe_and_delta():
    """The tiny AnimateDiff pipeline (teacher) and a ΔW on every weight of its UNetMotionModel."""
    pipe = tiny_pipeline("animatediff")
    teacher = pipe.unet
    student = copy.deepcopy(teacher)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=gen))
    delta = compute_delta_weights(
        student.state_dict(), teacher.state_dict(), trainable_parameter_names(student)
    )
    return pipe, delta


def _split(delta: dict, motion: bool) -> dict:
    return {k: v for k, v in delta.items() if is_motion_key(k) == motion}


def test_applicable_formats_follow_the_keys(pipe_and_delta):
    _, delta = pipe_and_delta
    assert applicable_formats(delta) == list(DELTA_FORMATS)
    assert applicable_formats(_split(delta, motion=True)) == [
        "diffusers", "motion_original", "motion_lora_diffusers", "motion_lora_comfyui",
    ]  # fmt: skip
    assert applicable_formats(_split(delta, motion=False)) == [
        "diffusers", "lora_peft", "lora_kohya", "diff_patches",
    ]  # fmt: skip


def test_export_all_writes_every_format_under_its_name(pipe_and_delta, tmp_path):
    _, delta = pipe_and_delta
    written = export_all(delta, tmp_path, _meta, rank=4)
    assert set(written) == set(DELTA_FORMATS)
    for fmt, path in written.items():
        assert path == tmp_path / FILENAMES[fmt] and path.is_file()
    loaded, meta = load_delta_weights(written["diffusers"])
    assert meta.layout == "diffusers_unet_motion" and set(loaded) == set(delta)
    _, meta = load_delta_weights(written["motion_original"])
    assert meta.layout == "animatediff_original"
    with safe_open(written["diff_patches"], "pt") as f:
        assert all(k.startswith("lora_unet_") and k.endswith((".diff", ".diff_b")) for k in f.keys())


def test_no_lora_files_without_a_rank_and_an_empty_choice_writes_nothing(pipe_and_delta, tmp_path):
    _, delta = pipe_and_delta
    written = export_all(delta, tmp_path, _meta, rank=None)
    assert set(written) == {"diffusers", "motion_original", "diff_patches"}
    assert export_all(delta, tmp_path / "none", _meta, formats=()) == {}


def test_both_loras_in_one_animatediff_pipeline_reproduce_the_full_rank_delta(pipe_and_delta, tmp_path):
    """At full rank (1024 >= every tiny width) the spatial LoRA and the motion LoRA, loaded together with
    diffusers' own load_lora_weights and fused, give teacher + ΔW on every weight they cover."""
    pipe, delta = pipe_and_delta
    pipe = copy.deepcopy(pipe)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    spatial = export_delta(delta, "lora_peft", tmp_path / "s.safetensors", rank=1024)
    motion = export_delta(delta, "motion_lora_diffusers", tmp_path / "m.safetensors", rank=1024)
    pipe.load_lora_weights(str(spatial), adapter_name="spatial")
    pipe.load_lora_weights(str(motion), adapter_name="motion")
    pipe.set_adapters(["spatial", "motion"], [1.0, 1.0])
    pipe.fuse_lora(adapter_names=["spatial", "motion"])
    pipe.unload_lora_weights()
    after = pipe.unet.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(is_motion_key(k) for k in changed) and any(not is_motion_key(k) for k in changed)
    for k in changed:
        err = (after[k] - before[k] - delta[k]).abs().max()
        assert err < 2e-3 * delta[k].abs().max() + 1e-5, k  # fp16 factors of the spatial LoRA
    untouched = set(delta) - set(changed)
    assert all(before[k].ndim == 1 or "motion_modules" in k for k in untouched)  # biases, norms, ff...


def test_motion_original_file_applies_like_the_diffusers_one(pipe_and_delta, tmp_path):
    pipe, delta = pipe_and_delta
    written = export_all(delta, tmp_path, _meta, formats=("diffusers", "motion_original"))
    a, b = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.unet)
    apply_delta_weights(a, load_delta_weights(written["diffusers"])[0])
    apply_delta_weights(b, load_delta_weights(written["motion_original"])[0])
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if is_motion_key(k):
            assert torch.equal(sa[k], sb[k]), k


def test_errors_name_the_format_and_what_is_missing(pipe_and_delta, tmp_path):
    _, delta = pipe_and_delta
    with pytest.raises(ConfigError, match="unknown ΔW format 'lora'"):
        export_delta(delta, "lora", tmp_path / "x.safetensors", rank=4)
    with pytest.raises(ConfigError, match="'motion_lora_comfyui' needs motion-module keys"):
        export_delta(_split(delta, motion=False), "motion_lora_comfyui", tmp_path / "x.safetensors", rank=4)
    with pytest.raises(ConfigError, match="'lora_kohya' needs spatial"):
        export_delta(_split(delta, motion=True), "lora_kohya", tmp_path / "x.safetensors", rank=4)
    with pytest.raises(ConfigError, match="needs the ΔW metadata"):
        export_delta(delta, "diffusers", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
