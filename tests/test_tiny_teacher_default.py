"""The embedded trained tiny teacher (``tiny-teacher``) as the default of the tiny AnimateDiff recipe and of
generate.py: it resolves to the folder shipped in the package, diffusers loads it as SD1.5 + a motion
adapter, other families refuse it by name, a wheel carries it, the tiny config trains on it end to end, and
the shape-world clips the recipe trains on match their generator. Nothing here depends on the weights'
values (the lead replaces them with a better-trained teacher of the same architecture)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import offline_tiny_env
from diffusers import AnimateDiffPipeline, MotionAdapter

from perflow_video.datasets.video_clips import VideoClipConfig, VideoClipDataset
from perflow_video.errors import ConfigError
from perflow_video.families import FamilySpec, get_family
from perflow_video.families.loading import (
    TINY_TEACHER,
    check_weights_present,
    load_component,
    read_component_config,
    resolve_model_path,
)
from perflow_video.generation.cli import main as generate_main
from perflow_video.generation.model_source import load_tiny_default, model_resolution, tiny_model_folder
from perflow_video.tiny.embedded_teacher import TEACHER_COMPONENTS, tiny_teacher_folder
from perflow_video.toy.shape_world import ShapeWorld
from perflow_video.training.train_config import load_train_config

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny" / "animatediff.yaml"
SHAPE_WORLD_CLIPS = REPO / "data" / "shape_world_clips"
FOLDER = tiny_teacher_folder()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with offline_tiny_env(tmp_path_factory.mktemp("tiny-teacher")) as environment:
        yield environment


def test_tiny_teacher_resolves_to_the_shipped_diffusers_folder():
    assert resolve_model_path(TINY_TEACHER, "animatediff") == str(FOLDER) == tiny_model_folder()
    assert FOLDER.parent.name == "assets" and FOLDER.is_relative_to(REPO / "perflow_video")
    for name in ("model_index.json", "teacher_info.json", *TEACHER_COMPONENTS):
        assert (FOLDER / name).exists(), name
    weights = [p for p in FOLDER.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt", ".pth")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    check_weights_present("model.pretrained_model_name_or_path", TINY_TEACHER, "model_index.json", None, "x")
    assert model_resolution(TINY_TEACHER, "animatediff") == 32


def test_diffusers_loads_it_as_sd15_plus_a_motion_adapter():
    adapter = MotionAdapter.from_pretrained(FOLDER / "motion_adapter")
    pipe = AnimateDiffPipeline.from_pretrained(FOLDER, motion_adapter=adapter)
    out = pipe("a red circle moving left", num_inference_steps=1, guidance_scale=1.0, output_type="pt")
    assert out.frames.shape == (1, 16, 3, 32, 32) and torch.isfinite(out.frames).all()


def test_motion_adapter_tiny_teacher_is_its_motion_adapter_folder():
    expected = MotionAdapter.from_pretrained(FOLDER / "motion_adapter").state_dict()
    loaded = load_component(MotionAdapter, TINY_TEACHER, None, None, None, "model.motion_adapter")
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
    assert read_component_config(TINY_TEACHER, None)["_class_name"] == "MotionAdapter"
    assert read_component_config(TINY_TEACHER, "unet")["sample_size"] == 8
    spec = FamilySpec(TINY_TEACHER, TINY_TEACHER, None, None, None, 32, 16)
    models = get_family("animatediff").load(spec)
    motion = {k: v for k, v in models.teacher.state_dict().items() if "motion_modules" in k}
    assert motion and all(torch.equal(v, expected[k]) for k, v in motion.items())


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_image_families_refuse_tiny_teacher_by_name(family):
    spec = FamilySpec(TINY_TEACHER, None, None, None, None, 64, 1)
    with pytest.raises(ConfigError) as info:
        get_family(family).load(spec)
    message = str(info.value)
    assert "model.pretrained_model_name_or_path=tiny-teacher" in message and "animatediff" in message
    assert f"family {family} takes tiny" in message


def test_a_wheel_carries_the_teacher(tmp_path):
    """A non-editable install has the teacher: the package data of a wheel built from a copy of the tree."""
    src = tmp_path / "src"
    shutil.copytree(
        REPO / "perflow_video", src / "perflow_video", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w"]
    subprocess.run([*cmd, str(tmp_path / "wheel")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(REPO).as_posix() for p in FOLDER.rglob("*") if p.is_file()}
    assert len(shipped) >= 13 and shipped <= names


def test_the_tiny_config_trains_the_teacher_on_shape_world_clips():
    cfg = load_train_config(str(TINY_CONFIG), {}, [])
    model = cfg.model
    assert (model.pretrained_model_name_or_path, model.motion_adapter) == (TINY_TEACHER, TINY_TEACHER)
    assert (model.resolution, model.num_frames, cfg.data.sample_stride) == (32, 16, 1)
    assert Path(cfg.data.train_data) == Path("data/shape_world_clips/captions.csv")


def test_dry_run_of_the_default_command(env):
    cmd = [sys.executable, str(REPO / "scripts" / "train_animatediff.py"), "--dry-run"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pretrained_model_name_or_path: tiny-teacher" in proc.stdout
    assert "4 x 16 x 32 x 32" in proc.stdout  # the memory plan reads the teacher's clip shape (batch 4)


def test_five_steps_of_the_tiny_config_then_generate_from_the_run(env, tmp_path, capsys):
    out = tmp_path / "run"
    cmd = [
        sys.executable, str(REPO / "scripts" / "train_animatediff.py"), "--output_dir", str(out),
        "--max_train_steps", "5", "run.validation_prompts=[]", "run.eval_steps=0", "reflow.solver_steps=2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 5
    assert (out / "delta_weights.safetensors").is_file() and (out / "student" / "unet_motion").is_dir()
    args = ["--run", str(out), "--prompt", "a red circle moving left", "--output", str(tmp_path / "c.mp4")]
    assert generate_main([*args, "--device", "cpu"]) == 0
    assert (tmp_path / "c.mp4").stat().st_size > 0


def test_generate_without_a_model_samples_the_trained_teacher(env, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    loaded, note = load_tiny_default(num_frames=2)
    assert "trained tiny teacher" in note and "untrained" not in note
    assert loaded.models.base_model == str(FOLDER) and (loaded.resolution, loaded.num_frames) == (32, 16)
    args = ["--prompt", "a red circle moving left", "--num_frames", "2", "--steps", "1", "--output", "t.mp4"]
    assert generate_main([*args, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "sampling the trained tiny teacher (tiny-teacher, embedded)" in printed
    assert (tmp_path / "t.mp4").stat().st_size > 0


def test_shipped_shape_world_clips_match_their_generator():
    """data/shape_world_clips is `python data/make_toy_clips.py --shape-world`: ShapeWorld('train', 0) clips,
    read back by the data pipeline at 32 px within encoding error of the rendered tensors."""
    world = ShapeWorld("train", seed=0)
    rows = list(csv.DictReader(open(SHAPE_WORLD_CLIPS / "captions.csv", encoding="utf-8")))
    assert [(r["videoid"], r["name"]) for r in rows] == [
        (f"sw_{i:03d}", world.spec(i).prompt) for i in range(132)
    ]
    assert sum(p.stat().st_size for p in SHAPE_WORLD_CLIPS.iterdir()) < 600 * 1024
    config = VideoClipConfig(csv_path=str(SHAPE_WORLD_CLIPS / "captions.csv"), num_frames=16, resolution=32,
                             sample_stride=1)  # fmt: skip
    dataset = VideoClipDataset(config)
    for i in range(3):
        decoded = dataset[i]["pixel_values"].permute(1, 0, 2, 3)  # (3, F, H, W) as ShapeWorld renders
        assert (decoded - world.clip(i)).pow(2).mean().sqrt() < 0.03
