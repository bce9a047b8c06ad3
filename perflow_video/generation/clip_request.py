"""What a user asks ``scripts/generate.py`` for: prompts, sampling settings, output, device options.

One request type serves both kinds of family: clips (animatediff) and images (sd15, sd21, sdxl); the
video-only fields stay None for images (:func:`perflow_video.generation.images.check_image_request`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: FreeNoise's window stride when --context_stride is not given (at most the context length).
DEFAULT_CONTEXT_STRIDE = 4

#: Video-to-video strength when --video comes without --strength: 3 of 4 steps, from the window start 750.
DEFAULT_STRENGTH = 0.75

#: Frame rate of written clips when --fps is not given.
DEFAULT_FPS = 8.0

#: What the image families write (the clip formats are ``media.video_export.CLIP_FORMATS``).
IMAGE_FORMATS: tuple[str, ...] = ("png",)

#: The file format when --format is not given, by what the family samples (FamilyModels' ``data_kind``).
DEFAULT_FORMATS = {"clips": "mp4", "images": "png"}


@dataclass
class ClipRequest:
    """What to sample (None: the model's default) and where to write it.

    ``output``: a ``.gif`` / ``.mp4`` file (clips) or ``.png`` file (images) for one prompt, or a folder
    (``NN_<slug>.<format>`` per prompt + ``clips.json`` / ``images.json``). Prompt ``i`` uses seed ``seed + i``.
    ``video_format`` (None: mp4 for clips, png for images) names the format of a folder's files;
    ``fps`` (None: :data:`DEFAULT_FPS`) is the clips' frame rate.
    ``video`` / ``strength``: video-to-video from that clip (strength None: :data:`DEFAULT_STRENGTH`).
    ``context_length`` / ``context_stride``: FreeNoise windows (None: off). ``attention`` None keeps
    diffusers' default processors (SDPA).
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
    fps: float | None = None
    video_format: str | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    video: Path | None = None
    strength: float | None = None
    context_length: int | None = None
    context_stride: int | None = None
    attention: str | None = None
    cpu_offload: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False

    @property
    def effective_fps(self) -> float:
        """The clips' frame rate: --fps, else :data:`DEFAULT_FPS`."""
        return DEFAULT_FPS if self.fps is None else self.fps

    def output_format(self, data_kind: str) -> str:
        """The format of a folder's files for a family sampling ``data_kind``: --format, else its default."""
        return self.video_format or DEFAULT_FORMATS[data_kind]

    @property
    def effective_strength(self) -> float | None:
        """The video-to-video strength (None for text-to-video)."""
        if self.video is None:
            return None
        return DEFAULT_STRENGTH if self.strength is None else self.strength

    @property
    def effective_context_stride(self) -> int | None:
        """FreeNoise's window stride (None without FreeNoise): --context_stride, else 4 (at most the length)."""
        if self.context_length is None:
            return None
        return self.context_stride or min(DEFAULT_CONTEXT_STRIDE, self.context_length)
