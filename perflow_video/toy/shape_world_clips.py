"""Shape-world clips as files: the tiny teacher's world (:mod:`perflow_video.toy.shape_world`: 32 x 32
frames, 16 per clip, one shape of half-size 4.5-7 px moving 10-17 px) written as captioned H.264 MP4s in
the layout of the toy clips (``<videoid>.mp4`` + ``<videoid>.txt`` + ``captions.csv``), so the video data
pipeline can train a student on the data its ``tiny-teacher`` was trained on.

The clips are ``ShapeWorld(split, seed).clip(i)`` for ``i < num_clips``, at their native 32 px (the data
pipeline then reads them unresized), encoded in 4:4:4: at 32 px, 4:2:0 would halve the colour resolution
of a 9-14 px shape (decoded RMS error 0.047 instead of 0.019 in [-1, 1] units).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from perflow_video.toy.shape_world import ShapeWorld
from perflow_video.toy.toy_clips import write_captioned_clip, write_captions_csv


@dataclass(frozen=True)
class ShapeWorldClipConfig:
    """Which shape-world clips to write, and how to encode them."""

    num_clips: int = 132  # two of each of the 66 training prompts (ShapeWorld's balanced blocks)
    seed: int = 0  # ShapeWorld's seed: prompt order, sizes, speeds, positions
    split: str = "train"  # the 66 prompts the teacher trained on ("held_out": its 6 unseen ones, "all")
    fps: int = 8
    crf: int = 20
    pix_fmt: str = "yuv444p"
    page_dir: str = "shape_world"  # value of the WebVid page_dir column


def clip_frames(world: ShapeWorld, index: int) -> np.ndarray:
    """Clip ``index`` of ``world`` as uint8 ``(F, H, W, 3)`` (from its ``(3, F, H, W)`` [-1, 1] tensor)."""
    pixels = (world.clip(index).permute(1, 2, 3, 0) + 1.0) * 127.5
    return pixels.round().clamp(0, 255).to(torch.uint8).numpy()


def make_shape_world_clips(
    out_dir: str | Path, config: ShapeWorldClipConfig = ShapeWorldClipConfig()
) -> list[tuple[str, str]]:
    """Writes ``sw_NNN.mp4`` + ``sw_NNN.txt`` per clip and ``captions.csv`` into ``out_dir`` (created).

    Returns:
        ``(videoid, prompt)`` of every clip, in CSV order.
    """
    out = Path(out_dir)
    world = ShapeWorld(config.split, config.seed)
    rows = []
    for i in range(config.num_clips):
        videoid, prompt = f"sw_{i:03d}", world.spec(i).prompt
        write_captioned_clip(
            out, videoid, clip_frames(world, i), prompt, config.fps, config.crf, config.pix_fmt
        )
        rows.append((videoid, prompt))
    write_captions_csv(out, rows, config.page_dir)
    return rows
