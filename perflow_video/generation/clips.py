"""Sample clips with the family's diffusers pipeline and write them atomically (plus ``clips.json``).

Each clip is written under a temporary name in its destination folder and renamed when complete, so a
crash never leaves a half-written clip; ``clips.json`` likewise. Sampling is counted in UNet evaluations
(noise predictions per clip: the pipeline's CFG batch of two counts twice) and seconds.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from perflow_video.atomic_files import atomic_destination
from perflow_video.errors import ConfigError
from perflow_video.generation.model_source import LoadedModel
from perflow_video.generation.prompts import slug
from perflow_video.media.video_export import CLIP_FORMATS, export_video

CLIPS_JSON = "clips.json"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ClipRequest:
    """What to sample (None: the model's default) and where to write it.

    ``output``: a ``.gif`` / ``.mp4`` file (one prompt) or a folder (``NN_<slug>.<video_format>`` per
    prompt + ``clips.json``). Prompt ``i`` uses seed ``seed + i``.
    """

    prompts: list[str]
    output: Path
    negative_prompt: str | None = None
    steps: int = 4
    guidance_scale: float = 1.0
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    seed: int = 0
    fps: float = 8
    video_format: str = "mp4"
    device: str = "cpu"
    dtype: str = "fp32"


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


def is_file_output(output: Path) -> bool:
    return output.suffix.lower().lstrip(".") in CLIP_FORMATS


def check_request(request: ClipRequest) -> None:
    """Mistakes that need no model: raise ConfigError naming the flag."""
    if not request.prompts:
        raise ConfigError("no prompt: give --prompt TEXT (repeatable) or --prompts FILE")
    if request.steps < 1:
        raise ConfigError(f"--steps {request.steps}: need at least 1")
    if request.guidance_scale < 1.0:
        raise ConfigError(f"--guidance_scale {request.guidance_scale}: need >= 1 (1 = no CFG)")
    if request.num_frames is not None and request.num_frames < 1:
        raise ConfigError(f"--num_frames {request.num_frames}: need at least 1")
    if not request.fps > 0:
        raise ConfigError(f"--fps {request.fps}: need a positive frame rate")
    if request.dtype not in DTYPES:
        raise ConfigError(f"--dtype {request.dtype!r}: choose one of {sorted(DTYPES)}")
    if request.video_format not in CLIP_FORMATS:
        raise ConfigError(f"--format {request.video_format!r}: choose one of {CLIP_FORMATS}")
    if is_file_output(request.output):
        if len(request.prompts) != 1:
            raise ConfigError(
                f"--output {request.output} is one clip file, but {len(request.prompts)} prompts were given: "
                "give a folder to --output for several prompts"
            )
        if request.output.suffix.lower() == ".gif" and request.fps > 50:
            raise ConfigError(f"--fps {request.fps}: a GIF plays at most 50 fps")
    elif request.video_format == "gif" and request.fps > 50:
        raise ConfigError(f"--fps {request.fps}: a GIF plays at most 50 fps")
    check_writable(request.output)


def check_writable(output: Path) -> None:
    """The folder clips go to exists (created) and takes files; else ConfigError naming --output."""
    folder = output.parent if is_file_output(output) else output
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".perflow-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"--output {output}: cannot write there ({err.strerror or err})") from err


def _check_against_model(request: ClipRequest, loaded: LoadedModel, pipe) -> tuple[int, int, int]:
    frames = request.num_frames or loaded.num_frames
    if frames > loaded.max_frames:
        raise ConfigError(
            f"--num_frames {frames}: the motion modules have {loaded.max_frames} frame positions "
            f"(motion_max_seq_length); give --num_frames {loaded.max_frames} or fewer "
            "(longer clips need FreeNoise, not supported yet)"
        )
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    height, width = request.height or loaded.resolution, request.width or loaded.resolution
    for flag, value in (("--height", height), ("--width", width)):
        if value < factor or value % factor:
            raise ConfigError(f"{flag} {value}: need a positive multiple of {factor} (the VAE's factor)")
    return frames, height, width


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
    with atomic_destination(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"clips": [asdict(c) for c in clips]}, fh, indent=2)
        fh.write("\n")


class EvaluationCounter:
    """Counts UNet noise predictions: the rows of each forward's batch (a CFG batch of two counts 2)."""

    def __init__(self, unet: torch.nn.Module):
        self.count = 0
        self._handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.count += int(sample.shape[0])

    def remove(self) -> None:
        self._handle.remove()


@torch.no_grad()
def generate(
    request: ClipRequest, loaded: LoadedModel, report: Callable[[str], None] = print
) -> list[GeneratedClip]:
    """Sample one clip per prompt (prompt ``i`` with seed ``seed + i``) and write it; returns the clips.

    Folder outputs also get ``clips.json`` (prompt order). ``report`` receives one line per clip.
    """
    check_request(request)
    dtype = DTYPES[request.dtype]
    pipe = loaded.family.pipeline(loaded.models, loaded.student, loaded.scheduler)
    if dtype != torch.float32:  # cast before moving: a full-precision copy never lands on the device
        pipe.to(dtype=dtype)
    pipe.to(request.device)
    num_frames, height, width = _check_against_model(request, loaded, pipe)
    file_output = is_file_output(request.output)
    clips: list[GeneratedClip] = []
    counter = EvaluationCounter(pipe.unet)
    try:
        for i, prompt in enumerate(request.prompts):
            seed = request.seed + i
            path = (
                request.output
                if file_output
                else request.output / f"{i:02d}_{slug(prompt)}.{request.video_format}"
            )
            counter.count = 0
            start = time.perf_counter()
            output = pipe(
                prompt=prompt,
                negative_prompt=request.negative_prompt,
                num_frames=num_frames,
                height=height,
                width=width,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                generator=torch.Generator(device="cpu").manual_seed(seed),
                output_type="pt",
            )
            seconds = time.perf_counter() - start
            _write_clip(output.frames[0].float().cpu(), path, request.fps)
            clip = GeneratedClip(
                prompt, seed, request.steps, request.guidance_scale, request.negative_prompt, num_frames,
                height, width, request.fps, loaded.description,
                path.name if not file_output else os.fspath(path), counter.count, round(seconds, 3),
            )  # fmt: skip
            clips.append(clip)
            report(f"wrote {path} ({counter.count} UNet evaluations, {seconds:.2f} s)")
            if not file_output:  # after every clip, so an interrupted batch still lists what is there
                write_clips_json(clips, request.output / CLIPS_JSON)
    finally:
        counter.remove()
    return clips
