"""What clips and images share: the file-or-folder ``--output``, the checks that need no model, the
atomic JSON listing of a folder, the pixel size and the UNet-evaluation counter.

An ``--output`` ending in a sample format (``.gif`` / ``.mp4`` for clips, ``.png`` for images) is one file
for one prompt; anything else is a folder that gets ``NN_<prompt slug>.<format>`` files and their listing
(``clips.json`` / ``images.json``), rewritten atomically after every sample.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from perflow_video.atomic_files import atomic_destination
from perflow_video.errors import ConfigError
from perflow_video.generation.clip_request import IMAGE_FORMATS, ClipRequest
from perflow_video.generation.pipeline_setup import DTYPES, check_device_options
from perflow_video.media.video_export import CLIP_FORMATS

if TYPE_CHECKING:
    from perflow_video.generation.model_source import LoadedModel

#: Every --format / --output extension, clips' and images'.
OUTPUT_FORMATS: tuple[str, ...] = (*CLIP_FORMATS, *IMAGE_FORMATS)


def is_file_output(output: Path) -> bool:
    """Whether ``--output`` names one file (its extension is a sample format) rather than a folder."""
    return output.suffix.lower().lstrip(".") in OUTPUT_FORMATS


def check_common(request: ClipRequest) -> None:
    """The checks of every request, clips or images: prompts, steps, guidance, dtype, one file per prompt."""
    if not request.prompts:
        raise ConfigError("no prompt: give --prompt TEXT (repeatable) or --prompts FILE")
    if request.steps < 1:
        raise ConfigError(f"--steps {request.steps}: need at least 1")
    if request.guidance_scale < 1.0:
        raise ConfigError(f"--guidance_scale {request.guidance_scale}: need >= 1 (1 = no CFG)")
    if request.dtype not in DTYPES:
        raise ConfigError(f"--dtype {request.dtype!r}: choose one of {sorted(DTYPES)}")
    if request.video_format is not None and request.video_format not in OUTPUT_FORMATS:
        raise ConfigError(f"--format {request.video_format!r}: choose one of {OUTPUT_FORMATS}")
    if is_file_output(request.output) and len(request.prompts) != 1:
        raise ConfigError(
            f"--output {request.output} is one file, but {len(request.prompts)} prompts were given: "
            "give a folder to --output for several prompts"
        )


def check_placement(request: ClipRequest) -> None:
    """The last checks before loading: the device options work here and the output takes files."""
    check_device_options(request)
    check_writable(request.output)


def check_writable(output: Path) -> None:
    """The folder samples go to exists (created) and takes files; else ConfigError naming --output."""
    folder = output.parent if is_file_output(output) else output
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".perflow-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"--output {output}: cannot write there ({err.strerror or err})") from err


def sample_path(request: ClipRequest, i: int, name_stem: str, file_format: str) -> Path:
    """Where sample ``i`` goes: the --output file, or ``NN_<name_stem>.<file_format>`` in the folder."""
    if is_file_output(request.output):
        return request.output
    return request.output / f"{i:02d}_{name_stem}.{file_format}"


def listed_name(request: ClipRequest, path: Path) -> str:
    """A sample's ``file`` in the listing: the path for a file output, the name inside a folder."""
    return os.fspath(path) if is_file_output(request.output) else path.name


def write_listing(samples: list, path: Path, key: str) -> None:
    """``{key: [sample, ...]}`` (dataclasses) as JSON at ``path``, atomically."""
    with atomic_destination(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump({key: [asdict(s) for s in samples]}, fh, indent=2)
        fh.write("\n")


def pixel_size(request: ClipRequest, loaded: LoadedModel) -> tuple[int, int]:
    """(height, width): --height / --width, else the model's resolution; multiples of the VAE's factor."""
    factor = 2 ** (len(loaded.models.vae.config.block_out_channels) - 1)  # as the pipelines compute it
    height, width = request.height or loaded.resolution, request.width or loaded.resolution
    for flag, value in (("--height", height), ("--width", width)):
        if value < factor or value % factor:
            raise ConfigError(f"{flag} {value}: need a positive multiple of {factor} (the VAE's factor)")
    return height, width


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


__all__ = [
    "IMAGE_FORMATS",
    "OUTPUT_FORMATS",
    "EvaluationCounter",
    "check_common",
    "check_placement",
    "check_writable",
    "is_file_output",
    "listed_name",
    "pixel_size",
    "sample_path",
    "write_listing",
]
