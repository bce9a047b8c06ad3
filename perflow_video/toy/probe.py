"""Pixel probe: reads colour, shape and direction of a shape-world clip back from its pixels alone.

Deterministic, no learned parts, so it can grade any generator (teacher, student) against a caption:

* **Coverage.** Each pixel's distance from :data:`~perflow_video.toy.toy_clips.BACKGROUND` (RGB, 0..255)
  measures how much object it holds. Pixels farther than ``FOREGROUND_DISTANCE`` are *object*; a pixel's
  coverage is its distance divided by the object's colour distance (the median over object pixels), clipped
  to ``[0, 1]``.
* **Colour.** The object's colour is the coverage-weighted mean of its confident pixels (coverage >= 0.5),
  unmixed from the background (``bg + (rgb - bg) / coverage``), then matched to the nearest palette colour
  of :data:`~perflow_video.toy.toy_clips.COLORS` (the palette colours are far apart, white included - a hue
  alone could not tell white).
* **Shape.** Fill ratio of the bounding box, with sub-pixel extents: width = sum over columns of the
  column's largest coverage, height likewise over rows, area = sum of coverage; ``area / (width * height)``
  is pi/4 for a disc, 1 for a square, 1/2 for the triangle. The per-frame ratios' median is compared with the
  thresholds 0.68 (triangle | circle) and 0.9 (circle | square); rendered
  triangles read 0.53-0.60 (the apex column is thin), discs 0.76-0.80, squares 0.99-1.0.
* **Direction.** The coverage-weighted centroid of each frame; a least-squares line through the track over
  time gives a velocity ``(vy, vx)``; the larger axis and its sign give left / right / up / down (image y
  grows downwards). The speed (pixels per frame) is reported too.

Input clips are ``(3, F, H, W)`` tensors in ``[-1, 1]`` (as :mod:`perflow_video.toy.shape_world` renders and
a VAE decodes) or ``(F, H, W, 3)`` uint8 arrays.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from perflow_video.toy.shape_world import parse_prompt
from perflow_video.toy.toy_clips import BACKGROUND, COLORS, DIRECTIONS, SHAPES

__all__ = [
    "ATTRIBUTES",
    "ProbeResult",
    "axis_accuracy",
    "probe_accuracy",
    "probe_clip",
    "score_clip",
]

ATTRIBUTES = ("color", "shape", "direction")
FOREGROUND_DISTANCE = 40.0  # RGB distance from the background above which a pixel counts as object
MIN_OBJECT_PIXELS = 4  # fewer object pixels in a frame: the frame shows no object
SHAPE_THRESHOLDS = (0.68, 0.9)  # fill ratio: triangle < 0.68 <= circle < 0.9 <= square
MIN_SPEED = 0.05  # pixels per frame below which the object counts as static ("none")

_BG = np.asarray(BACKGROUND, dtype=np.float64)
_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.asarray([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float64)


@dataclass(frozen=True)
class ProbeResult:
    """What the probe read from a clip. ``"none"`` where it could not tell (no object, no motion)."""

    color: str
    shape: str
    direction: str
    fill_ratio: float  # median over frames with an object; nan if none
    speed: float  # centre speed in pixels per frame
    object_frames: int  # frames in which an object was found

    def as_dict(self) -> dict:
        return asdict(self)


def _to_rgb255(clip: torch.Tensor | np.ndarray) -> np.ndarray:
    """(F, H, W, 3) float64 in 0..255 from a (3, F, H, W) [-1, 1] tensor or a (F, H, W, 3) uint8 array."""
    if isinstance(clip, torch.Tensor):
        x = clip.detach().to("cpu", torch.float64).numpy()
        if x.ndim != 4 or x.shape[0] != 3:
            raise ValueError(f"expected a (3, F, H, W) tensor, got {tuple(x.shape)}")
        return np.clip((np.transpose(x, (1, 2, 3, 0)) + 1.0) * 127.5, 0.0, 255.0)
    x = np.asarray(clip)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected a (F, H, W, 3) array, got {x.shape}")
    return x.astype(np.float64)


def probe_clip(clip: torch.Tensor | np.ndarray) -> ProbeResult:
    """Reads colour, shape and direction of the (single) object of a clip. See the module docstring."""
    rgb = _to_rgb255(clip)
    dist = np.linalg.norm(rgb - _BG, axis=-1)  # (F, H, W)
    obj = dist > FOREGROUND_DISTANCE
    frames = [f for f in range(rgb.shape[0]) if obj[f].sum() >= MIN_OBJECT_PIXELS]
    if not frames:
        return ProbeResult("none", "none", "none", math.nan, 0.0, 0)

    # Colour distance of a fully covered pixel: the median distance of clearly-object pixels.
    full = float(np.median(dist[obj]))
    cov = np.clip(dist / max(full, 1e-6), 0.0, 1.0) * obj  # background noise below threshold -> 0

    # Colour: unmix confident pixels from the background, average, nearest palette entry.
    conf = cov >= 0.5
    weights = cov[conf]
    unmixed = _BG + (rgb[conf] - _BG) / cov[conf][:, None]
    mean_rgb = (unmixed * weights[:, None]).sum(0) / weights.sum()
    color = _PALETTE_NAMES[int(np.argmin(np.linalg.norm(_PALETTE - mean_rgb, axis=1)))]

    # Shape: sub-pixel bounding box fill ratio per frame, median.
    c = cov[frames]  # (n, H, W)
    area = c.sum(axis=(1, 2))
    width, height = c.max(axis=1).sum(axis=1), c.max(axis=2).sum(axis=1)
    ratios = area / np.maximum(width * height, 1e-6)
    cys = (c.sum(axis=2) * np.arange(c.shape[1])).sum(axis=1) / area
    cxs = (c.sum(axis=1) * np.arange(c.shape[2])).sum(axis=1) / area
    ts = frames
    fill = float(np.median(ratios))
    shape = (
        "triangle" if fill < SHAPE_THRESHOLDS[0] else ("circle" if fill < SHAPE_THRESHOLDS[1] else "square")
    )

    # Direction: least-squares velocity of the centroid track.
    if len(ts) >= 2:
        t = np.asarray(ts, dtype=np.float64)
        t = t - t.mean()
        vy = float((t * (np.asarray(cys) - np.mean(cys))).sum() / (t * t).sum())
        vx = float((t * (np.asarray(cxs) - np.mean(cxs))).sum() / (t * t).sum())
    else:
        vy = vx = 0.0
    speed = math.hypot(vy, vx)
    if speed < MIN_SPEED:
        direction = "none"
    elif abs(vx) >= abs(vy):
        direction = "right" if vx > 0 else "left"
    else:
        direction = "down" if vy > 0 else "up"
    return ProbeResult(color, shape, direction, fill, speed, len(frames))


def score_clip(clip: torch.Tensor | np.ndarray, prompt: str) -> dict[str, bool]:
    """Per-attribute correctness of a clip against its caption ``"a <colour> <shape> moving <direction>"``."""
    want = dict(zip(ATTRIBUTES, parse_prompt(prompt), strict=True))
    got = probe_clip(clip)
    return {a: getattr(got, a) == want[a] for a in ATTRIBUTES}


def probe_accuracy(clips: Iterable[torch.Tensor | np.ndarray], prompts: Sequence[str]) -> dict[str, float]:
    """Accuracy of each attribute, and of all three at once (``"all"``), over clips and their captions.

    Returns:
        ``{"color": ..., "shape": ..., "direction": ..., "all": ..., "n": number of clips}``.
    """
    hits = {a: 0 for a in (*ATTRIBUTES, "all")}
    n = 0
    for clip, prompt in zip(clips, prompts, strict=True):
        s = score_clip(clip, prompt)
        for a in ATTRIBUTES:
            hits[a] += int(s[a])
        hits["all"] += int(all(s.values()))
        n += 1
    if n == 0:
        raise ValueError("no clips to score")
    return {**{a: hits[a] / n for a in hits}, "n": n}


_AXIS = {"left": "horizontal", "right": "horizontal", "up": "vertical", "down": "vertical"}


def axis_accuracy(clips: Iterable[torch.Tensor | np.ndarray], prompts: Sequence[str]) -> float:
    """Fraction of clips whose read direction lies on the caption's axis (left / right vs up / down), whatever
    its sign: a clip moving right for "moving left" counts, one moving up or not moving does not."""
    hits = [
        _AXIS.get(probe_clip(clip).direction) == _AXIS[parse_prompt(prompt)[2]]
        for clip, prompt in zip(clips, prompts, strict=True)
    ]
    if not hits:
        raise ValueError("no clips to score")
    return sum(hits) / len(hits)


# Vocabulary the probe can answer (besides "none"), for callers building confusion tables.
VOCABULARY = {"color": _PALETTE_NAMES, "shape": SHAPES, "direction": DIRECTIONS}
