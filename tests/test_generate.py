"""scripts/generate.py on a real (2-step) tiny AnimateDiff run: playable MP4 / GIF files, folder mode with
clips.json, seeds, UNet evaluation counts, the prompts-file rules and the user errors (exit 2, no traceback).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import offline_tiny_env, user_error
from PIL import Image, ImageSequence

from perflow_video.errors import ConfigError, PathNotFoundError
from perflow_video.generation import read_prompts, slug
from perflow_video.generation.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent
NOISE = ("[transformers]",)
FRAMES, SIZE = 4, 32  # the fixture run's model.num_frames and model.resolution (tiny-teacher's 32 px)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Offline, with a tiny-model cache shared by the training run and every generation in this module."""
    with offline_tiny_env(tmp_path_factory.mktemp("generate")) as environment:
        yield environment


@pytest.fixture(scope="module")
def run_dir(env, tmp_path_factory) -> Path:
    """A finished training run: 2 steps of the tiny config (tiny-teacher) on 4-frame clips (~15 s)."""
    out = tmp_path_factory.mktemp("run") / "run"
    cmd = [
        sys.executable, str(REPO / "scripts" / "train_animatediff.py"), "--output_dir", str(out),
        "--max_train_steps", "2", "run.validation_prompts=[]", "run.eval_steps=0", "model.num_frames=4",
        "reflow.solver_steps=2", "optim.train_batch_size=1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "train_summary.json").is_file()
    return out


def generate(run_dir: Path, *args: str) -> int:
    return main(["--run", str(run_dir), "--device", "cpu", *args])


def mp4_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def gif_frames(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(image)])


def evaluations(out: str) -> list[int]:
    return [int(line.split("(")[1].split()[0]) for line in out.splitlines() if line.startswith("wrote ")]


def test_mp4_and_gif_files(run_dir, tmp_path, capsys):
    assert generate(run_dir, "--prompt", "a red circle moving left", "--output", str(tmp_path / "c.mp4")) == 0
    assert generate(run_dir, "--prompt", "a red circle moving left", "--output", str(tmp_path / "c.gif")) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'c.mp4'}" in out and "UNet evaluations" in out and " s)" in out
    video, gif = mp4_frames(tmp_path / "c.mp4"), gif_frames(tmp_path / "c.gif")
    assert video.shape == gif.shape == (FRAMES, SIZE, SIZE, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.gif", "c.mp4"]  # no temporary files left
    # the same clip in both formats (MP4 is lossy, the GIF palettized)
    assert np.abs(video.astype(int) - gif.astype(int)).mean() < 20


def test_folder_mode_seeds_and_evaluations(run_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# toy prompts\n\na blue square moving up\n   \na red circle, moving left!\n")
    out_dir = tmp_path / "clips"
    args = [
        "--prompt",
        "a green star",
        "--prompts",
        str(prompts),
        "--output",
        str(out_dir),
        "--format",
        "gif",
    ]
    assert generate(run_dir, *args, "--seed", "7") == 0
    assert evaluations(capsys.readouterr().out) == [4, 4, 4]  # CFG 1: one per step
    names = ["00_a_green_star.gif", "01_a_blue_square_moving_up.gif", "02_a_red_circle_moving_left.gif"]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([*names, "clips.json"])
    listed = json.loads((out_dir / "clips.json").read_text())["clips"]
    assert [c["file"] for c in listed] == names
    assert [c["prompt"] for c in listed] == [
        "a green star",
        "a blue square moving up",
        "a red circle, moving left!",
    ]
    assert [c["seed"] for c in listed] == [7, 8, 9]
    assert {(c["steps"], c["guidance_scale"], c["model"]) for c in listed} == {(4, 1.0, str(run_dir))}
    first = gif_frames(out_dir / names[0])
    assert first.shape == (FRAMES, SIZE, SIZE, 3)

    # the same seed again: identical frames; another seed: different ones
    again = tmp_path / "again.gif"
    assert generate(run_dir, "--prompt", "a green star", "--seed", "7", "--output", str(again)) == 0
    assert np.array_equal(gif_frames(again), first)
    other = tmp_path / "other.gif"
    assert generate(run_dir, "--prompt", "a green star", "--seed", "8", "--output", str(other)) == 0
    assert not np.array_equal(gif_frames(other), first)
    capsys.readouterr()

    # CFG > 1: two noise predictions per step; --steps changes the count
    cfg = ["--guidance_scale", "3", "--negative_prompt", "blurry", "--steps", "2"]
    assert generate(run_dir, "--prompt", "a green star", *cfg, "--output", str(tmp_path / "cfg.mp4")) == 0
    assert evaluations(capsys.readouterr().out) == [4]


def test_prompts_file_rules(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("  first  \n# a comment\n\nsecond\n")
    assert read_prompts(path) == ["first", "second"]
    path.write_text("\n   \n# only comments\n")
    with pytest.raises(ConfigError, match=str(path)):
        read_prompts(path)
    with pytest.raises(PathNotFoundError, match="missing.txt"):
        read_prompts(tmp_path / "missing.txt")
    assert slug("A cat, on the moon!") == "A_cat_on_the_moon" and slug("!!") == "empty"


def test_user_errors_in_process(run_dir, tmp_path, capsys):
    assert generate(run_dir, "--prompt", "x", "--num_frames", "33", "--output", str(tmp_path / "x.gif")) == 2
    user_error(capsys, "--num_frames 33", "32")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert generate(run_dir, "--prompts", str(empty), "--output", str(tmp_path)) == 2
    user_error(capsys, str(empty))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert generate(run_dir, "--prompt", "x", "--output", str(blocker / "sub")) == 2
    user_error(capsys, "--output", str(blocker / "sub"))
    assert generate(run_dir, "--prompt", "a", "--prompt", "b", "--output", str(tmp_path / "one.mp4")) == 2
    user_error(capsys, "--output")
    assert not list(tmp_path.glob("*.gif")) and not list(tmp_path.glob("*.mp4"))


def test_missing_run_exits_2_without_traceback(env, tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "generate.py"),
        "--run",
        str(tmp_path / "nope"),
        "--prompt",
        "x",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if not line.startswith(NOISE)]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert lines == [f"error: --run {tmp_path / 'nope'}: no such folder (give a training output folder)"]
    assert list(tmp_path.iterdir()) == []  # nothing written (not even the default output folder)


def test_help_explains_every_flag():
    parser = build_parser()
    flags = {a.option_strings[0] for a in parser._actions if a.option_strings} - {"-h"}
    assert {"--prompt", "--prompts", "--negative_prompt", "--steps", "--guidance_scale", "--num_frames",
            "--height", "--width", "--seed", "--fps", "--output", "--format", "--run", "--device", "--dtype",
            "--base", "--motion_adapter", "--delta", "--delta_scale", "--video", "--strength",
            "--context_length", "--context_stride", "--attention", "--cpu_offload", "--vae_slicing",
            "--vae_tiling"} <= flags  # fmt: skip
    assert all(a.help for a in parser._actions)
    text = parser.format_help()
    assert all(flag in text for flag in flags)
    # what strength does to the number of PeRFlow steps, and when FreeNoise is needed
    assert "int(steps x S)" in text and "1000 750 500 250" in text and "750 500 250" in text
    assert "FreeNoise" in text and "motion_max_seq_length" in text


def test_tiny_default_without_a_run(env, tmp_path, monkeypatch, capsys):
    """No model flags and no outputs/tiny-animatediff: the trained tiny teacher, said so."""
    monkeypatch.chdir(tmp_path)
    args = [
        "--prompt",
        "a red circle",
        "--num_frames",
        "2",
        "--steps",
        "1",
        "--output",
        "t.gif",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "trained tiny teacher (tiny-teacher" in out and "1 UNet evaluations" in out
    assert gif_frames(tmp_path / "t.gif").shape == (2, 32, 32, 3)


def test_base_plus_delta_is_the_run(run_dir, tmp_path, capsys):
    """--base tiny-teacher --delta <run>/delta_weights.safetensors samples the run's student: the same clip."""
    delta = run_dir / "delta_weights.safetensors"
    from_run, from_delta = tmp_path / "run.gif", tmp_path / "delta.gif"
    assert generate(run_dir, "--prompt", "a green star", "--output", str(from_run)) == 0
    args = ["--base", "tiny-teacher", "--delta", str(delta), "--prompt", "a green star", "--device", "cpu"]
    assert main([*args, "--output", str(from_delta)]) == 0
    assert "1 x ΔW" in capsys.readouterr().out
    # teacher + (student - teacher) is the student up to float32 rounding
    diff = np.abs(gif_frames(from_delta).astype(int) - gif_frames(from_run).astype(int))
    assert diff.mean() < 1.0, diff.mean()
    assert generate(run_dir, "--delta", str(delta), "--prompt", "x", "--output", str(tmp_path / "no")) == 2
    user_error(capsys, "--run", "--delta")
    assert not (tmp_path / "no").exists()  # checked before anything is written
    assert (
        main(["--delta", str(tmp_path / "nope.safetensors"), "--prompt", "x", "--output", str(tmp_path)]) == 2
    )
    user_error(capsys, "--delta", "nope.safetensors")


def test_tiny_default_uses_the_finished_tiny_run(run_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "tiny-animatediff").symlink_to(run_dir)
    monkeypatch.chdir(tmp_path)
    assert main(["--prompt", "a red circle", "--output", "t.mp4", "--device", "cpu"]) == 0
    assert "using the finished tiny run in outputs/tiny-animatediff" in capsys.readouterr().out
    assert mp4_frames(tmp_path / "t.mp4").shape == (FRAMES, SIZE, SIZE, 3)
