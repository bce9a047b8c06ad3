"""scripts/generate.py on the image families: real (2-step) tiny SD1.5 and SDXL runs sampled through
diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` with the PeRFlowScheduler.

PNG files and folders (``NN_<slug>.png`` + images.json) at the run's resolution, seeds, UNet evaluation
counts with and without CFG, base + ΔW against the run, the tiny default of an image family, and the user
errors: video-only flags with an image family, PNG with a video family (one ``error:`` line, exit 2,
nothing written).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import offline_tiny_env, user_error
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from perflow_video.generation import GeneratedImage, generate, load_run
from perflow_video.generation.cli import build_parser, main
from perflow_video.generation.clips import ClipRequest
from perflow_video.generation.pipeline_setup import pipeline_for
from perflow_video.scheduler import PeRFlowScheduler

REPO = Path(__file__).resolve().parent.parent
#: The fixture runs' model.resolution (configs/tiny/<family>.yaml), pipeline class and parameterization.
FAMILIES = {
    "sd15": (64, StableDiffusionPipeline, "diff_eps"),
    "sdxl": (128, StableDiffusionXLPipeline, "ddim_eps"),
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Offline, one thread, a tiny-model cache shared by the training runs and every generation here."""
    with offline_tiny_env(tmp_path_factory.mktemp("generate_images")) as environment:
        yield environment


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def run_dir(env, family, tmp_path_factory) -> Path:
    """A finished training run of the tiny ``family``: 2 steps, no samples, evaluation or extra ΔW files."""
    out = tmp_path_factory.mktemp(f"run-{family}") / "run"
    cmd = [
        sys.executable, str(REPO / "scripts" / "train_image.py"), "--model", family, "--tiny",
        "--output_dir", str(out), "--max_train_steps", "2", "run.validation_prompts=[]", "run.eval_steps=0",
        "reflow.solver_steps=2", "run.export_formats=[]", "run.report_to=none",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "train_summary.json").is_file() and (out / "student" / "unet").is_dir()
    return out


def generate_cli(*args: str) -> int:
    return main([*args, "--device", "cpu"])


def png(path: Path) -> np.ndarray:
    """The pixels of a PNG file, after checking it is one (signature, PIL's own verification, RGB)."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image)


def evaluations(out: str) -> list[int]:
    return [int(line.split("(")[1].split()[0]) for line in out.splitlines() if line.startswith("wrote ")]


def test_png_file_at_the_runs_resolution(run_dir, family, tmp_path, capsys):
    size = FAMILIES[family][0]
    out = tmp_path / "red.png"
    assert generate_cli("--run", str(run_dir), "--prompt", "a red circle", "--output", str(out)) == 0
    printed = capsys.readouterr().out
    assert f"({family})" in printed and f"wrote {out} (4 UNet evaluations" in printed
    assert "done: 1 image(s), 4 UNet evaluations" in printed
    assert png(out).shape == (size, size, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["red.png"]  # no temporary file left, no listing

    # --height / --width (multiples of the VAE's factor) change the size
    wide = tmp_path / "wide.png"
    size_flags = ["--height", str(size // 2), "--width", str(size)]
    assert generate_cli("--run", str(run_dir), "--prompt", "x", *size_flags, "--output", str(wide)) == 0
    assert png(wide).shape == (size // 2, size, 3)


def test_folder_listing_seeds_and_evaluations(run_dir, family, tmp_path, capsys):
    size = FAMILIES[family][0]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# toy prompts\na blue square\n\na red circle, left!\n")
    out_dir = tmp_path / "images"
    args = ["--run", str(run_dir), "--prompt", "a green star", "--prompts", str(prompts), "--seed", "7"]
    assert generate_cli(*args, "--output", str(out_dir), "--format", "png") == 0
    assert evaluations(capsys.readouterr().out) == [4, 4, 4]  # no CFG: one UNet evaluation per step
    names = ["00_a_green_star.png", "01_a_blue_square.png", "02_a_red_circle_left.png"]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([*names, "images.json"])
    listed = json.loads((out_dir / "images.json").read_text())["images"]
    assert [(c["file"], c["seed"]) for c in listed] == list(zip(names, [7, 8, 9], strict=True))
    assert [c["prompt"] for c in listed] == ["a green star", "a blue square", "a red circle, left!"]
    assert {(c["steps"], c["guidance_scale"], c["model"], c["height"], c["width"]) for c in listed} == {
        (4, 1.0, str(run_dir), size, size)
    }
    assert [c["unet_evaluations"] for c in listed] == [4, 4, 4]
    first = png(out_dir / names[0])
    assert all(png(out_dir / n).shape == (size, size, 3) for n in names)

    # the same prompt and seed again: the same pixels; another seed: others
    again, other = tmp_path / "again.png", tmp_path / "other.png"
    assert (
        generate_cli("--run", str(run_dir), "--prompt", "a green star", "--seed", "7", "--output", str(again))
        == 0
    )
    assert (
        generate_cli("--run", str(run_dir), "--prompt", "a green star", "--seed", "8", "--output", str(other))
        == 0
    )
    assert np.array_equal(png(again), first) and not np.array_equal(png(other), first)
    capsys.readouterr()

    # CFG: two noise predictions per step
    cfg = ["--guidance_scale", "3", "--negative_prompt", "blurry"]
    assert (
        generate_cli("--run", str(run_dir), "--prompt", "x", *cfg, "--output", str(tmp_path / "cfg.png")) == 0
    )
    printed = capsys.readouterr().out
    assert evaluations(printed) == [8] and "done: 1 image(s), 8 UNet evaluations" in printed


def test_library_call_uses_the_familys_diffusers_pipeline(run_dir, family, tmp_path):
    """generate() on load_run(): the family's diffusers pipeline with the run's PeRFlowScheduler, PNGs out."""
    size, pipeline_class, parameterization = FAMILIES[family]
    loaded = load_run(run_dir)
    assert not loaded.is_video and loaded.num_frames is None and loaded.resolution == size
    assert isinstance(loaded.scheduler, PeRFlowScheduler)
    assert loaded.scheduler.config.prediction_type == parameterization
    request = ClipRequest(prompts=["a red circle"], output=tmp_path / "lib.png")
    with pipeline_for(request, loaded) as pipe:
        assert (
            type(pipe) is pipeline_class
            and pipe.scheduler is loaded.scheduler
            and pipe.unet is loaded.student
        )
    lines: list[str] = []
    (image,) = generate(request, loaded, report=lines.append)
    assert isinstance(image, GeneratedImage) and image.file == str(tmp_path / "lib.png")
    assert (image.height, image.width, image.unet_evaluations) == (size, size, 4)
    assert png(tmp_path / "lib.png").shape == (size, size, 3) and lines[0].startswith("wrote ")


def test_base_plus_delta_is_the_run(run_dir, family, tmp_path, capsys):
    """--base tiny --delta <run>/delta_weights.safetensors: family, resolution and scheduler from the ΔW's
    metadata, and the same image as the run from the same seed."""
    delta = run_dir / "delta_weights.safetensors"
    from_run, from_delta = tmp_path / "run.png", tmp_path / "delta.png"
    assert (
        generate_cli(
            "--run", str(run_dir), "--prompt", "a green star", "--seed", "3", "--output", str(from_run)
        )
        == 0
    )
    capsys.readouterr()
    args = ["--base", "tiny", "--delta", str(delta), "--prompt", "a green star", "--seed", "3"]
    assert generate_cli(*args, "--output", str(from_delta)) == 0
    printed = capsys.readouterr().out
    assert f"1 x ΔW {delta} ({family})" in printed and "(4 UNet evaluations" in printed
    # teacher + (student - teacher) is the student up to float32 rounding
    diff = np.abs(png(from_delta).astype(int) - png(from_run).astype(int))
    assert diff.shape == (FAMILIES[family][0],) * 2 + (3,) and diff.max() <= 2 and diff.mean() < 0.05, (
        diff.mean()
    )

    # --family naming another family than the ΔW's own is an error, before anything is written
    other = "sdxl" if family == "sd15" else "sd15"
    assert generate_cli(*args, "--family", other, "--output", str(tmp_path / "no" / "x.png")) == 2
    user_error(capsys, f"--family {other}", str(delta), f"trained on {family}")
    assert not (tmp_path / "no").exists()


def test_tiny_default_of_an_image_family(env, family, tmp_path, monkeypatch, capsys):
    """--family alone, no outputs/tiny-<family> here: the untrained tiny teacher at its pipeline's size."""
    monkeypatch.chdir(tmp_path)
    assert (
        generate_cli("--family", family, "--prompt", "a red circle", "--steps", "2", "--output", "t.png") == 0
    )
    printed = capsys.readouterr().out
    assert f"no finished run in outputs/tiny-{family}" in printed and "untrained tiny teacher" in printed
    assert "(2 UNet evaluations" in printed
    size = FAMILIES[family][0]
    assert png(tmp_path / "t.png").shape == (size, size, 3)


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--num_frames", "4"], ["--num_frames 4", "image family"]),
        (["--fps", "12"], ["--fps 12", "image family"]),
        (["--video", "in.mp4"], ["--video in.mp4", "image family"]),
        (["--strength", "0.5"], ["--strength 0.5", "image family"]),
        (["--context_length", "8"], ["--context_length 8", "image family"]),
        (["--context_stride", "4"], ["--context_stride 4", "image family"]),
        (["--format", "gif"], ["--format gif", "PNG"]),
        (["--format", "mp4"], ["--format mp4", "PNG"]),
        (["--output", "{tmp}/clip.mp4"], ["--output", "clip.mp4", ".png file or a folder"]),
        (["--motion_adapter", "tiny"], ["--run", "--motion_adapter"]),
        (["--family", "sd15"], ["--run", "--family"]),
    ],
)
def test_video_only_flags_with_an_image_family(run_dir, family, tmp_path, capsys, flags, needles):
    args = [f.format(tmp=tmp_path) for f in flags]
    out = ["--output", str(tmp_path / "out" / "x.png")] if "--output" not in args else []
    assert generate_cli("--run", str(run_dir), "--prompt", "x", *args, *out) == 2
    line = user_error(capsys, *needles)
    if "image family" in needles:
        assert family in line
    assert list(tmp_path.iterdir()) == []  # refused before the output folder is made


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--family", "sd15", "--motion_adapter", "tiny"], ["--motion_adapter tiny", "image family"]),
        (["--family", "animatediff", "--format", "png"], ["--format png", "animatediff writes clips"]),
        (["--family", "animatediff", "--output", "{tmp}/x.png"], ["--output", "x.png", ".gif or .mp4"]),
    ],
)
def test_family_mismatches_with_a_base_model(env, tmp_path, capsys, flags, needles):
    args = [f.format(tmp=tmp_path) for f in flags]
    out = ["--output", str(tmp_path / "out")] if "--output" not in args else []
    assert generate_cli("--base", "tiny", "--prompt", "x", *args, *out) == 2
    user_error(capsys, *needles)
    assert list(tmp_path.iterdir()) == []


def test_help_explains_the_image_families():
    parser = build_parser()
    family_action = next(a for a in parser._actions if "--family" in a.option_strings)
    assert set(family_action.choices) == {"animatediff", "sd15", "sd21", "sdxl"} and family_action.help
    text = parser.format_help()
    assert "images.json" in text and "StableDiffusionXLPipeline" in text and ".png" in text
    assert "outputs/tiny-<family>" in text and "video-only flags" in text
