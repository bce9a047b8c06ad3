"""The caption-use diagnostic (evaluation/caption_use.py, scripts/diagnose_caption_use.py) on the shipped teacher."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from perflow_video.evaluation.caption_use import SWAPS, centroid_track_slope, frame_order_change, swap_caption
from perflow_video.tiny.teacher_models import TeacherArch, teacher_unet_motion
from perflow_video.toy.shape_world import ALL_PROMPTS, ShapeWorld, parse_prompt, render_clip, reversed_spec


@pytest.mark.parametrize("attribute", ["colour", "direction", "axis"])
def test_colour_and_direction_swaps_are_involutions_that_change_one_word(attribute):
    index = {"colour": 0, "shape": 1, "direction": 2, "axis": 2}[attribute]
    for prompt in ALL_PROMPTS:
        swapped = swap_caption(prompt, attribute)
        a, b = parse_prompt(prompt), parse_prompt(swapped)
        assert a[index] != b[index] and [x for i, x in enumerate(a) if i != index] == [
            x for i, x in enumerate(b) if i != index
        ]
        assert swap_caption(swapped, attribute) == prompt
    assert set(SWAPS) == {"colour", "shape", "direction", "axis"}


def test_the_shipped_teacher_reads_colour_and_shape_but_not_direction(tmp_path: Path):
    """docs/tiny_teacher.md (sixth session): the padding carries colour and shape, not the direction word,
    so the UNet's loss falls with the right colour / shape and does not move with the direction."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "diagnose_caption_use.py"
    spec = importlib.util.spec_from_file_location("diagnose_caption_use", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "use.json"
    assert (
        script.main(
            [
                "--clips",
                "6",
                "--probe-prompts",
                "3",
                "--probe-steps",
                "20",
                "--same-noise",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    use = json.loads(out.read_text())
    for attribute in ("colour", "shape"):
        assert use[attribute]["padding_difference"] > 50 * use["direction"]["padding_difference"]
        assert use[attribute]["swap_loss_gap"] > 1e-3
        assert min(use[attribute]["epsilon_change"].values()) > 20 * max(
            use["direction"]["epsilon_change"].values()
        )
    assert abs(use["direction"]["swap_loss_gap"]) < 1e-4 and abs(use["axis"]["swap_loss_gap"]) < 1e-4
    # the motion modules use frame order (shuffling moves epsilon) but hardly its sign (reversing does not)
    for t in ("600", "300"):
        assert use["frame_order"]["shuffled"][t] > 0.05
        assert use["frame_order"]["reversed"][t] < 0.1 * use["frame_order"]["shuffled"][t]
    # where sampling starts, its x0 moves the same way whatever the direction word; the data's mean clip does not
    assert use["x0_track"]["data_mean_clip"] > 0.8
    for t in ("999", "900", "700"):
        assert max(abs(v) for v in use["x0_track"][t].values()) < 0.02
    # the leak: from noised clips at t = 950 (5.3 % of the clip left) and 800 it reads the clip, better than the
    # clips' mean and best with its own caption
    leak = use["leak"]
    assert leak["800"]["own"] < 0.8 * leak["clips_mean"] and leak["950"]["own"] < leak["clips_mean"]
    assert leak["800"]["own"] < leak["800"]["other"] and leak["950"]["own"] < leak["950"]["other"]
    # from the same noise, "left" and "right" give clips moving the same way: the noise fixes the path
    assert use["same_noise"]["pairs"] == 4 and use["same_noise"]["same"] >= 3
    assert use["same_noise_mean_start"]["pairs"] == 4  # the start holding the direction's mean (docs figure)
    assert use["probe"]["n"] == 3 and use["probe"]["color"] >= 2 / 3  # its own 20-step clips show the colour


def test_frame_order_change_is_zero_without_motion_modules_and_not_with_them():
    """AnimateDiff's motion modules add proj_out(...) to their input: zeroed, the UNet treats frames independently
    and no reordering changes its epsilon; with random ones, the reversal does."""
    arch = TeacherArch()
    unet = teacher_unet_motion(arch, seed=1).eval()
    g = torch.Generator().manual_seed(0)
    z_t = torch.randn(2, 4, 8, arch.frame_size // 4, arch.frame_size // 4, generator=g)
    hidden = torch.randn(2, 77, arch.text_hidden, generator=g)
    reverse, shuffle = torch.arange(7, -1, -1), torch.randperm(8, generator=g)
    assert frame_order_change(unet, z_t, 500, hidden, reverse) > 1e-3
    with torch.no_grad():
        for name, module in unet.named_modules():
            if "motion_modules" in name and name.endswith("proj_out"):
                module.weight.zero_()
                module.bias.zero_()
    for order in (reverse, shuffle):
        assert frame_order_change(unet, z_t, 500, hidden, order) < 1e-5


def test_centroid_track_slope_is_the_clips_speed_along_its_direction_and_flips_when_played_backwards():
    world = ShapeWorld("all", seed=3)
    specs = [world.spec(i) for i in range(8)]
    clips = torch.stack([render_clip(s) for s in specs])
    slopes = centroid_track_slope(clips, [s.direction for s in specs])
    assert slopes == pytest.approx(torch.tensor([s.travel / 15 for s in specs]), abs=0.05)
    # the same clips scored against the opposite direction, or played backwards, move the other way
    backwards = torch.stack([render_clip(reversed_spec(s)) for s in specs])
    assert centroid_track_slope(backwards, [s.direction for s in specs]) == pytest.approx(-slopes, abs=0.05)
    static = clips[:, :, :1].expand_as(clips)
    assert centroid_track_slope(static, [s.direction for s in specs]).abs().max() < 1e-4


class _ExactV(torch.nn.Module):
    """A v-prediction UNet that knows the clips: its x0 is exact, at abar = 0 too."""

    def __init__(self, z0: torch.Tensor, alphas: torch.Tensor) -> None:
        super().__init__()
        self.z0, self.alphas = z0, alphas

    def forward(self, z_t, t, encoder_hidden_states):  # noqa: ARG002
        a = self.alphas[t].view(-1, 1, 1, 1, 1)
        eps = (z_t - a.sqrt() * self.z0) / (1 - a).sqrt()
        return type("Out", (), {"sample": a.sqrt() * eps - (1 - a).sqrt() * self.z0})()


def test_relative_x0_error_is_zero_for_exact_clips_and_the_variance_ratio_for_a_constant():
    from perflow_video.evaluation.caption_use import relative_x0_error
    from perflow_video.tiny.teacher_models import teacher_scheduler

    alphas = teacher_scheduler("zero-snr-v").alphas_cumprod
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(3, 4, 5, 8, 8, generator=g), torch.randn(3, 4, 5, 8, 8, generator=g)
    hidden = torch.zeros(3, 77, 32)
    for t in (999, 950, 300):
        assert relative_x0_error(_ExactV(z0, alphas), z0, noise, t, hidden, alphas, "v_prediction") < 1e-8
    # predicting x0 = 0 everywhere misses by mean(z0^2) / var(z0)
    zero = _ExactV(torch.zeros_like(z0), alphas)
    expected = (z0.pow(2).mean() / z0.var()).item()
    assert abs(relative_x0_error(zero, z0, noise, 999, hidden, alphas, "v_prediction") - expected) < 1e-5
