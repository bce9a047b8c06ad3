"""scripts/generate.py beyond text-to-video, on the embedded tiny AnimateDiff (real diffusers models, CPU):

* video-to-video (``--video``, ``--strength``) through diffusers' ``AnimateDiffVideoToVideoPipeline``;
* long clips with diffusers' FreeNoise (``--context_length``, ``--context_stride``);
* the GPU-user flags (``--attention``, ``--cpu_offload``, ``--vae_slicing``, ``--vae_tiling``, ``--dtype``)
  and how they behave on a machine without CUDA;
* the user errors: one ``error:`` line naming the flag or the file, exit status 2, nothing written.

The scheduler side of video-to-video (timesteps kept by strength, ``add_noise`` against a hand computation)
is tested in tests/test_scheduler.py and tests/test_scheduler_pipelines.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import offline_tiny_env, user_error
from diffusers import AnimateDiffVideoToVideoPipeline
from diffusers.models.attention import FreeNoiseTransformerBlock
from diffusers.models.attention_processor import AttnProcessor2_0

from perflow_video.families.attention import xformers_available
from perflow_video.generation.cli import build_parser, main
from perflow_video.generation.clips import ClipRequest
from perflow_video.generation.model_source import load_tiny_teacher
from perflow_video.generation.pipeline_setup import motion_adapter_of, pipeline_for
from perflow_video.media.video_export import export_video

IN_FRAMES, IN_H, IN_W = 6, 72, 96  # the input clip: not square, not the model's size
SIZE = 32  # the tiny default's frames (the trained tiny-teacher: 32 x 32 px)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Offline, one thread, a tiny-model cache shared by the module (as tests/test_generate.py)."""
    with offline_tiny_env(tmp_path_factory.mktemp("generate_v2v")) as environment:
        yield environment


@pytest.fixture
def workdir(env, tmp_path, monkeypatch) -> Path:
    """An empty working directory: no outputs/tiny-animatediff there, so the tiny default is the teacher."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def input_clip(tmp_path_factory) -> Path:
    """A 6-frame 96 x 72 MP4 of a bright square moving right on a gradient."""
    frames = np.zeros((IN_FRAMES, IN_H, IN_W, 3), dtype=np.uint8)
    frames[..., 2] = np.linspace(0, 200, IN_W, dtype=np.uint8)
    for i in range(IN_FRAMES):
        frames[i, 24:48, 8 + 10 * i : 32 + 10 * i] = 255
    path = tmp_path_factory.mktemp("input") / "in.mp4"
    export_video(frames, path, fps=8)
    return path


@pytest.fixture(scope="module")
def tiny(env):
    return load_tiny_teacher()


def run(*args: str) -> int:
    return main([*args, "--device", "cpu"])


def mp4_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


# ---------------------------------------------------------------------------------------------------
# video-to-video
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strength, timesteps",
    [("1", [1000, 750, 500, 250]), (None, [750, 500, 250]), ("0.5", [500, 250])],
)
def test_video_to_video_on_the_tiny_default_writes_the_clip(workdir, input_clip, capsys, strength, timesteps):
    """Strength keeps the last int(4 x strength) of the 4 steps (default 0.75); the clip has the input's
    frames at the model's 32 px; one UNet evaluation per kept step."""
    flags = ["--strength", strength] if strength else []
    out = workdir / "clips"
    assert run("--video", str(input_clip), *flags, "--prompt", "a blue square", "--output", str(out)) == 0
    printed = capsys.readouterr().out
    assert f"runs {len(timesteps)} of 4 steps, timesteps {timesteps}" in printed
    assert f"({len(timesteps)} UNet evaluations" in printed
    clip = out / "00_a_blue_square.mp4"
    assert mp4_frames(clip).shape == (IN_FRAMES, SIZE, SIZE, 3)
    assert sorted(p.name for p in out.iterdir()) == ["00_a_blue_square.mp4", "clips.json"]  # no temp files
    listed = json.loads((out / "clips.json").read_text())["clips"][0]
    assert listed["video"] == os.fspath(input_clip) and listed["num_frames"] == IN_FRAMES
    assert listed["strength"] == (float(strength) if strength else 0.75)
    assert listed["unet_evaluations"] == len(timesteps)


def test_video_to_video_takes_the_first_num_frames_and_depends_on_the_input(workdir, input_clip):
    """--num_frames 4 takes the input's first 4 frames; the same input and seed give the same clip, another
    input (the clip mirrored) another one (the input is far from the teacher's world, so no closeness to it
    is claimed)."""
    mirrored = workdir / "mirrored.mp4"
    export_video(mp4_frames(input_clip)[:, :, ::-1].copy(), mirrored, fps=8)
    args = ["--prompt", "a blue square", "--num_frames", "4", "--strength", "0.5"]
    assert run("--video", str(input_clip), *args, "--output", "a.mp4") == 0
    assert run("--video", str(input_clip), *args, "--output", "b.mp4") == 0
    assert run("--video", str(mirrored), *args, "--output", "m.mp4") == 0
    a, b, m = (mp4_frames(workdir / f"{n}.mp4") for n in "abm")
    assert a.shape == (4, SIZE, SIZE, 3)
    # the clips are compared as decoded MP4: libx264 / swscale sometimes encode the same frames a little
    # differently (seen as a max difference of 24 on one pixel); the pipeline's frames themselves are equal
    same, other = np.abs(a.astype(int) - b).mean(), np.abs(a.astype(int) - m).mean()
    assert same < 1.0 and other > 10.0, (same, other)


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--video", "{missing}"], ["--video", "missing.mp4", "no such file"]),
        (["--video", "{garbage}"], ["--video", "garbage.mp4", "cannot read it as a video"]),
        (["--video", "{clip}", "--strength", "0"], ["--strength 0.0", "0 < strength <= 1"]),
        (["--video", "{clip}", "--strength", "1.5"], ["--strength 1.5", "0 < strength <= 1"]),
        (["--video", "{clip}", "--strength", "0.2"], ["--strength 0.2", "--steps 4", "no step", "0.25"]),
        (["--strength", "0.5"], ["--strength 0.5", "--video"]),
        (["--video", "{clip}", "--num_frames", "9"], ["--num_frames 9", "in.mp4", "only 6 frames"]),
    ],
)
def test_video_to_video_user_errors_before_loading_anything(workdir, input_clip, capsys, flags, needles):
    (workdir / "garbage.mp4").write_bytes(b"not a video " * 50)
    names = {"missing": workdir / "missing.mp4", "garbage": workdir / "garbage.mp4", "clip": input_clip}
    args = [f.format(**names) for f in flags]
    assert run(*args, "--prompt", "x", "--output", str(workdir / "out.mp4")) == 2
    user_error(capsys, *needles)
    assert not (workdir / "out.mp4").exists()


# ---------------------------------------------------------------------------------------------------
# long clips: FreeNoise
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [32, 40])
def test_free_noise_long_clip_on_the_tiny_default(workdir, capsys, frames):
    """32 frames (the tiny motion modules' frame positions) and 40 (beyond them) with FreeNoise windows of
    16 frames every 8: all frames are written, with the 4 PeRFlow steps."""
    args = ["--num_frames", str(frames), "--context_length", "16", "--context_stride", "8"]
    assert run("--prompt", "waves", *args, "--output", "long.mp4") == 0
    assert "(4 UNet evaluations" in capsys.readouterr().out
    assert mp4_frames(workdir / "long.mp4").shape == (frames, SIZE, SIZE, 3)


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--num_frames", "40"], ["--num_frames 40", "32 frame positions", "--context_length"]),
        (["--num_frames", "40", "--context_length", "33"], ["--context_length 33", "32 frame positions"]),
        (["--num_frames", "4", "--context_length", "8"], ["--context_length 8", "4 frames"]),
        (["--context_stride", "4"], ["--context_stride 4", "--context_length"]),
        (["--context_length", "8", "--context_stride", "9"], ["--context_stride 9", "--context_length 8"]),
        (["--context_length", "0"], ["--context_length 0"]),
    ],
)
def test_free_noise_user_errors(workdir, capsys, flags, needles):
    assert run("--prompt", "x", *flags, "--output", "out.mp4") == 2
    user_error(capsys, *needles)
    assert not (workdir / "out.mp4").exists()


def test_motion_adapter_of_shares_the_unets_motion_modules(tiny):
    """What enable_free_noise reads: a MotionAdapter view of the UNet's own motion modules, no copy."""
    adapter = motion_adapter_of(tiny.student)
    assert adapter.config.motion_max_seq_length == tiny.max_frames == 32
    mine = {p.data_ptr() for p in adapter.parameters()}
    theirs = {p.data_ptr() for n, p in tiny.student.named_parameters() if "motion_modules" in n}
    assert mine == theirs and not any(p.is_meta for p in adapter.parameters())


# ---------------------------------------------------------------------------------------------------
# the pipeline a request builds, and the GPU-user flags on CPU
# ---------------------------------------------------------------------------------------------------


def test_pipeline_options_are_applied_and_undone(tiny, input_clip, tmp_path):
    request = ClipRequest(
        prompts=["x"], output=tmp_path / "x.mp4", video=input_clip, strength=0.5, context_length=16,
        context_stride=4, attention="sdpa", vae_slicing=True, vae_tiling=True,
    )  # fmt: skip
    with pipeline_for(request, tiny) as pipe:
        assert isinstance(pipe, AnimateDiffVideoToVideoPipeline)
        assert pipe.unet is tiny.student and pipe.scheduler is tiny.scheduler and pipe.motion_adapter is None
        assert pipe.free_noise_enabled and pipe._free_noise_context_stride == 4
        assert any(isinstance(m, FreeNoiseTransformerBlock) for m in pipe.unet.modules())
        processors = [*pipe.unet.attn_processors.values(), *pipe.vae.attn_processors.values()]
        assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors)
        assert pipe.vae.use_slicing and pipe.vae.use_tiling
    # the shared models sample plainly again
    assert not any(isinstance(m, FreeNoiseTransformerBlock) for m in tiny.student.modules())
    assert not tiny.models.vae.use_slicing and not tiny.models.vae.use_tiling


def test_device_flags_parse():
    args = build_parser().parse_args(
        ["--prompt", "x", "--attention", "sdpa", "--cpu_offload", "--vae_slicing", "--vae_tiling",
         "--dtype", "bf16", "--context_length", "16", "--context_stride", "4", "--video", "in.mp4",
         "--strength", "0.5"]
    )  # fmt: skip
    assert (args.attention, args.cpu_offload, args.vae_slicing, args.vae_tiling, args.dtype) == (
        "sdpa", True, True, True, "bf16",
    )  # fmt: skip
    assert (args.context_length, args.context_stride, args.video, args.strength) == (16, 4, "in.mp4", 0.5)
    plain = build_parser().parse_args(["--prompt", "x"])
    assert plain.attention is None and not (plain.cpu_offload or plain.vae_slicing or plain.vae_tiling)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--prompt", "x", "--attention", "flash"])


def sample(tiny, request: ClipRequest) -> torch.Tensor:
    """One clip's float frames through :func:`pipeline_for` (4 frames, 2 steps, seed 0)."""
    with pipeline_for(request, tiny) as pipe:
        out = pipe(
            prompt="a red circle", num_frames=4, height=SIZE, width=SIZE, num_inference_steps=2,
            guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="pt",
        )  # fmt: skip
    return out.frames[0]


def test_sdpa_and_vae_slicing_tiling_give_the_default_clip(tiny, workdir):
    """diffusers' default attention is SDPA, and slicing / tiling only split the VAE's work: the same frames
    (compared as floats: an MP4 encoder turns a 1e-6 difference into different quantization decisions)."""
    plain = sample(tiny, ClipRequest(prompts=["x"], output=workdir / "x.mp4"))
    for flags in ({"attention": "sdpa"}, {"vae_slicing": True}, {"vae_tiling": True}):
        frames = sample(tiny, ClipRequest(prompts=["x"], output=workdir / "x.mp4", **flags))
        torch.testing.assert_close(frames, plain, rtol=0, atol=1e-5, msg=str(flags))
    args = ["--prompt", "a red circle", "--num_frames", "4", "--steps", "2"]
    assert run(*args, "--attention", "sdpa", "--vae_slicing", "--vae_tiling", "--output", "flags.mp4") == 0
    assert mp4_frames(workdir / "flags.mp4").shape == (4, SIZE, SIZE, 3)


@pytest.mark.skipif(xformers_available() and torch.cuda.is_available(), reason="xformers can run here")
def test_xformers_where_it_cannot_run_is_an_error_naming_the_flag(workdir, capsys):
    assert run("--prompt", "x", "--attention", "xformers", "--output", "x.mp4") == 2
    line = user_error(capsys, "--attention xformers")
    assert ("not installed" in line) if not xformers_available() else ("CUDA" in line)
    assert "model:" not in capsys.readouterr().out and not (workdir / "x.mp4").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cpu_offload_and_cuda_without_a_gpu_are_errors(workdir, capsys):
    """Decided: --cpu_offload is an error off CUDA (nothing to offload to), not a silent no-op."""
    assert run("--prompt", "x", "--cpu_offload", "--output", "x.mp4") == 2
    user_error(capsys, "--cpu_offload", "CUDA", "--device cpu")
    assert main(["--prompt", "x", "--device", "cuda", "--output", "x.mp4"]) == 2
    user_error(capsys, "--device cuda", "no CUDA")
    assert not (workdir / "x.mp4").exists()


def test_dtype_defaults_bf16_on_cuda_fp32_on_cpu():
    from perflow_video.generation.cli import _request

    parse = build_parser().parse_args
    assert _request(parse(["--prompt", "x", "--device", "cpu"])).dtype == "fp32"
    assert _request(parse(["--prompt", "x", "--device", "cuda"])).dtype == "bf16"
    assert _request(parse(["--prompt", "x", "--device", "cpu", "--dtype", "bf16"])).dtype == "bf16"
