"""Shape world: deterministic per (seed, index), all 72 prompts, a clean held-out split, motion in bounds."""

import numpy as np
import pytest
import torch

from perflow_video.toy.shape_world import (
    ALL_PROMPTS,
    BACKGROUND,
    DIRECTION_VECTORS,
    HELD_OUT,
    ShapeWorld,
    ShapeWorldConfig,
    parse_prompt,
    prompt_of,
    render_clip,
    reversed_spec,
)
from perflow_video.toy.toy_clips import COLORS, DIRECTIONS, SHAPES


def test_vocabulary_gives_72_distinct_prompts_that_parse_back():
    assert len(ALL_PROMPTS) == len(set(ALL_PROMPTS)) == 6 * 3 * 4 == 72
    for p in ALL_PROMPTS:
        assert prompt_of(*parse_prompt(p)) == p
    with pytest.raises(ValueError):
        parse_prompt("a red circle moving sideways")
    with pytest.raises(ValueError):
        parse_prompt("red circle moving left")


def test_held_out_split_is_6_prompts_whose_words_all_stay_in_training():
    train = ShapeWorld("train").prompts
    assert len(HELD_OUT) == 6 and len(set(HELD_OUT)) == 6
    assert not set(train) & set(HELD_OUT)
    assert set(train) | set(HELD_OUT) == set(ALL_PROMPTS)
    words = {w for p in train for w in parse_prompt(p)}
    assert words == set(COLORS) | set(SHAPES) | set(DIRECTIONS)
    assert ShapeWorld("held_out").prompts == HELD_OUT
    with pytest.raises(ValueError):
        ShapeWorld("test")


def test_same_seed_and_index_same_clip_whatever_was_drawn_before():
    a, b = ShapeWorld(seed=3), ShapeWorld(seed=3)
    for i in (0, 17, 65, 66, 1000):
        b.clip(i + 1)  # drawing other clips in between changes nothing
        assert a.spec(i) == b.spec(i)
        assert torch.equal(a.clip(i), b.clip(i))
    other = ShapeWorld(seed=4)
    assert any(a.spec(i) != other.spec(i) for i in range(5))


def test_prompts_are_balanced_every_block_holds_each_training_prompt_once():
    w = ShapeWorld("train", seed=0)
    n = len(w.prompts)
    for block in range(3):
        seen = [w.spec(block * n + k).prompt for k in range(n)]
        assert sorted(seen) == sorted(w.prompts)
    orders = [[w.prompt_index(block * n + k) for k in range(n)] for block in range(2)]
    assert orders[0] != orders[1]  # a new shuffle per block


def test_all_72_prompts_are_drawn_by_the_all_split():
    w = ShapeWorld("all", seed=1)
    assert {w.spec(i).prompt for i in range(72)} == set(ALL_PROMPTS)


def test_parameters_vary_within_bounds_and_the_shape_stays_inside_the_frame():
    cfg = ShapeWorldConfig()
    w = ShapeWorld("all", seed=0, config=cfg)
    radii, travels = [], []
    for i in range(300):
        s = w.spec(i)
        assert cfg.min_radius <= s.radius <= cfg.max_radius
        assert cfg.min_travel <= s.travel <= cfg.max_travel
        for t in (0.0, 1.0):
            cy, cx = s.center(t)
            for c in (cy, cx):
                assert s.radius + cfg.margin - 1e-9 <= c <= cfg.size - s.radius - cfg.margin + 1e-9
        radii.append(s.radius)
        travels.append(s.travel)
    assert np.ptp(radii) > 0.6 * (cfg.max_radius - cfg.min_radius)
    assert np.ptp(travels) > 0.5 * (cfg.max_travel - cfg.min_travel)


def test_clip_layout_range_background_and_colour():
    w = ShapeWorld("all", seed=0)
    clip = w.clip(5)
    cfg = w.config
    assert clip.shape == (3, cfg.num_frames, cfg.size, cfg.size) and clip.dtype == torch.float32
    assert clip.min() >= -1 and clip.max() <= 1
    rgb = (clip + 1) * 127.5
    bg = torch.tensor(BACKGROUND, dtype=torch.float32).view(3, 1, 1, 1)
    d = (rgb - bg).norm(dim=0)
    assert (d < 1e-3).float().mean() > 0.5  # mostly background
    fg = torch.tensor(COLORS[w.spec(5).color], dtype=torch.float32)
    full = rgb[:, d > (fg - bg.view(3)).norm() - 1e-3]  # fully covered pixels are exactly the colour
    assert full.shape[1] > 10
    assert torch.allclose(full, fg.view(3, 1).expand_as(full), atol=1e-3)


def _centroids(clip):
    d = ((clip + 1) * 127.5 - torch.tensor(BACKGROUND).view(3, 1, 1, 1)).norm(dim=0)
    ys, xs = torch.meshgrid(torch.arange(d.shape[1]), torch.arange(d.shape[2]), indexing="ij")
    m = d.sum(dim=(1, 2))
    return (d * ys).sum(dim=(1, 2)) / m, (d * xs).sum(dim=(1, 2)) / m


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_motion_is_obvious_and_in_the_captioned_direction(direction):
    w = ShapeWorld("all", seed=2)
    idx = [i for i in range(144) if w.spec(i).direction == direction][:6]
    for i in idx:
        cy, cx = _centroids(w.clip(i))
        dy, dx = float(cy[-1] - cy[0]), float(cx[-1] - cx[0])
        vy, vx = DIRECTION_VECTORS[direction]
        along, across = dy * vy + dx * vx, abs(dy * vx) + abs(dx * vy)
        assert along > 0.9 * w.config.min_travel  # moves >= ~10 px of a 32 px frame
        assert across < 0.5
        assert abs(along - w.spec(i).travel) < 1.0


def test_render_is_antialiased_and_sub_pixel():
    w = ShapeWorld("all", seed=0)
    spec = w.spec(0)
    clip = render_clip(spec)
    d = ((clip + 1) * 127.5 - torch.tensor(BACKGROUND).view(3, 1, 1, 1)).norm(dim=0)
    partial = ((d > 1) & (d < d.max() - 1)).sum()
    assert partial > 0  # edge pixels are blends


def test_prompt_dropout_is_seeded_and_near_its_rate():
    w = ShapeWorld("train", seed=0, drop_prompt=0.1)
    caps = [w.caption(i) for i in range(2000)]
    rate = caps.count("") / len(caps)
    assert 0.07 < rate < 0.13
    assert caps == [ShapeWorld("train", seed=0, drop_prompt=0.1).caption(i) for i in range(2000)]
    assert all(c == "" or c == w.spec(i).prompt for i, c in enumerate(caps))
    assert "" not in [ShapeWorld("train", seed=0).caption(i) for i in range(200)]


def test_batch_stacks_clips_and_captions():
    w = ShapeWorld("train", seed=0)
    x, caps = w.batch(10, 3)
    assert x.shape == (3, 3, 16, 32, 32)
    assert torch.equal(x[1], w.clip(11)) and caps == [w.caption(i) for i in (10, 11, 12)]


def test_frame_count_and_size_are_configurable():
    cfg = ShapeWorldConfig(size=48, num_frames=8)
    clip = ShapeWorld("all", config=cfg).clip(0)
    assert clip.shape == (3, 8, 48, 48)
    with pytest.raises(ValueError):
        ShapeWorld("all", config=ShapeWorldConfig(size=16)).spec(0)  # path cannot fit


def test_a_reversed_clip_is_the_clip_played_backwards_with_the_opposite_direction():
    world = ShapeWorld("all", seed=3)
    for i in range(12):
        spec = world.spec(i)
        back = reversed_spec(spec)
        twice = reversed_spec(back)
        assert back.direction != spec.direction and twice.direction == spec.direction
        assert np.allclose(twice.start, spec.start) and back.start == spec.center(1.0)
        dy, dx = DIRECTION_VECTORS[spec.direction]
        assert DIRECTION_VECTORS[back.direction] == (-dy, -dx)
        torch.testing.assert_close(render_clip(back), render_clip(spec).flip(1), atol=1e-5, rtol=0)


def test_reversal_pairs_contrast_only_the_direction_and_never_train_a_held_out_triple():
    world = ShapeWorld("train", seed=1, drop_prompt=0.3)
    clips, captions = world.reversal_pairs(0, 40)
    assert clips.shape[0] == len(captions) == 80
    assert not set(captions) & set(HELD_OUT)
    contrasted = 0
    for k in range(40):
        first, second = captions[k], captions[40 + k]
        if first == "":
            assert second == ""
            continue
        if second == first:  # the reversal would have been a held-out prompt: the clip itself
            torch.testing.assert_close(clips[40 + k], clips[k])
            continue
        contrasted += 1
        assert parse_prompt(first)[:2] == parse_prompt(second)[:2]
        torch.testing.assert_close(clips[40 + k], clips[k].flip(1), atol=1e-5, rtol=0)
    assert contrasted >= 20


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_a_one_direction_world_holds_exactly_that_directions_prompts_of_its_split(direction):
    world = ShapeWorld("train", seed=3, direction=direction)
    expected = {p for p in ALL_PROMPTS if p not in HELD_OUT and parse_prompt(p)[2] == direction}
    assert set(world.prompts) == expected and len(world.prompts) == len(expected)
    assert {world.spec(i).direction for i in range(40)} == {direction}
    with pytest.raises(ValueError, match="direction"):
        ShapeWorld("train", direction="sideways")


def _offset_along_motion(frame: torch.Tensor, spec, t: float) -> float:
    """Brightness-weighted centroid of one frame minus the shape's centre, along the motion direction (px)."""
    weight = (frame + 1.0).sum(dim=0) - (torch.tensor(BACKGROUND) / 127.5).sum()  # above the background
    ys, xs = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    cy, cx = spec.center(t)
    dy, dx = DIRECTION_VECTORS[spec.direction]
    centroid = ((weight * ys).sum() / weight.sum(), (weight * xs).sum() / weight.sum())
    return float((centroid[0] - cy) * dy + (centroid[1] - cx) * dx)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_a_trail_shows_the_direction_in_every_single_frame_and_none_is_drawn_by_default(direction):
    trail = ShapeWorldConfig(trail_frames=4.0)
    spec = next(
        s for s in (ShapeWorld("all", seed=5).spec(i) for i in range(200)) if s.direction == direction
    )
    plain, trailed = render_clip(spec), render_clip(spec, trail)
    assert torch.equal(plain, render_clip(spec, ShapeWorldConfig(trail_frames=0.0)))
    for f in range(16):
        t = f / 15
        # The trail moves the frame's centroid behind the shape's own, even in the first frame (whose
        # trail may leave the frame).
        assert _offset_along_motion(trailed[:, f], spec, t) < _offset_along_motion(plain[:, f], spec, t) - 0.1
    # The trail is drawn behind the shape: pixels the shape covers fully keep exactly its colour.
    fg = (torch.tensor(COLORS[spec.color], dtype=torch.float32) / 127.5 - 1.0).view(3, 1, 1, 1)
    full = (plain - fg).abs().amax(dim=0) < 1e-6
    assert full.any() and torch.equal(trailed[:, full], plain[:, full])
    assert not torch.equal(trailed, plain)


def test_the_probe_reads_trailed_ground_truth_clips_perfectly():
    from perflow_video.toy.probe import probe_accuracy

    world = ShapeWorld("all", seed=9, config=ShapeWorldConfig(trail_frames=4.0))
    clips = [world.clip(i) for i in range(72)]
    acc = probe_accuracy(clips, [world.spec(i).prompt for i in range(72)])
    assert acc["all"] == 1.0


def test_reversal_pairs_are_refused_in_a_world_with_trails():
    world = ShapeWorld("train", config=ShapeWorldConfig(trail_frames=3.0))
    with pytest.raises(ValueError, match="trail"):
        world.reversal_pairs(0, 2)
