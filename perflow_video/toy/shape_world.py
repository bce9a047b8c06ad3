"""Shape world: an endless, seeded stream of toy clips rendered straight to tensors (no files).

Every clip shows one coloured shape on the dark toy background moving in a straight line, captioned
``"a <colour> <shape> moving <direction>"`` with the vocabulary of :mod:`perflow_video.toy.toy_clips`
(6 colours x 3 shapes x 4 directions = 72 prompts). Unlike the 24 fixed toy clips, each clip draws its own
start position, size and speed (within :class:`ShapeWorldConfig`'s bounds), so a model trained on the
stream must learn the words, not a few clips.

Determinism: clip ``index`` of a world with ``seed`` is a pure function of ``(seed, index)`` (its own
``numpy`` generator seeded with ``[seed, index]``), whatever was drawn before, so training can resume at
any index. Prompts are balanced: each consecutive block of ``len(prompts)`` indices holds every prompt once,
in a seeded order.

Held out: :data:`HELD_OUT` lists 6 prompt combinations that the training split never shows (every single
word still appears in training), for a generalisation figure.

Rendering is analytic: each pixel's coverage is the fraction of its ``SUPERSAMPLE x SUPERSAMPLE`` sub-pixel
centres inside the shape (anti-aliased edges, sub-pixel motion), blended from :data:`BACKGROUND` to the
colour. Shapes: a disc of radius ``r``, an axis-aligned square of half-side ``r`` and an apex-up isosceles
triangle with base ``2r`` and height ``2r`` (its bounding box is the square's), so the fill ratio of the
bounding box is pi/4, 1 and 1/2 - what :mod:`perflow_video.toy.probe` reads back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from perflow_video.toy.toy_clips import BACKGROUND, COLORS, DIRECTIONS, SHAPES

__all__ = [
    "ALL_PROMPTS",
    "BACKGROUND",
    "HELD_OUT",
    "OPPOSITE",
    "SUPERSAMPLE",
    "DIRECTION_POSITION",
    "EOS_POSITION",
    "ClipSpec",
    "ShapeWorld",
    "ShapeWorldConfig",
    "attribute_labels",
    "parse_prompt",
    "prompt_of",
    "render_clip",
    "reversed_spec",
]

SUPERSAMPLE = 4  # sub-pixels per pixel and axis used to compute coverage

#: Unit vector (dy, dx) of each direction in image coordinates (y grows downwards).
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {
    "left": (0, -1),
    "right": (0, 1),
    "up": (-1, 0),
    "down": (1, 0),
}


def prompt_of(color: str, shape: str, direction: str) -> str:
    """The caption of a clip: ``"a <colour> <shape> moving <direction>"``."""
    return f"a {color} {shape} moving {direction}"


#: Token positions in a caption tokenized by a CLIP tokenizer whose words are single tokens (the tiny one):
#: <|startoftext|> a <colour> <shape> moving <direction> <|endoftext|> <padding ...>.
DIRECTION_POSITION = 5
EOS_POSITION = 6


def attribute_labels(prompt: str) -> tuple[int, int, int]:
    """Class indices of a caption's colour, shape and direction in ``COLORS``, ``SHAPES``, ``DIRECTIONS``."""
    color, shape, direction = parse_prompt(prompt)
    return list(COLORS).index(color), SHAPES.index(shape), DIRECTIONS.index(direction)


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """Inverse of :func:`prompt_of`: ``(colour, shape, direction)``; raises ``ValueError`` on anything else."""
    words = prompt.strip().split()
    if len(words) != 5 or words[0] != "a" or words[3] != "moving":
        raise ValueError(f"not a shape-world caption: {prompt!r}")
    color, shape, direction = words[1], words[2], words[4]
    if color not in COLORS or shape not in SHAPES or direction not in DIRECTIONS:
        raise ValueError(f"unknown word in caption {prompt!r}")
    return color, shape, direction


#: All 72 captions, colour-major (colour, then shape, then direction).
ALL_PROMPTS: tuple[str, ...] = tuple(prompt_of(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS)

#: 6 held-out combinations: colour i with shape i % 3 and direction i % 4, so each colour, shape and
#: direction stays in training (each in 66 prompts' worth of other combinations) but these triples never do.
HELD_OUT: tuple[str, ...] = tuple(
    prompt_of(c, SHAPES[i % len(SHAPES)], DIRECTIONS[i % len(DIRECTIONS)]) for i, c in enumerate(COLORS)
)


@dataclass(frozen=True)
class ShapeWorldConfig:
    """Bounds of the random clip parameters (pixels; a clip never leaves the frame)."""

    size: int = 32  # frames are size x size
    num_frames: int = 16
    min_radius: float = 4.5  # half-size of the shape (disc radius, half the square's side)
    max_radius: float = 7.0
    min_travel: float = 10.0  # distance the centre moves from the first to the last frame
    max_travel: float = 17.0  # capped further so the whole path fits inside the frame
    margin: float = 0.5  # gap kept between the shape and the frame border
    trail_frames: float = 0.0  # length of a fading trail behind the shape, in frames of its motion; 0: none
    trail_opacity: float = 0.35  # the trail's opacity right behind the shape (it fades towards 0 at its end)

    def trail_record(self) -> dict[str, float]:
        """The trail settings as a teacher records them (``ShapeWorldConfig(**record)`` reads them back)."""
        return {"trail_frames": self.trail_frames, "trail_opacity": self.trail_opacity}


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines one clip."""

    color: str
    shape: str
    direction: str
    radius: float
    start: tuple[float, float]  # centre (y, x) in pixels at the first frame (pixel centres at k + 0.5)
    travel: float  # distance covered by the centre over the clip

    @property
    def prompt(self) -> str:
        return prompt_of(self.color, self.shape, self.direction)

    def center(self, t: float) -> tuple[float, float]:
        """Centre (y, x) at time ``t`` in ``[0, 1]`` (first to last frame), constant speed."""
        dy, dx = DIRECTION_VECTORS[self.direction]
        return self.start[0] + dy * self.travel * t, self.start[1] + dx * self.travel * t


#: The direction a clip shows when played backwards.
OPPOSITE: dict[str, str] = {"left": "right", "right": "left", "up": "down", "down": "up"}


def reversed_spec(spec: ClipSpec) -> ClipSpec:
    """The clip ``spec`` played backwards: it starts where ``spec`` ends and moves the opposite way.

    Without a trail, ``render_clip(reversed_spec(s))`` is ``render_clip(s)`` with its frames in reverse order
    (constant speed, no bounces), so a clip and its reversal differ only in frame order and in the caption's
    direction word.
    """
    return ClipSpec(
        spec.color, spec.shape, OPPOSITE[spec.direction], spec.radius, spec.center(1.0), spec.travel
    )


def sample_spec(
    prompt: str, rng: np.random.Generator, config: ShapeWorldConfig = ShapeWorldConfig()
) -> ClipSpec:
    """Draws size, speed and start of a clip of ``prompt`` so the shape stays inside the frame throughout."""
    color, shape, direction = parse_prompt(prompt)
    radius = float(rng.uniform(config.min_radius, config.max_radius))
    lo, hi = radius + config.margin, config.size - radius - config.margin  # allowed range of the centre
    max_travel = min(config.max_travel, hi - lo)
    if max_travel < config.min_travel:
        raise ValueError(
            f"frame {config.size} too small for radius {radius:.2f} and travel {config.min_travel}"
        )
    travel = float(rng.uniform(config.min_travel, max_travel))
    along0 = float(rng.uniform(lo, hi - travel))  # start on the motion axis (before orientation)
    across = float(rng.uniform(lo, hi))
    dy, dx = DIRECTION_VECTORS[direction]
    if dy:  # vertical motion: along = y
        y0 = along0 if dy > 0 else config.size - along0
        start = (y0, across)
    else:
        x0 = along0 if dx > 0 else config.size - along0
        start = (across, x0)
    return ClipSpec(color, shape, direction, radius, start, travel)


def _coverage(shape: str, cy: torch.Tensor, cx: torch.Tensor, radius: float, size: int) -> torch.Tensor:
    """Coverage in [0, 1] of each pixel by the shape centred at (cy[f], cx[f]): (F, size, size) float64."""
    s = SUPERSAMPLE
    sub = (torch.arange(size * s, dtype=torch.float64) + 0.5) / s  # sub-pixel centres, pixel units
    y = sub.view(1, -1, 1) - cy.view(-1, 1, 1)
    x = sub.view(1, 1, -1) - cx.view(-1, 1, 1)
    if shape == "circle":
        inside = x * x + y * y <= radius * radius
    elif shape == "square":
        inside = (x.abs() <= radius) & (y.abs() <= radius)
    elif shape == "triangle":  # apex (0, -r), base corners (+-r, +r): half-width (y + r) / 2
        inside = (y >= -radius) & (y <= radius) & (x.abs() <= (y + radius) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    f = inside.shape[0]
    return inside.to(torch.float64).view(f, size, s, size, s).mean(dim=(2, 4))


#: Past positions sampled along a trail (each a faded copy of the shape).
TRAIL_SAMPLES = 8


def _coverage_at(spec: ClipSpec, ts: list[float], config: ShapeWorldConfig) -> torch.Tensor:
    """Coverage of the shape at clip times ``ts``: (len(ts), size, size) float64."""
    centers = torch.tensor([spec.center(t) for t in ts], dtype=torch.float64)
    return _coverage(spec.shape, centers[:, 0], centers[:, 1], spec.radius, config.size)


def _trail_coverage(spec: ClipSpec, ts: list[float], config: ShapeWorldConfig) -> torch.Tensor:
    """Coverage of the fading trail: the shape at past positions, opacity falling linearly towards 0.

    The trail extends the path backwards (before the first frame too: the object was already moving), so
    every single frame shows which way the object moves - what motion blur does in real video.
    """
    dt = config.trail_frames / max(config.num_frames - 1, 1)  # trail length in clip time
    trail = torch.zeros(len(ts), config.size, config.size, dtype=torch.float64)
    for k in range(1, TRAIL_SAMPLES + 1):
        frac = k / TRAIL_SAMPLES
        past = _coverage_at(spec, [t - frac * dt for t in ts], config)
        weight = config.trail_opacity * (1.0 - frac + 1.0 / TRAIL_SAMPLES)
        trail = torch.maximum(trail, weight * past)
    return trail


def render_clip(spec: ClipSpec, config: ShapeWorldConfig = ShapeWorldConfig()) -> torch.Tensor:
    """Renders a clip.

    Returns:
        float32 ``(3, num_frames, size, size)`` in ``[-1, 1]`` (the layout of a video latent's input).
    """
    n = config.num_frames
    ts = [k / (n - 1) for k in range(n)] if n > 1 else [0.0]
    cov = _coverage_at(spec, ts, config)  # (F, H, W)
    if config.trail_frames > 0:
        cov = torch.maximum(cov, _trail_coverage(spec, ts, config))
    bg = torch.tensor(BACKGROUND, dtype=torch.float64).view(3, 1, 1, 1)
    fg = torch.tensor(COLORS[spec.color], dtype=torch.float64).view(3, 1, 1, 1)
    rgb = bg + (fg - bg) * cov.unsqueeze(0)  # (3, F, H, W), 0..255
    return (rgb / 127.5 - 1.0).to(torch.float32)


class ShapeWorld:
    """The stream of clips of one split.

    Args:
        split: ``"train"`` (the 66 prompts not held out), ``"held_out"`` (the 6 of :data:`HELD_OUT`) or
            ``"all"`` (all 72).
        seed: Seed of everything random (prompt order, sizes, speeds, positions).
        config: Frame size, length and parameter bounds.
        drop_prompt: Probability that a clip's caption is replaced by ``""`` (for classifier-free
            guidance); drawn per index, deterministically.
        direction: Keep only the split's prompts moving this way (a one-direction world: what a direction
            motion adapter is trained on); None keeps all four.
    """

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        config: ShapeWorldConfig = ShapeWorldConfig(),
        drop_prompt: float = 0.0,
        direction: str | None = None,
    ) -> None:
        if split == "train":
            self.prompts = tuple(p for p in ALL_PROMPTS if p not in HELD_OUT)
        elif split == "held_out":
            self.prompts = HELD_OUT
        elif split == "all":
            self.prompts = ALL_PROMPTS
        else:
            raise ValueError(f"unknown split {split!r}; expected 'train', 'held_out' or 'all'")
        if direction is not None:
            if direction not in DIRECTION_VECTORS:
                raise ValueError(
                    f"unknown direction {direction!r}; expected one of {tuple(DIRECTION_VECTORS)}"
                )
            self.prompts = tuple(p for p in self.prompts if parse_prompt(p)[2] == direction)
        if not 0.0 <= drop_prompt < 1.0:
            raise ValueError(f"drop_prompt must be in [0, 1), got {drop_prompt}")
        self.split, self.seed, self.config, self.drop_prompt = split, seed, config, drop_prompt

    def prompt_index(self, index: int) -> int:
        """Which prompt clip ``index`` shows: block ``index // n`` is a seeded permutation of the n prompts."""
        n = len(self.prompts)
        block, pos = divmod(index, n)
        perm = np.random.default_rng([self.seed, 0x5EED, block]).permutation(n)
        return int(perm[pos])

    def spec(self, index: int) -> ClipSpec:
        """The parameters of clip ``index`` (pure function of ``(seed, index)``)."""
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, index])
        return sample_spec(self.prompts[self.prompt_index(index)], rng, self.config)

    def caption(self, index: int) -> str:
        """The caption given to the model for clip ``index``: its prompt, or ``""`` if dropped."""
        if self.drop_prompt > 0:
            u = np.random.default_rng([self.seed, 0xD209, index]).random()
            if u < self.drop_prompt:
                return ""
        return self.spec(index).prompt

    def clip(self, index: int) -> torch.Tensor:
        """Clip ``index`` as float32 ``(3, F, H, W)`` in ``[-1, 1]``."""
        return render_clip(self.spec(index), self.config)

    def batch(self, start: int, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        """Clips ``start .. start + batch_size - 1``: ``(B, 3, F, H, W)`` and their captions."""
        idx = range(start, start + batch_size)
        return torch.stack([self.clip(i) for i in idx]), [self.caption(i) for i in idx]

    def reversal_pairs(self, start: int, n_pairs: int) -> tuple[torch.Tensor, list[str]]:
        """Clips ``start .. start + n_pairs - 1``, then each played backwards under its opposite direction.

        ``(2 n_pairs, 3, F, H, W)`` and captions. A pair shows the same object on the same path; only the frame
        order and the direction word differ, so only the caption's direction can tell their noise apart. A
        dropped caption stays dropped; a reversal whose prompt is not in this split (a held-out triple) is
        replaced by the clip itself, so no held-out combination is ever trained on.

        Raises:
            ValueError: with a trail (``config.trail_frames > 0``), whose reversal is not a clip of this world.
        """
        if self.config.trail_frames > 0:
            raise ValueError("reversal pairs need a world without trails: a reversed trail points ahead")
        specs = [self.spec(i) for i in range(start, start + n_pairs)]
        captions = [self.caption(i) for i in range(start, start + n_pairs)]
        backwards = [reversed_spec(s) for s in specs]
        backwards = [b if b.prompt in self.prompts else s for s, b in zip(specs, backwards, strict=True)]
        back_captions = [c and b.prompt for c, b in zip(captions, backwards, strict=True)]
        clips = [render_clip(s, self.config) for s in specs + backwards]
        return torch.stack(clips), captions + back_captions


def frame_count_motion(spec: ClipSpec, config: ShapeWorldConfig = ShapeWorldConfig()) -> float:
    """Pixels the centre moves per frame (for documentation / sanity checks)."""
    return spec.travel / max(config.num_frames - 1, 1)


def fill_ratio(shape: str) -> float:
    """Area of the shape over the area of its bounding box (pi/4, 1 or 1/2)."""
    return {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}[shape]
