"""Contact sheets of the evidence (PNG, docs-ready): one prompt and one noise, a row per sampler (teacher
DDIM-50 / DDIM-4 / DPM++ 2M-4 / PeRFlow-4 of each student), a few frames each, the row's caption on its left
and the prompt as the title. Frames are upscaled with nearest-neighbour (the tiny teacher's are 32 px)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from perflow_video.atomic_files import atomic_destination

LABEL_WIDTH = 240  # pixels left of the frames for the row captions
TITLE_HEIGHT = 20  # pixels above the rows for the prompt
PAD = 4  # pixels between (and around) frames
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


@dataclass(frozen=True)
class SheetLayout:
    """Where everything goes on a sheet of ``rows`` x ``frames`` frames of ``size`` px scaled by ``scale``."""

    rows: int
    frames: int
    size: tuple[int, int]  # (H, W) of a frame
    scale: int

    @property
    def cell(self) -> tuple[int, int]:
        return self.size[0] * self.scale, self.size[1] * self.scale

    def image_size(self) -> tuple[int, int]:
        """(width, height) of the PNG."""
        h, w = self.cell
        return LABEL_WIDTH + self.frames * (w + PAD) + PAD, TITLE_HEIGHT + self.rows * (h + PAD) + PAD

    def origin(self, row: int, frame: int) -> tuple[int, int]:
        """(x, y) of the top-left pixel of a frame."""
        h, w = self.cell
        return LABEL_WIDTH + PAD + frame * (w + PAD), TITLE_HEIGHT + PAD + row * (h + PAD)


def sheet_frames(num_frames: int, count: int = 4) -> list[int]:
    """``count`` frame indices from the first to the last frame (0, 5, 10, 15 of 16)."""
    if num_frames <= count:
        return list(range(num_frames))
    return [round(i * (num_frames - 1) / (count - 1)) for i in range(count)]


def to_uint8_frames(clip: Tensor, frames: Sequence[int], scale: int) -> list[np.ndarray]:
    """(3, F, H, W) in [-1, 1] -> the chosen frames as (H*scale, W*scale, 3) uint8, nearest-neighbour."""
    rgb = ((clip.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()
    return [rgb[f].repeat(scale, axis=0).repeat(scale, axis=1) for f in frames]


def contact_sheet(
    title: str, rows: Sequence[tuple[str, Tensor]], frames: Sequence[int], scale: int
) -> Image.Image:
    """A sheet of ``rows`` ((caption, (3, F, H, W) clip in [-1, 1]) each), showing ``frames`` of every clip."""
    size = tuple(rows[0][1].shape[-2:])
    layout = SheetLayout(len(rows), len(frames), size, scale)
    image = Image.new("RGB", layout.image_size(), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((PAD, PAD), title, fill=INK)
    for r, (caption, clip) in enumerate(rows):
        x0, y0 = layout.origin(r, 0)
        draw.text((PAD, y0 + layout.cell[0] // 2 - 6), caption, fill=INK)
        for f, pixels in enumerate(to_uint8_frames(clip, frames, scale)):
            image.paste(Image.fromarray(pixels), layout.origin(r, f))
    return image


def save_png(image: Image.Image, path: Path) -> Path:
    with atomic_destination(path) as tmp:
        image.save(tmp, format="PNG")
    return path
