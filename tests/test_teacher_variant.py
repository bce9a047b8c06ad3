"""The plug-and-play variant (evaluation/teacher_variant.py, scripts/train_tiny_variant.py): its data, its
resumable fine-tune of the shipped teacher's spatial UNet, the folder it writes, and the size measure."""

from __future__ import annotations

import dataclasses
import filecmp
import os

import numpy as np
import pytest
import torch

from perflow_video.errors import ConfigError
from perflow_video.evaluation.evidence_models import load_teacher
from perflow_video.evaluation.teacher_variant import (
    VARIANT_INFO,
    VariantConfig,
    disc_area,
    finetune_variant,
    frame_batch,
    object_area,
)
from perflow_video.tiny.embedded_teacher import tiny_teacher_folder
from perflow_video.toy.shape_world import ClipSpec, ShapeWorldConfig, render_clip

TINY = VariantConfig(steps=3, frames_per_step=4, warmup=2, learning_rate=1e-3)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_variant_world_draws_objects_within_its_radius_bounds():
    world = VariantConfig().world()
    radii = [world.spec(i).radius for i in range(200)]
    assert 3.0 <= min(radii) and max(radii) <= 4.5 and max(radii) - min(radii) > 1.0
    assert len({world.spec(i).prompt for i in range(72)}) == 72  # every prompt, the held-out ones too


def test_a_frame_batch_is_one_frame_of_each_clip_and_deterministic():
    world = VariantConfig().world()
    frames, captions = frame_batch(world, step=5, n=3)
    clips, clip_captions = world.batch(15, 3)
    assert frames.shape == (3, 3, 32, 32) and captions == clip_captions
    for k in range(3):
        assert any(torch.equal(frames[k], clips[k, :, f]) for f in range(clips.shape[2]))
    again, _ = frame_batch(world, step=5, n=3)
    assert torch.equal(frames, again)


@pytest.mark.parametrize(
    "changes, word",
    [({"min_radius": 5.0, "max_radius": 4.0}, "radius"), ({"steps": 0}, "steps"), ({"frames_per_step": 0}, "frames")],
)  # fmt: skip
def test_bad_variant_settings_name_the_setting(changes, word):
    with pytest.raises(ConfigError, match=word):
        dataclasses.replace(VariantConfig(), **changes)


def test_object_area_reads_the_rendered_size():
    cfg = ShapeWorldConfig()
    for radius in (3.0, 4.5, 7.0):
        clip = render_clip(ClipSpec("red", "circle", "left", radius, (16.0, 20.0), 8.0), cfg)
        assert object_area(clip) == pytest.approx(disc_area(radius), rel=0.15)


def test_the_fine_tune_resumes_to_the_same_weights_and_writes_a_teacher_like_folder(tmp_path):
    teacher = tiny_teacher_folder()
    straight = finetune_variant(teacher, tmp_path / "straight", TINY)
    finetune_variant(teacher, tmp_path / "resumed", dataclasses.replace(TINY, steps=2))
    resumed = finetune_variant(teacher, tmp_path / "resumed", TINY)  # continues from step 2
    assert straight["steps_done"] == resumed["steps_done"] == 3

    a, b = (load_teacher(str(tmp_path / d), 16) for d in ("straight", "resumed"))
    base = load_teacher(str(teacher), 16)
    for key, value in a.unet.state_dict().items():
        assert torch.allclose(value, b.unet.state_dict()[key], atol=1e-6), key
    moved = [k for k, v in a.unet.state_dict().items() if not torch.equal(v, base.unet.state_dict()[k])]
    assert moved  # the spatial UNet was trained
    for part in ("vae", "text_encoder", "motion_adapter", "scheduler", "tokenizer"):  # byte for byte
        files = sorted(p.relative_to(teacher / part) for p in (teacher / part).rglob("*") if p.is_file())
        match, mismatch, errors = filecmp.cmpfiles(teacher / part, tmp_path / "straight" / part,
                                                   [str(f) for f in files], shallow=False)  # fmt: skip
        assert files and not mismatch and not errors, part
    info = (tmp_path / "straight" / VARIANT_INFO).read_text()
    assert '"min_radius": 3.0' in info and np.isfinite(straight["loss_last_50"])


def test_the_script_reports_bad_settings_as_one_error_line(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_tiny_variant.py"
    spec = importlib.util.spec_from_file_location("train_tiny_variant", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    status = script.main(["--out", str(tmp_path / "v"), "--min-radius", "5", "--max-radius", "4"])
    assert status == 2 and "error: radius bounds" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()
    assert "--min-radius" in script.build_parser().format_help()


def test_a_checkpoint_of_other_settings_is_refused_not_resumed(tmp_path):
    teacher = tiny_teacher_folder()
    finetune_variant(teacher, tmp_path / "v", dataclasses.replace(TINY, steps=2))
    with pytest.raises(ConfigError, match="other settings .*max_radius"):
        finetune_variant(teacher, tmp_path / "v", dataclasses.replace(TINY, steps=3, max_radius=5.0))
    with pytest.raises(ConfigError, match="step 2, past --steps 1"):
        finetune_variant(teacher, tmp_path / "v", dataclasses.replace(TINY, steps=1))


def test_the_model_index_is_removed_first_and_moved_in_last(tmp_path, monkeypatch):
    """A crash while the parts move leaves a folder without model_index.json (it does not load)."""
    import perflow_video.evaluation.teacher_variant as tv

    teacher = tiny_teacher_folder()
    finetune_variant(teacher, tmp_path / "v", dataclasses.replace(TINY, steps=1))
    moved, real_replace = [], os.replace
    seen_marker_missing = []

    def recording_replace(src, dst):
        seen_marker_missing.append(not (tmp_path / "v" / "model_index.json").exists())
        moved.append(os.path.basename(dst))
        real_replace(src, dst)

    monkeypatch.setattr(tv.os, "replace", recording_replace)
    finetune_variant(teacher, tmp_path / "v", dataclasses.replace(TINY, steps=1))  # rewrites the folder
    assert moved[-1] == "model_index.json" and len(moved) > 5 and all(seen_marker_missing)
