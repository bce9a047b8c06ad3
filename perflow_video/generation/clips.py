"""Sample clips with the family's diffusers pipeline and write them atomically (plus ``clips.json``);
:func:`generate` is the entry point of every family: an image family's request goes to
:mod:`perflow_video.generation.images` (PNG files, ``images.json``).

Text-to-video uses ``AnimateDiffPipeline``; with ``video`` set, diffusers' ``AnimateDiffVideoToVideoPipeline``
built from the same components re-noises the input clip to the first timestep ``strength`` keeps and runs
the remaining PeRFlow steps (:mod:`perflow_video.generation.pipeline_setup`, the scheduler's docstring).

Each clip is written under a temporary name in its destination folder and renamed when complete, so a
crash never leaves a half-written clip; ``clips.json`` likewise. Sampling is counted in UNet evaluations
(noise predictions per clip: the pipeline's CFG batch of two counts twice) and seconds.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from perflow_video.atomic_files import atomic_destination
from perflow_video.errors import ConfigError
from perflow_video.generation.clip_request import ClipRequest
from perflow_video.generation.images import GeneratedImage, check_image_request, sample_images
from perflow_video.generation.input_video import input_frame_count, probe_input_video, read_input_video
from perflow_video.generation.model_source import DEFAULT_FAMILY, LoadedModel, family_named
from perflow_video.generation.outputs import (
    EvaluationCounter,
    check_common,
    check_placement,
    check_writable,
    is_file_output,
    listed_name,
    pixel_size,
    sample_path,
    write_listing,
)
from perflow_video.generation.pipeline_setup import pipeline_for
from perflow_video.generation.prompts import slug
from perflow_video.media.video_decode import VideoInfo
from perflow_video.media.video_export import CLIP_FORMATS, export_video

CLIPS_JSON = "clips.json"


@dataclass
class ClipShape:
    """Frames and pixel size of every clip of a request."""

    num_frames: int
    height: int
    width: int


@dataclass
class GeneratedClip:
    """One written clip, as listed in clips.json."""

    prompt: str
    seed: int
    steps: int
    guidance_scale: float
    negative_prompt: str | None
    num_frames: int
    height: int
    width: int
    fps: float
    model: str
    file: str
    unet_evaluations: int = field(default=0)
    seconds: float = field(default=0.0)
    video: str | None = None
    strength: float | None = None
    context_length: int | None = None
    context_stride: int | None = None


def check_request(request: ClipRequest, family: str = DEFAULT_FAMILY) -> None:
    """Mistakes that need no model, for a model of ``family`` (its name): raise ConfigError naming the flag.

    Creates the output folder (the last check: it takes files).
    """
    check_common(request)
    if family_named(family, "--family").data_kind == "images":
        check_image_request(request, family)
    else:
        check_clip_request(request, family)
    check_placement(request)


def check_clip_request(request: ClipRequest, family: str) -> None:
    """The checks of a video family's request: frames, frame rate, clip formats, video-to-video, FreeNoise."""
    if request.num_frames is not None and request.num_frames < 1:
        raise ConfigError(f"--num_frames {request.num_frames}: need at least 1")
    fps = request.effective_fps
    if not fps > 0:
        raise ConfigError(f"--fps {fps}: need a positive frame rate")
    clip_format = request.output_format("clips")
    if clip_format not in CLIP_FORMATS:
        raise ConfigError(f"--format {clip_format}: {family} writes clips; choose one of {CLIP_FORMATS}")
    if is_file_output(request.output):
        clip_format = request.output.suffix.lower().lstrip(".")
        if clip_format not in CLIP_FORMATS:
            raise ConfigError(
                f"--output {request.output}: {family} writes clips; give a .gif or .mp4 file or a folder"
            )
    if clip_format == "gif" and fps > 50:
        raise ConfigError(f"--fps {fps}: a GIF plays at most 50 fps")
    check_video_options(request)
    check_free_noise_options(request)


def check_video_options(request: ClipRequest) -> None:
    """--video / --strength: the file decodes, and the strength keeps at least one step."""
    if request.video is None:
        if request.strength is not None:
            raise ConfigError(f"--strength {request.strength}: goes with --video IN.mp4 (video-to-video)")
        return
    strength = request.effective_strength
    if not 0.0 < strength <= 1.0:
        raise ConfigError(f"--strength {strength}: need 0 < strength <= 1 (1 = re-noise the input fully)")
    # AnimateDiffVideoToVideoPipeline.get_timesteps keeps the last min(int(steps * strength), steps) steps
    if min(int(request.steps * strength), request.steps) < 1:
        raise ConfigError(
            f"--strength {strength}: with --steps {request.steps} no step would run (video-to-video runs the "
            f"last int(steps x strength) steps); give --strength {math.ceil(1e4 / request.steps) / 1e4:g} "
            "or more, or more --steps"
        )
    info = probe_input_video(request.video)
    if request.num_frames is not None:
        input_frame_count(info, request.num_frames, request.num_frames)


def check_free_noise_options(request: ClipRequest) -> None:
    """--context_length / --context_stride on their own (against the model: :func:`check_frames`)."""
    length, stride = request.context_length, request.context_stride
    if length is None:
        if stride is not None:
            raise ConfigError(f"--context_stride {stride}: goes with --context_length N (FreeNoise)")
        return
    if length < 1:
        raise ConfigError(f"--context_length {length}: need at least 1 frame")
    if stride is not None and not 1 <= stride <= length:
        raise ConfigError(
            f"--context_stride {stride}: need 1 <= stride <= --context_length {length} "
            "(a larger stride leaves frames outside every window)"
        )


def check_frames(request: ClipRequest, loaded: LoadedModel, frames: int) -> None:
    """The clip length fits the motion modules, or FreeNoise is on with windows that fit both."""
    limit = loaded.max_frames
    suggested = min(loaded.num_frames, limit)
    length = request.context_length
    if length is None:
        if frames > limit:
            raise ConfigError(
                f"--num_frames {frames}: the motion modules have {limit} frame positions "
                f"(motion_max_seq_length); give --num_frames {limit} or fewer, or add --context_length "
                f"{suggested} for a longer clip (FreeNoise: sliding windows of that many frames)"
            )
        return
    if length > limit:
        raise ConfigError(
            f"--context_length {length}: the motion modules have {limit} frame positions; give at most "
            f"{limit} (best: {suggested}, the clip length the model samples by default)"
        )
    if length > frames:
        raise ConfigError(
            f"--context_length {length}: longer than the clip ({frames} frames); give at most {frames}"
        )


def clip_shape(request: ClipRequest, loaded: LoadedModel, video: VideoInfo | None) -> ClipShape:
    """Frames (from --num_frames, the input video or the model) and pixel size, checked against the model."""
    if video is None:
        frames = request.num_frames or loaded.num_frames
    else:
        frames = input_frame_count(video, request.num_frames, loaded.num_frames)
    check_frames(request, loaded, frames)
    return ClipShape(frames, *pixel_size(request, loaded))


def _write_clip(frames: torch.Tensor, path: Path, fps: float) -> None:
    """Atomically: encode under a temporary name in ``path``'s folder, then rename over ``path``."""
    with atomic_destination(path) as tmp:
        staged = tmp + path.suffix.lower()  # the encoder picks the container from the extension
        try:
            export_video(frames, staged, fps=fps)
            os.replace(staged, tmp)
        finally:
            if os.path.exists(staged):
                os.remove(staged)


def write_clips_json(clips: list[GeneratedClip], path: Path) -> None:
    write_listing(clips, path, "clips")


@torch.no_grad()
def generate(
    request: ClipRequest, loaded: LoadedModel, report: Callable[[str], None] = print
) -> list[GeneratedClip] | list[GeneratedImage]:
    """Sample one clip (video family) or PNG image (image family) per prompt, prompt ``i`` with seed
    ``seed + i``, and write it; returns what was written.

    Folder outputs also get ``clips.json`` / ``images.json`` (prompt order). ``report`` receives one line
    per sample (and, for video-to-video, one line saying which steps run).
    """
    check_request(request, loaded.family.name)
    if not loaded.is_video:
        return sample_images(request, loaded, report)
    return _generate_clips(request, loaded, report)


def _generate_clips(request: ClipRequest, loaded: LoadedModel, report: Callable[[str], None]):
    info = probe_input_video(request.video) if request.video is not None else None
    shape = clip_shape(request, loaded, info)
    with pipeline_for(request, loaded) as pipe:
        video = None
        if info is not None:
            video = read_input_video(info, shape.num_frames, shape.height, shape.width)
            report(describe_video_to_video(pipe, request))
        counter = EvaluationCounter(pipe.unet)
        try:
            clips: list[GeneratedClip] = []
            for i in range(len(request.prompts)):
                clips.append(_sample_one(request, loaded, pipe, shape, video, counter, i, report))
                # after every clip: an interrupted batch lists its clips
                if not is_file_output(request.output):
                    write_clips_json(clips, request.output / CLIPS_JSON)
            return clips
        finally:
            counter.remove()


def video_to_video_timesteps(pipe, steps: int, strength: float) -> list[int]:
    """The timesteps ``AnimateDiffVideoToVideoPipeline`` runs: ``set_timesteps(steps)``, then its own
    ``get_timesteps`` slice by strength (the first is where the input is noised)."""
    pipe.scheduler.set_timesteps(steps)
    kept, _ = pipe.get_timesteps(steps, pipe.scheduler.timesteps, strength, "cpu")
    return [int(t) for t in kept]


def describe_video_to_video(pipe, request: ClipRequest) -> str:
    kept = video_to_video_timesteps(pipe, request.steps, request.effective_strength)
    return (
        f"video-to-video from {request.video}: strength {request.effective_strength:g} runs {len(kept)} of "
        f"{request.steps} steps, timesteps {kept} (the input noised to t = {kept[0] / 1000:g} first)"
    )


def _run_pipeline(pipe, request: ClipRequest, prompt: str, seed: int, shape: ClipShape, video):
    """One clip's frames, (F, C, H, W) in [0, 1]: text-to-video, or video-to-video from ``video``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if video is None:
        output = pipe(
            prompt=prompt, negative_prompt=request.negative_prompt, num_frames=shape.num_frames,
            height=shape.height, width=shape.width, num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale, generator=generator, output_type="pt",
        )  # fmt: skip
    else:
        output = pipe(
            video=video, prompt=prompt, negative_prompt=request.negative_prompt, strength=request.effective_strength,
            height=shape.height, width=shape.width, num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale, generator=generator, output_type="pt",
        )  # fmt: skip
    return output.frames[0].float().cpu()


def _sample_one(request, loaded, pipe, shape, video, counter, i, report) -> GeneratedClip:
    prompt, seed = request.prompts[i], request.seed + i
    path = sample_path(request, i, slug(prompt), request.output_format("clips"))
    counter.count = 0
    start = time.perf_counter()
    frames = _run_pipeline(pipe, request, prompt, seed, shape, video)
    seconds = time.perf_counter() - start
    _write_clip(frames, path, request.effective_fps)
    clip = GeneratedClip(
        prompt, seed, request.steps, request.guidance_scale, request.negative_prompt, shape.num_frames,
        shape.height, shape.width, request.effective_fps, loaded.description, listed_name(request, path),
        counter.count, round(seconds, 3),
        video=os.fspath(request.video) if request.video is not None else None,
        strength=request.effective_strength, context_length=request.context_length,
        context_stride=request.effective_context_stride,
    )  # fmt: skip
    report(f"wrote {path} ({counter.count} UNet evaluations, {seconds:.2f} s)")
    return clip


__all__ = [
    "CLIPS_JSON",
    "ClipRequest",
    "ClipShape",
    "EvaluationCounter",
    "GeneratedClip",
    "GeneratedImage",
    "check_request",
    "check_writable",
    "clip_shape",
    "generate",
    "is_file_output",
    "write_clips_json",
]
