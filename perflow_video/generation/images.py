"""Sample images from an image-family student (sd15, sd21, sdxl) and write them as PNG files.

The pipeline is the family's own diffusers one (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``)
around the student UNet with our PeRFlowScheduler (:mod:`perflow_video.generation.pipeline_setup`). Each
image is written under a temporary name in its destination folder and renamed when complete, so a crash
never leaves a half-written file; a folder output also gets ``images.json`` (prompt, seed, steps, guidance,
size, model, file, UNet evaluations and seconds of each image, in prompt order), rewritten the same way
after every image. The video-only flags are user errors here (:func:`check_image_request`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from perflow_video.atomic_files import atomic_destination
from perflow_video.errors import ConfigError
from perflow_video.generation.clip_request import IMAGE_FORMATS, ClipRequest
from perflow_video.generation.model_source import VIDEO_FAMILIES, LoadedModel
from perflow_video.generation.outputs import (
    EvaluationCounter,
    is_file_output,
    listed_name,
    pixel_size,
    sample_path,
    write_listing,
)
from perflow_video.generation.pipeline_setup import pipeline_for
from perflow_video.generation.prompts import slug

IMAGES_JSON = "images.json"


@dataclass
class GeneratedImage:
    """One written image, as listed in images.json."""

    prompt: str
    seed: int
    steps: int
    guidance_scale: float
    negative_prompt: str | None
    height: int
    width: int
    model: str
    file: str
    unet_evaluations: int = field(default=0)
    seconds: float = field(default=0.0)


def _video_only_flags(request: ClipRequest) -> list[str]:
    """The flags of ``request`` that only a video family takes, as the user wrote them."""
    given = [
        ("--num_frames", request.num_frames), ("--fps", request.fps), ("--video", request.video),
        ("--strength", request.strength), ("--context_length", request.context_length),
        ("--context_stride", request.context_stride),
    ]  # fmt: skip
    return [f"{flag} {value}" for flag, value in given if value is not None]


def check_image_request(request: ClipRequest, family: str) -> None:
    """What an image family (``family``) cannot do: the video-only flags, and clip formats for --format or
    --output. Raises ConfigError naming the flag."""
    video_only = _video_only_flags(request)
    if video_only:
        raise ConfigError(
            f"{video_only[0]}: {family} is an image family and samples single images; the flag is for video "
            f"families ({', '.join(VIDEO_FAMILIES)}): leave it out"
        )
    if request.video_format is not None and request.video_format not in IMAGE_FORMATS:
        raise ConfigError(
            f"--format {request.video_format}: {family} is an image family and writes PNG images; "
            "give --format png or leave the flag out"
        )
    if is_file_output(request.output) and request.output.suffix.lower() != ".png":
        raise ConfigError(
            f"--output {request.output}: {family} is an image family and writes PNG images; give a .png "
            "file or a folder"
        )


def _write_png(image, path: Path) -> None:
    """Atomically: save under a temporary name in ``path``'s folder, then rename over ``path``."""
    with atomic_destination(path) as tmp:
        image.save(tmp, format="PNG")


def _sample_one(request, loaded, pipe, size, counter, i, report) -> GeneratedImage:
    prompt, seed = request.prompts[i], request.seed + i
    path = sample_path(request, i, slug(prompt), request.output_format("images"))
    height, width = size
    counter.count = 0
    start = time.perf_counter()
    image = pipe(
        prompt=prompt, negative_prompt=request.negative_prompt, height=height, width=width,
        num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
        generator=torch.Generator(device="cpu").manual_seed(seed), output_type="pil",
    ).images[0]  # fmt: skip
    seconds = time.perf_counter() - start
    _write_png(image, path)
    report(f"wrote {path} ({counter.count} UNet evaluations, {seconds:.2f} s)")
    return GeneratedImage(
        prompt, seed, request.steps, request.guidance_scale, request.negative_prompt, height, width,
        loaded.description, listed_name(request, path), counter.count, round(seconds, 3),
    )  # fmt: skip


@torch.no_grad()
def sample_images(
    request: ClipRequest, loaded: LoadedModel, report: Callable[[str], None] = print
) -> list[GeneratedImage]:
    """One PNG per prompt (prompt ``i`` with seed ``seed + i``) from an image family; call it through
    :func:`perflow_video.generation.clips.generate`, which checks the request first."""
    size = pixel_size(request, loaded)
    with pipeline_for(request, loaded) as pipe:
        counter = EvaluationCounter(pipe.unet)
        try:
            images: list[GeneratedImage] = []
            for i in range(len(request.prompts)):
                images.append(_sample_one(request, loaded, pipe, size, counter, i, report))
                # after every image: an interrupted batch lists the images it wrote
                if not is_file_output(request.output):
                    write_listing(images, request.output / IMAGES_JSON, "images")
            return images
        finally:
            counter.remove()


__all__ = ["IMAGES_JSON", "GeneratedImage", "check_image_request", "sample_images"]
