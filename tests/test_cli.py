"""Errors a user meets, through the real scripts: one clear message naming the key / flag / file, exit
status 2, no traceback (``--debug`` shows it), and nothing loaded before the config, data and weights
were checked. Plus the pieces behind it: the weights lookup (offline), the worker message, bugs raise."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import constants

from perflow_video.datasets.video_clips import BadDataError
from perflow_video.errors import user_message
from perflow_video.families.loading import (
    EXAMPLE_WEIGHTS,
    PIPELINE_MARKER,
    WeightsNotFoundError,
    check_weights_present,
)
from perflow_video.training import cli
from perflow_video.training.config_io import ConfigError
from perflow_video.training.preflight import check_weights
from perflow_video.training.train_config import ModelConfig

REPO = Path(__file__).resolve().parent.parent
# Lines the environment prints on every start (transformers without torchvision); not ours.
NOISE = ("[transformers]",)
# What a run prints once it loads models: none of it may appear before a config / data / weights error.
LOADING = ("Loading weights", "attention backend", "Writing model shards")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Offline, with an empty Hugging Face cache and a private tiny-model cache."""
    root = tmp_path_factory.mktemp("cli")
    return {
        **__import__("os").environ,
        "PERFLOW_VIDEO_CACHE": str(root / "tiny"),
        "HF_HUB_CACHE": str(root / "hf"),
        "HF_HUB_OFFLINE": "1",
    }


def script(env, name: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "scripts" / name), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, one 'error:' line naming what is wrong, nothing loaded; returns that line."""
    lines = [line for line in proc.stderr.splitlines() if not line.startswith(NOISE)]
    errors = [line for line in lines if line.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--dry-run", "optim.learning_rat=1e-4"], ["optim.learning_rat", "Did you mean 'learning_rate'?"]),
        (["--dry-run", "--max_train_steps", "0"], ["max_train_steps must be >= 1, got 0"]),
        (["--train_data", "/nonexistent"], ["data.train_data='/nonexistent' does not exist", "--train_data"]),
        (["--resume_from_checkpoint", "/no/such/checkpoint"], ["run.resume_from_checkpoint='/no/such/checkpoint'"]),
    ],
)  # fmt: skip
def test_config_data_and_checkpoint_errors_are_one_line_before_anything_loads(env, args, needles):
    proc = script(env, "train_animatediff.py", *args)
    assert_user_error(proc, *needles)
    assert not any(marker in proc.stderr for marker in LOADING), proc.stderr[-3000:]


def test_missing_sdxl_weights_name_the_key_and_an_sdxl_example_without_hub_retries(env):
    proc = script(env, "train_image.py", "--model", "sdxl", "--train_data", "data/toy_images/captions.csv")
    line = assert_user_error(
        proc, "model.pretrained_model_name_or_path='stabilityai/stable-diffusion-xl-base-1.0'",
        "nor in the Hugging Face cache", "HF_HUB_OFFLINE", "hf download stabilityai/stable-diffusion-xl-base-1.0",
    )  # fmt: skip
    assert "stable-diffusion-v1-5" not in line
    assert not any(marker in proc.stderr for marker in LOADING)


def test_corrupt_clip_is_the_bad_data_message_alone(env, tmp_path):
    clip = (REPO / "data" / "toy_clips" / "toy_000.mp4").read_bytes()
    (tmp_path / "good.mp4").write_bytes(clip)
    (tmp_path / "bad.mp4").write_bytes(b"\x00not a video" * 200)
    for name in ("good", "bad"):
        (tmp_path / f"{name}.txt").write_text("a red circle moving left")
    proc = script(
        env, "train_animatediff.py", "--train_data", str(tmp_path), "--output_dir", str(tmp_path / "run"),
        "--max_train_steps", "1", "model.num_frames=4", "reflow.solver_steps=1", "optim.train_batch_size=1",
        "run.validation_prompts=[]", "run.eval_steps=0",
    )  # fmt: skip
    assert_user_error(proc, "of the dataset is unusable")
    assert "bad.mp4" in proc.stderr.split("error: ")[-1]


def test_debug_shows_the_traceback_and_help_config_the_values_of_the_no_argument_run(env):
    proc = script(env, "train_animatediff.py", "--debug", "--dry-run", "optim.learning_rat=1e-4")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    proc = script(env, "train_animatediff.py", "--help-config")
    assert proc.returncode == 0, proc.stderr
    assert "  optim.learning_rate = 3e-05  # AdamW peak learning rate" in proc.stdout
    assert '  run.output_dir = "outputs/tiny-animatediff"  # ' in proc.stdout
    assert "configs/tiny/animatediff.yaml" in proc.stdout.splitlines()[0]


def test_dry_run_prints_the_memory_plan_of_the_real_recipe_offline_without_loading(env):
    recipe = str(REPO / "configs" / "animatediff_sd15.yaml")
    proc = script(env, "train_animatediff.py", "--config", recipe, "--dry-run", "model.init=random")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert yaml.safe_load(proc.stdout)["model"]["init"] == "random"  # the plan lines are YAML comments
    plan = [line for line in proc.stdout.splitlines() if line.startswith("# ")]
    assert plan[0].startswith("# memory plan") and "1 x 16 x 384 x 384" in plan[0]
    assert any("student = teacher: shared frozen weights" in line and "859.52M" in line for line in plan)
    assert any("total, one GPU" in line for line in plan) and not any("note:" in line for line in plan)
    assert not any(marker in proc.stderr for marker in LOADING), proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------ in process


def test_a_bug_is_not_a_user_error(monkeypatch):
    def bug(args, config_path):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "resolve_config", bug)
    args = argparse.Namespace(config=None, debug=False)
    with pytest.raises(KeyError):
        cli.run(args, REPO / "configs" / "tiny" / "animatediff.yaml", ("animatediff",))


class _BadData(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise BadDataError("more than 5.0% of the dataset is unusable; skipped 2 of 2 items")


def test_a_dataloader_worker_error_is_shown_as_its_own_message():
    loader = torch.utils.data.DataLoader(_BadData(), num_workers=1)
    with pytest.raises(BadDataError) as info:
        next(iter(loader))
    assert "Traceback" in str(info.value)  # torch puts the worker's traceback into the message
    assert user_message(info.value) == "more than 5.0% of the dataset is unusable; skipped 2 of 2 items"
    assert user_message(ConfigError("optim.x: bad")) == "optim.x: bad"


def _fake_cache(root: Path, repo_id: str, filename: str) -> None:
    """The layout huggingface_hub writes: refs/main -> a snapshot folder holding the file."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / filename).write_text("{}")


def test_weights_found_tiny_local_or_in_the_cache_without_network(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    flag, example = "model.pretrained_model_name_or_path", EXAMPLE_WEIGHTS["sd15"]
    check_weights_present(flag, "tiny", PIPELINE_MARKER, None, example)
    check_weights_present(flag, str(tmp_path), PIPELINE_MARKER, None, example)
    with pytest.raises(WeightsNotFoundError, match="HF_HUB_OFFLINE"):
        check_weights_present(flag, "org/model", PIPELINE_MARKER, None, example)
    _fake_cache(tmp_path / "hub", "org/model", PIPELINE_MARKER)
    check_weights_present(flag, "org/model", PIPELINE_MARKER, None, example)
    with pytest.raises(WeightsNotFoundError, match="no such file or folder"):
        check_weights_present(flag, "/models/nowhere/sd15", PIPELINE_MARKER, None, example)


def test_weights_missing_with_an_unreachable_hub_say_so(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # refused at once, no network
    assert huggingface_hub.HfApi().endpoint == "http://127.0.0.1:9"
    with pytest.raises(WeightsNotFoundError, match="the hub is not reachable"):
        check_weights_present("model.motion_adapter", "org/adapter", "config.json", None, "guoyww/x")


@pytest.mark.parametrize("family", sorted(EXAMPLE_WEIGHTS))
def test_each_family_names_its_own_example(family, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    trainable = "motion" if family == "animatediff" else "all"
    model = ModelConfig(family=family, pretrained_model_name_or_path="org/missing", trainable=trainable)
    with pytest.raises(WeightsNotFoundError) as info:
        check_weights(model)
    assert str(info.value).endswith(f"e.g. model.pretrained_model_name_or_path={EXAMPLE_WEIGHTS[family]}")


def test_a_single_checkpoint_file_needs_its_component_configs(tmp_path):
    ckpt = tmp_path / "finetune.safetensors"
    ckpt.write_bytes(b"")
    model = ModelConfig(family="sd15", pretrained_model_name_or_path=str(ckpt), trainable="all")
    with pytest.raises(ConfigError, match="set model.single_file_config"):
        check_weights(model)
