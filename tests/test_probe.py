"""Pixel probe: ~100% on ground-truth shape-world clips, and it really reads the pixels."""

import numpy as np
import pytest
import torch

from perflow_video.toy.probe import axis_accuracy, probe_accuracy, probe_clip, score_clip
from perflow_video.toy.shape_world import (
    ALL_PROMPTS,
    ClipSpec,
    ShapeWorld,
    ShapeWorldConfig,
    render_clip,
    reversed_spec,
)
from perflow_video.toy.toy_clips import BACKGROUND, COLORS, DIRECTIONS, SHAPES


def test_probe_reads_every_attribute_of_ground_truth_clips():
    w = ShapeWorld("all", seed=11)
    n = 2 * len(ALL_PROMPTS)  # every prompt twice, random sizes / speeds / positions
    acc = probe_accuracy((w.clip(i) for i in range(n)), [w.spec(i).prompt for i in range(n)])
    assert acc["n"] == n
    assert acc["color"] == acc["shape"] == acc["direction"] == acc["all"] == 1.0


def test_probe_is_deterministic_and_takes_uint8_frames():
    w = ShapeWorld("all", seed=0)
    clip = w.clip(3)
    u8 = ((clip + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).numpy()
    a, b, c = probe_clip(clip), probe_clip(clip), probe_clip(u8)
    assert a == b
    assert (a.color, a.shape, a.direction) == (c.color, c.shape, c.direction)
    assert (a.color, a.shape, a.direction) == (w.spec(3).color, w.spec(3).shape, w.spec(3).direction)


def test_fill_ratios_are_separated():
    w = ShapeWorld("all", seed=5)
    ratios = {s: [] for s in SHAPES}
    for i in range(90):
        ratios[w.spec(i).shape].append(probe_clip(w.clip(i)).fill_ratio)
    assert max(ratios["triangle"]) < 0.65 < min(ratios["circle"])
    assert max(ratios["circle"]) < 0.85 < min(ratios["square"])
    assert abs(np.median(ratios["circle"]) - np.pi / 4) < 0.03


def test_speed_matches_the_rendered_motion():
    cfg = ShapeWorldConfig()
    spec = ClipSpec("red", "square", "right", 5.0, (16.0, 8.0), 15.0)
    r = probe_clip(render_clip(spec, cfg))
    assert r.direction == "right"
    assert abs(r.speed - 15.0 / (cfg.num_frames - 1)) < 0.05


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_wrong_caption_scores_wrong(direction):
    start = {"left": (16.0, 24.0), "right": (16.0, 8.0), "up": (24.0, 16.0), "down": (8.0, 16.0)}[direction]
    spec = ClipSpec("blue", "circle", direction, 6.0, start, 12.0)
    clip = render_clip(spec)
    assert score_clip(clip, f"a blue circle moving {direction}") == {
        "color": True,
        "shape": True,
        "direction": True,
    }
    other = [d for d in DIRECTIONS if d != direction][0]
    assert score_clip(clip, f"a green triangle moving {other}") == {
        "color": False,
        "shape": False,
        "direction": False,
    }


def test_static_and_empty_clips_read_none():
    static = render_clip(ClipSpec("white", "square", "right", 6.0, (16.0, 16.0), 0.0))
    r = probe_clip(static)
    assert (r.color, r.shape, r.direction) == ("white", "square", "none")
    empty = torch.tensor(BACKGROUND, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 16, 32, 32) / 127.5 - 1
    r = probe_clip(empty)
    assert (r.color, r.shape, r.direction, r.object_frames) == ("none", "none", "none", 0)


def test_probe_survives_mild_noise_like_a_decoder_makes():
    w = ShapeWorld("all", seed=21)
    g = torch.Generator().manual_seed(0)
    clips = [w.clip(i) for i in range(40)]
    clips = [(c + 0.04 * torch.randn(c.shape, generator=g)).clamp(-1, 1) for c in clips]
    acc = probe_accuracy(clips, [w.spec(i).prompt for i in range(40)])
    assert acc["all"] >= 0.95


def test_every_palette_colour_is_told_apart():
    for k, color in enumerate(COLORS):
        spec = ClipSpec(color, SHAPES[k % 3], "down", 5.0, (8.0, 16.0), 14.0)
        assert probe_clip(render_clip(spec)).color == color


def test_probe_rejects_bad_layouts():
    with pytest.raises(ValueError):
        probe_clip(torch.zeros(16, 3, 32, 32))
    with pytest.raises(ValueError):
        probe_accuracy([], [])


def test_axis_accuracy_ignores_the_sign_but_not_the_axis_or_a_static_clip():
    w = ShapeWorld("all", seed=2)
    specs = [w.spec(i) for i in range(12)]
    prompts = [s.prompt for s in specs]
    assert axis_accuracy([render_clip(s) for s in specs], prompts) == 1.0
    backwards = [render_clip(reversed_spec(s)) for s in specs]  # the right axis, the wrong sign
    assert axis_accuracy(backwards, prompts) == 1.0 and probe_accuracy(backwards, prompts)["direction"] == 0.0
    turned = {"left": "up", "right": "down", "up": "left", "down": "right"}
    wrong_axis = [p.replace(p.split()[-1], turned[p.split()[-1]]) for p in prompts]
    assert axis_accuracy([render_clip(s) for s in specs], wrong_axis) == 0.0
    static = render_clip(ClipSpec("white", "square", "right", 6.0, (16.0, 16.0), 0.0))
    assert axis_accuracy([static], ["a white square moving right"]) == 0.0
