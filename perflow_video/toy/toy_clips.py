"""Deterministic toy clips: coloured shapes moving in a stated direction, with captions.

Each clip is captioned ``"a <color> <shape> moving <direction>"`` from a fixed vocabulary (6 colours,
3 shapes, 4 directions), so a tiny text-to-video model trained on CPU has something learnable. The
shape crosses the central square of the frame (what a center crop keeps) over the clip, about
0.6 of its width, so motion stays obvious after resizing to 64x64 or smaller. Files are real H.264
MP4s, listed in ``captions.csv`` (WebVid layout: videoid,name,page_dir) and mirrored as sidecar
``<videoid>.txt`` captions, so both layouts of :class:`~perflow_video.datasets.video_clips.VideoClipDataset`
read them.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from perflow_video.media.video_export import encode_video

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
BACKGROUND = (20, 20, 24)  # one dark background for every clip: only the captioned words vary
SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges, sub-pixel motion
CSV_NAME = "captions.csv"


@dataclass(frozen=True)
class ToyClipConfig:
    """How many toy clips, how big, how long."""

    num_clips: int = 24  # clips to write; the first 24 cover 24 distinct color/shape/direction triples
    seed: int = 0  # everything (sizes, lengths, positions) derives from it
    fps: int = 8  # frame rate of the MP4s
    sizes: tuple[tuple[int, int], ...] = ((64, 64), (64, 96), (96, 64), (96, 96), (96, 128))  # (H, W) choices
    min_frames: int = 16  # shortest clip
    max_frames: int = 40  # longest clip
    crf: int = 20  # x264 quality; 20 keeps edges clean at a few KB per clip
    page_dir: str = "toy"  # value of the WebVid page_dir column


@dataclass(frozen=True)
class ToyClip:
    """One planned clip (what :func:`plan_toy_clips` returns and the CSV lists)."""

    videoid: str  # file stem: <videoid>.mp4 and <videoid>.txt
    color: str
    shape: str
    direction: str
    height: int
    width: int
    num_frames: int
    start: float  # position across the motion axis, as a fraction of the central square

    @property
    def prompt(self) -> str:
        return f"a {self.color} {self.shape} moving {self.direction}"


def plan_toy_clips(config: ToyClipConfig = ToyClipConfig()) -> list[ToyClip]:
    """The clips :func:`make_toy_clips` would write, without rendering anything.

    Clip ``i`` gets direction ``i % 4``, shape ``i % 3`` and colour ``(i // 4) % 6``: the first 24
    triples are all distinct and each word appears equally often. Sizes, lengths and positions are
    drawn from ``config.seed``.
    """
    if config.min_frames < 2 or config.max_frames < config.min_frames:
        raise ValueError(f"need 2 <= min_frames <= max_frames, got {config.min_frames}, {config.max_frames}")
    rng = np.random.default_rng(config.seed)
    colors = list(COLORS)
    clips = []
    for i in range(config.num_clips):
        h, w = config.sizes[int(rng.integers(len(config.sizes)))]
        clips.append(
            ToyClip(
                videoid=f"toy_{i:03d}",
                color=colors[(i // 4) % len(colors)],
                shape=SHAPES[i % len(SHAPES)],
                direction=DIRECTIONS[i % len(DIRECTIONS)],
                height=int(h),
                width=int(w),
                num_frames=int(rng.integers(config.min_frames, config.max_frames + 1)),
                start=float(rng.uniform(0.3, 0.7)),
            )
        )
    return clips


def shape_center(clip: ToyClip, t: float) -> tuple[float, float]:
    """Center ``(y, x)`` in pixels at time ``t`` in ``[0, 1]``: moving across the central square."""
    side = min(clip.height, clip.width)
    top, left = (clip.height - side) / 2, (clip.width - side) / 2
    along = 0.2 + 0.6 * t  # 0.2 -> 0.8 of the square
    across = clip.start
    pos = {
        "right": (across, along),
        "left": (across, 1 - along),
        "down": (along, across),
        "up": (1 - along, across),
    }[clip.direction]
    return top + pos[0] * side, left + pos[1] * side


def render_toy_clip(clip: ToyClip) -> np.ndarray:
    """Draws a clip.

    Returns:
        uint8 ``(num_frames, height, width, 3)``.
    """
    s = SUPERSAMPLE
    radius = 0.14 * min(clip.height, clip.width) * s
    color = COLORS[clip.color]
    frames = []
    for k in range(clip.num_frames):
        cy, cx = (v * s for v in shape_center(clip, k / (clip.num_frames - 1)))
        img = Image.new("RGB", (clip.width * s, clip.height * s), BACKGROUND)
        draw = ImageDraw.Draw(img)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if clip.shape == "circle":
            draw.ellipse(box, fill=color)
        elif clip.shape == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon(
                [(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)], fill=color
            )
        frames.append(np.asarray(img.resize((clip.width, clip.height), Image.Resampling.BOX)))
    return np.stack(frames)


def make_toy_clips(out_dir: str | Path, config: ToyClipConfig = ToyClipConfig()) -> list[ToyClip]:
    """Writes ``<videoid>.mp4`` + ``<videoid>.txt`` per clip and ``captions.csv`` into ``out_dir``.

    Same config, same clips: rendering is seeded and the encoder runs single-threaded (so the machine's
    thread count does not matter); the videos decode to identical frames. Their bytes match almost
    always, not always: x264 now and then codes the same pictures with different bits.

    Args:
        out_dir: Folder to write into (created; existing toy files are overwritten).
        config: What to generate.

    Returns:
        The clips written, in CSV order.
    """
    out = Path(out_dir)
    clips = plan_toy_clips(config)
    for clip in clips:
        write_captioned_clip(out, clip.videoid, render_toy_clip(clip), clip.prompt, config.fps, config.crf)
    write_captions_csv(out, [(c.videoid, c.prompt) for c in clips], config.page_dir)
    return clips


def write_captioned_clip(
    out: Path, videoid: str, frames: np.ndarray, prompt: str, fps: int, crf: int, pix_fmt: str = "yuv420p"
) -> None:
    """``<out>/<videoid>.mp4`` (H.264, single-threaded x264: reproducible) and its sidecar caption
    ``<videoid>.txt``; ``frames`` uint8 ``(F, H, W, 3)``."""
    out.mkdir(parents=True, exist_ok=True)
    encode_video(
        frames, out / f"{videoid}.mp4", fps=fps, crf=crf, pix_fmt=pix_fmt, codec_options={"threads": "1"}
    )
    (out / f"{videoid}.txt").write_text(prompt + "\n", encoding="utf-8")


def write_captions_csv(out: Path, rows: list[tuple[str, str]], page_dir: str) -> None:
    """``<out>/captions.csv`` in the WebVid layout (videoid,name,page_dir) from ``(videoid, prompt)`` rows."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / CSV_NAME, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["videoid", "name", "page_dir"])
        writer.writerows([videoid, prompt, page_dir] for videoid, prompt in rows)
