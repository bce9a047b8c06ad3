"""Generate clips (animatediff) or PNG images (sd15, sd21, sdxl) from a trained PeRFlow student (or the
embedded tiny default) from the command line.

``scripts/generate.py`` is :func:`perflow_video.generation.cli.main`; the library entry point is
:func:`perflow_video.generation.clips.generate` (every family: image families go to
:mod:`perflow_video.generation.images`).
"""

from __future__ import annotations

from perflow_video.generation.clips import ClipRequest, GeneratedClip, generate
from perflow_video.generation.images import GeneratedImage
from perflow_video.generation.model_source import (
    LoadedModel,
    load_base,
    load_run,
    load_tiny_default,
    resolve_base,
)
from perflow_video.generation.prompts import read_prompts, slug

__all__ = [
    "ClipRequest",
    "GeneratedClip",
    "GeneratedImage",
    "LoadedModel",
    "generate",
    "load_base",
    "load_run",
    "load_tiny_default",
    "read_prompts",
    "resolve_base",
    "slug",
]
