"""The memory plan (``--dry-run``): built on the meta device from configs alone, its weight lines are the
run's own tensors byte for byte (shared weights once), the real recipe counts the published parameters, and
the activation estimate is what autograd really saves (checked against CPU tensors of the tiny model)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights

from perflow_video.architectures import architecture_dir
from perflow_video.families import get_family
from perflow_video.tiny.tiny_tokenizer import tiny_tokenizer
from perflow_video.training.frozen_models import place_frozen_models
from perflow_video.training.memory_plan import (
    GB,
    EfficientAttention,
    SavedTensors,
    format_plan,
    memory_plan,
    meta_models,
    planned_frozen_dtype,
    student_activations,
    student_inputs,
)
from perflow_video.training.run_setup import family_spec
from perflow_video.training.train_config import load_train_config

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "tiny" / "animatediff.yaml")
RECIPE = str(REPO / "configs" / "animatediff_sd15.yaml")
# Published parameter counts (tests/test_architectures.py): SD1.5 UNet, VAE, CLIP ViT-L text encoder, v1-5-2.
SD15_UNET, VAE, CLIP_L, MOTION_V2 = 859_520_964, 83_653_863, 123_060_480, 453_209_280
CLIP_VOCAB, CLIP_WIDTH = 49_408, 768


@pytest.fixture(autouse=True)
def tiny_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PERFLOW_VIDEO_CACHE", str(tmp_path_factory.getbasetemp() / "tiny-cache"))


def build(path, *overrides):
    return load_train_config(path, {}, list(overrides))


def lines(plan) -> dict[str, int]:
    return {x.name: x.bytes for x in [*plan.weights, *plan.training]}


def run_bytes(models) -> int:
    modules = [models.teacher, models.student, models.vae, *models.text_encoders]
    unique = {id(t): t for m in modules for t in [*m.parameters(), *m.buffers()]}
    return sum(t.numel() * t.element_size() for t in unique.values())


@pytest.mark.parametrize(
    ("precision", "trainable"), [('"no"', "motion"), ("bf16", "motion"), ('"no"', "all")]
)
def test_the_plans_weights_are_the_runs_tensors_byte_for_byte(precision, trainable):
    cfg = build(TINY, f"optim.mixed_precision={precision}", f"model.trainable={trainable}")
    family = get_family("animatediff")
    models = family.load(family_spec(cfg))  # what the run loads, on the CPU
    family.set_trainable(models.student, cfg.model.trainable)
    place_frozen_models(models, "cpu", planned_frozen_dtype(cfg))
    plan = memory_plan(cfg)
    assert sum(x.bytes for x in plan.weights) == run_bytes(models)
    trained = sum(p.numel() for p in models.student.parameters() if p.requires_grad)
    shared = sum(p.numel() * 4 for p in models.student.parameters() if not p.requires_grad)
    assert lines(plan)["student: trained weights"] == 4 * trained
    assert lines(plan).get("student = teacher: shared frozen weights", 0) == shared  # none when all train
    assert (shared > 0) == (trainable == "motion")


def test_the_real_recipe_counts_the_published_parameters():
    cfg = build(RECIPE, "model.init=random")
    plan = memory_plan(cfg)
    details = {x.name: x.detail for x in plan.weights}
    found = lines(plan)
    assert found["student: trained weights"] == 4 * MOTION_V2  # fp32 master weights
    assert found["student = teacher: shared frozen weights"] == 4 * SD15_UNET  # once, for both
    assert found["teacher: weights of its own"] // 2 >= MOTION_V2  # its motion modules in bf16 (+ buffers)
    assert details["VAE"] == f"{VAE / 1e6:.2f}M bfloat16"
    vocab = len(tiny_tokenizer())  # random init: the tiny tokenizer's vocabulary
    assert details["text encoders"].startswith(f"{(CLIP_L - (CLIP_VOCAB - vocab) * CLIP_WIDTH) / 1e6:.2f}M")
    assert found["gradients"] == 4 * MOTION_V2 and found["AdamW moments"] == 8 * MOTION_V2
    assert found["EMA copy"] == 4 * MOTION_V2  # the recipe keeps an EMA
    assert plan.single == sum(found.values()) + plan.activations.total  # here the step outweighs the VAE
    assert not plan.notes


def sd15_folder(root: Path) -> Path:
    """A diffusers SD1.5 folder holding configs only (what a download holds besides the weights)."""
    folder = root / "sd15"
    shutil.copytree(architecture_dir("sd15"), folder)
    shutil.copytree(architecture_dir("motion_adapter_v1_5_2"), root / "adapter")
    return folder


def test_a_pretrained_plan_reads_the_sources_configs_offline(tmp_path):
    folder = sd15_folder(tmp_path)
    cfg = build(
        RECIPE,
        f"model.pretrained_model_name_or_path={folder}",
        f"model.motion_adapter={tmp_path / 'adapter'}",
    )
    plan = memory_plan(cfg)
    assert {x.name: x.detail for x in plan.weights}["text encoders"].startswith(f"{CLIP_L / 1e6:.2f}M")
    assert lines(plan)["student = teacher: shared frozen weights"] == 4 * SD15_UNET and not plan.notes
    missing = memory_plan(build(RECIPE, "model.pretrained_model_name_or_path=org/not-downloaded"))
    assert any("unet" in n and "shipped sd15" in n for n in missing.notes)
    assert lines(missing) == lines(plan)  # counted with the shipped architecture instead


def test_fsdp_splits_what_trains_and_keeps_a_full_teacher():
    cfg = build(RECIPE, "model.init=random")
    plan = memory_plan(cfg, fsdp_processes=4)
    fsdp = {x.name: x.bytes for x in plan.fsdp}
    student = SD15_UNET + MOTION_V2
    assert fsdp["student fp32 weights, sharded"] == 4 * student // 4
    assert fsdp["teacher, full copy"] == 2 * student  # bf16
    assert fsdp["AdamW moments, sharded"] == 8 * MOTION_V2 // 4
    assert plan.per_fsdp_process < plan.single


def test_activations_scale_with_the_clip_and_checkpointing_lowers_them():
    def activations(*overrides):
        return memory_plan(build(TINY, *overrides)).activations

    small, large = activations("model.num_frames=8"), activations("model.num_frames=16")
    assert 1.8 < large.saved / small.saved < 2.2  # linear in frames (motion attention is over 8-16 frames)
    checkpointed = activations("model.num_frames=16", "model.gradient_checkpointing=true")
    assert checkpointed.saved < large.saved and checkpointed.recompute > 0


def test_the_meta_estimate_is_what_autograd_saves_on_real_tensors():
    """Same model, same shapes: meta device with the memory-efficient attention stand-in vs the CPU's own
    SDPA kernel on real tensors."""
    cfg = build(TINY, "model.num_frames=8")
    family, meta = meta_models(cfg, share_frozen=True, notes=[])
    estimate = student_activations(family, meta, cfg)
    real = family.load(family_spec(cfg))
    family.set_trainable(real.student, cfg.model.trainable)
    z_t, timestep, _ = student_inputs(family, meta, cfg, torch.float32)
    r = cfg.model.resolution  # the planned latents are what the VAE makes of a frame (tiny teacher: r / 4)
    frames = torch.zeros(1, cfg.model.num_frames, 3, r, r)
    assert z_t.shape[-2:] == family.encode_pixels(real, frames).shape[-2:]
    cond = family.encode_prompts(real, [""] * cfg.optim.train_batch_size, "cpu")
    saved = SavedTensors([*real.student.parameters(), *real.student.buffers()])
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        real.student(torch.randn(z_t.shape), torch.full(timestep.shape, 500.0), **cond.unet_kwargs())
    measured = saved.activations()
    assert measured.saved == pytest.approx(estimate.saved, rel=0.02)
    with init_empty_weights(), EfficientAttention():  # the stand-in is the CPU kernel itself
        q = torch.empty(2, 4, 9, 8, device="meta")
        assert torch.nn.functional.scaled_dot_product_attention(q, q, q).shape == q.shape


def test_the_plan_prints_as_comments_with_its_totals():
    cfg = build(RECIPE, "model.init=random")
    plan = memory_plan(cfg)
    text = format_plan(plan, cfg)
    assert all(row.startswith("# ") for row in text.splitlines())
    assert "activations" in text and "VAE encode" in text and "assumes:" in text
    assert text.split("total, one GPU")[1].split()[:2] == [f"{plan.single / GB:.2f}", "GB"]
    assert text.split("total per FSDP process")[1].split()[:2] == [f"{plan.per_fsdp_process / GB:.2f}", "GB"]
    tiny = build(TINY)
    assert "MB" in format_plan(memory_plan(tiny), tiny).split("student: trained weights")[1].splitlines()[0]
