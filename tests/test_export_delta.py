"""scripts/export_delta.py and the trainer's ΔW files: a finished run ships every format; other ΔW sources
(the official PeRFlow UNet folder of differences, merged - base) read back to the same ΔW."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from perflow_video.errors import ConfigError, PathNotFoundError
from perflow_video.tiny.tiny_models import tiny_unet
from perflow_video.weights.delta_export import FILENAMES
from perflow_video.weights.delta_sources import delta_from_merged, read_delta, read_state
from perflow_video.weights.delta_weights import load_delta_weights
from perflow_video.weights.export_cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """2 steps of the tiny AnimateDiff with every weight trainable (spatial + motion ΔW), ~15 s."""
    root = tmp_path_factory.mktemp("export")
    env = {
        **os.environ,
        "PERFLOW_VIDEO_CACHE": str(root / "cache"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    out = root / "run"
    cmd = [
        sys.executable, str(REPO / "scripts" / "train_animatediff.py"), "--output_dir", str(out),
        "--max_train_steps", "2", "run.validation_prompts=[]", "run.eval_steps=0", "model.num_frames=4",
        "reflow.solver_steps=2", "optim.train_batch_size=1", "model.trainable=all", "run.lora_rank=8",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_a_finished_run_ships_every_format(run_dir):
    for name in FILENAMES.values():
        assert (run_dir / name).is_file(), name


def test_cli_writes_the_chosen_formats_with_a_manifest(run_dir, tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["--run", str(run_dir), "--out", str(out), "--format", "lora_kohya", "--rank", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["export_manifest.json", FILENAMES["lora_kohya"]]
    assert "lora_kohya" in capsys.readouterr().out


def test_cli_fidelity_table_falls_with_rank(run_dir, capsys):
    assert main(["--run", str(run_dir), "--fidelity", "1,1024"]) == 0
    lines = capsys.readouterr().out.splitlines()
    spatial = [float(line.split("|")[1]) for line in lines[1:3]]
    assert spatial[0] > 0.05 and spatial[1] < 1e-5  # full rank is exact on the LoRA'd layers
    motion = [float(line.split("|")[1]) for line in lines[4:6]]
    assert motion[0] < motion[1] <= 1.0


def test_cli_user_errors_exit_2_naming_the_flag(run_dir, tmp_path, capsys):
    assert main(["--run", str(tmp_path / "nope")]) == 2
    assert "--run" in capsys.readouterr().err
    assert main(["--run", str(run_dir), "--delta", "x.safetensors"]) == 2
    assert "exactly one" in capsys.readouterr().err
    assert main(["--merged", str(run_dir)]) == 2
    assert "--base" in capsys.readouterr().err


def test_official_unet_folder_of_differences_with_variant(tmp_path):
    """The official PeRFlow SD1.5 ΔW is a diffusers UNet folder whose weights are differences (variant v0-1)."""
    diff_unet = tiny_unet("sd15", seed=5)
    diff_unet.save_pretrained(tmp_path / "delta" / "unet", variant="v0-1")
    delta, meta = read_delta(tmp_path / "delta", variant="v0-1")
    assert meta is None
    expected = diff_unet.state_dict()
    assert set(delta) == set(expected) and all(torch.equal(delta[k], expected[k]) for k in delta)
    assert set(read_delta(tmp_path / "delta")[0]) == set(expected)  # the only variant present
    with pytest.raises(PathNotFoundError, match="v0-2"):
        read_delta(tmp_path / "delta", variant="v0-2")


def test_merged_minus_base_is_the_delta(tmp_path):
    base, merged = tiny_unet("sd15", seed=0), tiny_unet("sd15", seed=0)
    with torch.no_grad():
        merged.conv_in.weight.add_(0.5)
    base.save_pretrained(tmp_path / "base")
    merged.save_pretrained(tmp_path / "merged")
    delta = delta_from_merged(read_state(tmp_path / "merged"), read_state(tmp_path / "base"))
    assert list(delta) == ["conv_in.weight"] and torch.allclose(delta["conv_in.weight"], torch.tensor(0.5))
    other = tiny_unet("sdxl").state_dict()
    with pytest.raises(ConfigError, match="not the same model"):
        delta_from_merged(other, read_state(tmp_path / "base"))


def test_run_delta_file_reads_with_its_metadata(run_dir):
    delta, meta = read_delta(run_dir / "delta_weights.safetensors")
    assert meta.family == "animatediff" and all(v.dtype == torch.float32 for v in delta.values())
    assert set(delta) == set(load_delta_weights(run_dir / "delta_weights.safetensors")[0])
