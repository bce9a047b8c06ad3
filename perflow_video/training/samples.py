"""4-step samples of the student through the family's own diffusers pipeline and our scheduler."""

from __future__ import annotations

from pathlib import Path

import torch

from perflow_video.families import FamilyModels, ModelFamily
from perflow_video.generation.prompts import slug
from perflow_video.scheduler import PeRFlowScheduler


@torch.no_grad()
def write_samples(
    family: ModelFamily,
    models: FamilyModels,
    student: torch.nn.Module,
    scheduler: PeRFlowScheduler,
    prompts: list[str],
    out_dir: str | Path,
    resolution: int,
    num_inference_steps: int,
    guidance_scale: float,
    sample_format: str,
    seed: int,
) -> list[Path]:
    """Generate one sample per prompt (same seed each time, so samples over training are comparable).

    Clips (``sample_format``: gif | mp4) or PNG images, as the family writes them.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = family.pipeline(models, student, scheduler)
    was_training = student.training
    student.eval()
    written = []
    try:
        for i, prompt in enumerate(prompts):
            request = dict(
                prompt=prompt,
                height=resolution,
                width=resolution,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=torch.Generator(device="cpu").manual_seed(seed + i),
            )
            stem = out_dir / f"{i:02d}_{slug(prompt)}"
            written.append(family.write_sample(models, pipe, request, stem, sample_format))
    finally:
        student.train(was_training)
    return written
