"""Generate clips from a trained PeRFlow student (or the embedded tiny default) from the command line.

``scripts/generate.py`` is :func:`perflow_video.generation.cli.main`; the library entry point is
:func:`perflow_video.generation.clips.generate`.
"""

from __future__ import annotations

from perflow_video.generation.clips import ClipRequest, GeneratedClip, generate
from perflow_video.generation.model_source import LoadedModel, load_run, load_tiny_default
from perflow_video.generation.prompts import read_prompts, slug

__all__ = [
    "ClipRequest",
    "GeneratedClip",
    "LoadedModel",
    "generate",
    "load_run",
    "load_tiny_default",
    "read_prompts",
    "slug",
]
