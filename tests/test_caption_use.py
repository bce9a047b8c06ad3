"""The caption-use diagnostic (evaluation/caption_use.py, scripts/diagnose_caption_use.py) on the shipped teacher."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from perflow_video.evaluation.caption_use import SWAPS, swap_caption
from perflow_video.toy.shape_world import ALL_PROMPTS, parse_prompt


@pytest.mark.parametrize("attribute", ["colour", "direction"])
def test_colour_and_direction_swaps_are_involutions_that_change_one_word(attribute):
    index = {"colour": 0, "shape": 1, "direction": 2}[attribute]
    for prompt in ALL_PROMPTS:
        swapped = swap_caption(prompt, attribute)
        a, b = parse_prompt(prompt), parse_prompt(swapped)
        assert a[index] != b[index] and [x for i, x in enumerate(a) if i != index] == [
            x for i, x in enumerate(b) if i != index
        ]
        assert swap_caption(swapped, attribute) == prompt
    assert set(SWAPS) == {"colour", "shape", "direction"}


def test_the_shipped_teacher_reads_colour_and_shape_but_not_direction(tmp_path: Path):
    """docs/tiny_teacher.md (sixth session): the padding carries colour and shape, not the direction word,
    so the UNet's loss falls with the right colour / shape and does not move with the direction."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "diagnose_caption_use.py"
    spec = importlib.util.spec_from_file_location("diagnose_caption_use", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "use.json"
    assert (
        script.main(["--clips", "6", "--probe-prompts", "3", "--probe-steps", "20", "--out", str(out)]) == 0
    )
    use = json.loads(out.read_text())
    for attribute in ("colour", "shape"):
        assert use[attribute]["padding_difference"] > 50 * use["direction"]["padding_difference"]
        assert use[attribute]["swap_loss_gap"] > 1e-3
        assert min(use[attribute]["epsilon_change"].values()) > 20 * max(
            use["direction"]["epsilon_change"].values()
        )
    assert abs(use["direction"]["swap_loss_gap"]) < 1e-4
    assert use["probe"]["n"] == 3 and use["probe"]["color"] >= 2 / 3  # its own 20-step clips show the colour
