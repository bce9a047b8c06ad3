"""The cells of the evidence table: how a row's clips compare with the teacher's reference clips.

Per clip (the reference is the teacher's 100-step DDIM output from the same noise, at the guidance the row
must be compared with):

* **latent RMS**: root-mean-square latent difference to the reference (:func:`~.sampling.per_sample_rms`);
* **PSNR**: of the decoded clip against the decoded reference, pixels on a [0, 1] scale, capped at
  :data:`PSNR_CAP` dB (identical clips);
* **probe**: the pixel probe's reading of colour, shape and direction against the prompt
  (:func:`~perflow_video.toy.probe.score_clip`);
* **frame change**: mean over consecutive frame pairs of their pixel RMS difference ([0, 1] scale).

A cell averages them over its clips (the latent RMS also as the median over its clips: a few clips whose
few-step sample lands in another mode than the reference, e.g. the object elsewhere, dominate the mean);
its temporal figure is the row's mean frame change over the
reference's (1 = as smooth as the teacher, < 1 stiller or blurrier, > 1 flickering), and its diversity the
mean pairwise latent RMS between clips of one prompt from different seeds (None with one seed).
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from perflow_video.evaluation.evidence_samplers import Item
from perflow_video.evaluation.sampling import per_sample_rms
from perflow_video.toy.probe import ATTRIBUTES, score_clip

PSNR_CAP = 100.0  # dB: the PSNR of identical clips (an exact match) instead of infinity


def clip_psnr(pixels: Tensor, reference: Tensor) -> Tensor:
    """(N,) PSNR in dB of clips in [-1, 1] against reference clips, on the [0, 1] scale, capped."""
    mse = ((pixels.float() - reference.float()) / 2).pow(2).reshape(pixels.shape[0], -1).mean(dim=1)
    psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-30))
    return psnr.clamp(max=PSNR_CAP)


def frame_change(pixels: Tensor) -> Tensor:
    """(N,) mean pixel RMS difference between consecutive frames of (N, 3, F, H, W) clips in [-1, 1]
    ([0, 1] scale)."""
    diff = (pixels[:, :, 1:].float() - pixels[:, :, :-1].float()) / 2
    return diff.pow(2).mean(dim=(1, 3, 4)).sqrt().mean(dim=1)


def probe_hits(pixels: Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Share of clips whose colour / shape / direction the probe reads as the prompt says, and all three."""
    scores = [score_clip(clip, prompt) for clip, prompt in zip(pixels, prompts, strict=True)]
    hits = {a: sum(s[a] for s in scores) / len(scores) for a in ATTRIBUTES}
    hits["all"] = sum(all(s.values()) for s in scores) / len(scores)
    return hits


def diversity(latents: Tensor, items: Sequence[Item]) -> float | None:
    """Mean pairwise latent RMS between clips of the same prompt (different seeds); None without pairs."""
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        by_prompt[item.prompt].append(i)
    distances = [
        float(per_sample_rms(latents[a : a + 1], latents[b : b + 1])[0])
        for rows in by_prompt.values()
        for a, b in itertools.combinations(rows, 2)
    ]
    return sum(distances) / len(distances) if distances else None


@dataclass
class Reference:
    """The teacher's reference clips at one guidance: latents and decoded pixels, item-aligned."""

    guidance: float
    latents: Tensor
    pixels: Tensor
    items: list[Item]

    def rows_of(self, items: Sequence[Item]) -> list[int]:
        index = {it.key: i for i, it in enumerate(self.items)}
        return [index[it.key] for it in items]

    def summary(self) -> dict:
        """What the reference itself scores: probe accuracy, frame change, diversity."""
        prompts = [it.prompt for it in self.items]
        return {
            "guidance": self.guidance,
            "n": len(self.items),
            **probe_hits(self.pixels, prompts),
            "frame_change": float(frame_change(self.pixels).mean()),
            "diversity": diversity(self.latents, self.items),
        }


def latent_cell(latents: Tensor, reference: Reference, items: Sequence[Item]) -> dict:
    """Latent-only cell (the DDIM ladder): mean and median RMS to the reference."""
    rms = per_sample_rms(latents, reference.latents[reference.rows_of(items)])
    return {"rms": float(rms.mean()), "rms_median": float(rms.median()), "n": len(items)}


def full_cell(latents: Tensor, pixels: Tensor, reference: Reference, items: Sequence[Item]) -> dict:
    """Every figure of a cell (see the module docstring) for a row's clips of ``items``."""
    rows = reference.rows_of(items)
    ref_pixels = reference.pixels[rows]
    ref_change = float(frame_change(ref_pixels).mean())
    change = float(frame_change(pixels).mean())
    return {
        **latent_cell(latents, reference, items),
        "psnr": float(clip_psnr(pixels, ref_pixels).mean()),
        **probe_hits(pixels, [it.prompt for it in items]),
        "temporal": change / ref_change if ref_change > 0 else math.nan,
        "frame_change": change,
        "diversity": diversity(latents, items),
        "reference_guidance": reference.guidance,
    }


def fewest_matching_steps(ladder: dict[int, float], target: float) -> int | None:
    """The smallest step count whose RMS is at most ``target`` (None when no count of the ladder does)."""
    hits = [steps for steps, rms in sorted(ladder.items()) if rms <= target]
    return hits[0] if hits else None
