"""Toy captioned images for the tiny image-model defaults: one still frame of each toy clip.

Captions name color and shape ("a red circle"), the same small vocabulary as the toy clips, written as
PNG files with a ``captions.csv`` (columns ``path,caption``) and a sidecar ``.txt`` per image.
"""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image

from perflow_video.toy.toy_clips import ToyClipConfig, plan_toy_clips, render_toy_clip


def make_toy_images(out_dir: str | Path, config: ToyClipConfig | None = None) -> list[Path]:
    """Write the middle frame of every planned toy clip as ``<videoid>.png``; deterministic."""
    config = config or ToyClipConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, rows = [], []
    for clip in plan_toy_clips(config):
        frames = render_toy_clip(clip)  # (F, H, W, 3) uint8
        path = out_dir / f"{clip.videoid}.png"
        Image.fromarray(frames[len(frames) // 2]).save(path, optimize=True)
        caption = f"a {clip.color} {clip.shape}"
        (out_dir / f"{clip.videoid}.txt").write_text(caption + "\n")
        rows.append({"path": path.name, "caption": caption})
        written.append(path)
    with open(out_dir / "captions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return written
