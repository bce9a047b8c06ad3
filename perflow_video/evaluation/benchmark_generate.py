"""Seconds per clip of PeRFlow's 4 steps against the teacher's DDIM 25 steps, on one diffusers pipeline.

The same ``AnimateDiffPipeline`` (same UNet, VAE, text encoder, device and dtype) samples every row; only
its scheduler changes: the student's :class:`~perflow_video.scheduler.PeRFlowScheduler`, or a
``DDIMScheduler`` on the teacher's own schedule. The UNet weights do not change what a step costs, so the
DDIM rows run the student's UNet (the teacher's architecture).

Each row: warm-up clips, then ``repeats`` timed clips; the reported split (text encoder, UNet, VAE decode,
the rest = scheduler, latents, post-processing) is that of the clip with the median total, so it adds up
to the total. ``speedup`` is the reference row's seconds over the row's; ``evaluation_limit`` the
reference row's UNet evaluations over the row's, the speed-up if nothing but the UNet cost anything.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler

from perflow_video.evaluation.benchmark_report import markdown_table
from perflow_video.evaluation.benchmark_timing import ComponentTimers, MemoryGauge, PeakMemory, stopwatch

Sampler = Literal["perflow", "ddim"]
DEFAULT_PROMPT = "a red circle moving left"


@dataclass(frozen=True)
class GenerationCase:
    """One row: which scheduler, how many steps, which CFG scale (1 = no CFG, one UNet row per step)."""

    name: str
    sampler: Sampler
    steps: int
    guidance_scale: float


def default_cases(
    perflow_steps: int = 4, perflow_cfg: float = 4.5, teacher_steps: int = 25, teacher_cfg: float = 7.5
) -> tuple[GenerationCase, ...]:
    """PeRFlow without CFG, PeRFlow with CFG w, and the teacher's DDIM with its CFG (the reference, last)."""
    return (
        GenerationCase(f"perflow {perflow_steps} steps, cfg 1", "perflow", perflow_steps, 1.0),
        GenerationCase(f"perflow {perflow_steps} steps, cfg {perflow_cfg:g}", "perflow", perflow_steps, perflow_cfg),
        GenerationCase(f"ddim {teacher_steps} steps, cfg {teacher_cfg:g}", "ddim", teacher_steps, teacher_cfg),
    )  # fmt: skip


DEFAULT_CASES = default_cases()


@dataclass(frozen=True)
class ClipSize:
    """Frames and pixel size of the clips."""

    num_frames: int
    height: int
    width: int

    def label(self) -> str:
        return f"{self.num_frames}×{self.height}×{self.width}"


@dataclass
class ClipTiming:
    """One timed clip: total seconds and its split; UNet evaluations; peak memory."""

    seconds: float
    text_seconds: float
    unet_seconds: float
    vae_decode_seconds: float
    unet_evaluations: int
    text_encoder_calls: int
    memory: PeakMemory


@dataclass
class CaseResult:
    """A row: the median clip's timing, every clip's total, the largest peak, and the ratios."""

    case: GenerationCase
    median: ClipTiming
    seconds_all: list[float]
    peak_memory_mib: float
    peak_memory_delta_mib: float
    speedup: float | None = None
    evaluation_limit: float | None = None

    def to_dict(self) -> dict:
        m = self.median
        other = m.seconds - m.text_seconds - m.unet_seconds - m.vae_decode_seconds
        return {
            **asdict(self.case),
            "unet_evaluations": m.unet_evaluations, "seconds": m.seconds, "text_seconds": m.text_seconds,
            "unet_seconds": m.unet_seconds, "vae_decode_seconds": m.vae_decode_seconds, "other_seconds": other,
            "text_encoder_calls": m.text_encoder_calls, "seconds_all": self.seconds_all,
            "peak_memory_mib": self.peak_memory_mib, "peak_memory_delta_mib": self.peak_memory_delta_mib,
            "memory_method": m.memory.method, "speedup": self.speedup, "evaluation_limit": self.evaluation_limit,
        }  # fmt: skip


def ddim_scheduler(teacher_scheduler_config: dict) -> DDIMScheduler:
    """Deterministic DDIM (eta = 0) on the teacher's noise schedule (its own betas and timestep spacing)."""
    return DDIMScheduler.from_config(teacher_scheduler_config)


def time_clip(pipe, case: GenerationCase, size: ClipSize, prompt: str, seed: int, device) -> ClipTiming:
    """Sample one clip with ``pipe`` as it is (its scheduler already set) and time it, component by component."""
    timers, gauge = ComponentTimers(torch.device(device)), MemoryGauge(device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with timers.attach(pipe.text_encoder, pipe.unet, pipe.vae), gauge.measure() as memory:
        with stopwatch(device) as total, torch.no_grad():
            pipe(
                prompt=prompt, num_frames=size.num_frames, height=size.height, width=size.width,
                num_inference_steps=case.steps, guidance_scale=case.guidance_scale, generator=generator,
                output_type="pt",
            )  # fmt: skip
    return ClipTiming(
        total[0], timers.text.seconds, timers.unet.seconds, timers.vae_decode.seconds,
        timers.unet.calls, timers.text.calls, memory[0],
    )  # fmt: skip


def measure_case(pipe, case, size: ClipSize, prompt: str, repeats: int, warmup: int, device) -> CaseResult:
    """``warmup`` untimed clips, then ``repeats`` timed ones (seeds 0, 1, ...: the same for every row)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for i in range(warmup):
        time_clip(pipe, case, size, prompt, i, device)
    clips = [time_clip(pipe, case, size, prompt, i, device) for i in range(repeats)]
    totals = [c.seconds for c in clips]
    median = clips[totals.index(statistics.median_low(totals))]
    peak = max(clips, key=lambda c: c.memory.peak_mib).memory
    delta = max(c.memory.delta_mib for c in clips)
    return CaseResult(case, median, totals, peak.peak_mib, delta)


def measure_generation(
    pipe,
    perflow_scheduler,
    teacher_scheduler_config: dict,
    size: ClipSize,
    cases: tuple[GenerationCase, ...] = DEFAULT_CASES,
    prompt: str = DEFAULT_PROMPT,
    repeats: int = 3,
    warmup: int = 1,
    device: str | torch.device = "cpu",
) -> list[CaseResult]:
    """Every case on ``pipe`` (moved to ``device`` by the caller), its scheduler swapped per case and put
    back at the end. The last case is the reference of ``speedup`` and ``evaluation_limit``."""
    schedulers = {"perflow": perflow_scheduler, "ddim": ddim_scheduler(teacher_scheduler_config)}
    original = pipe.scheduler
    results = []
    try:
        for case in cases:
            pipe.scheduler = schedulers[case.sampler]
            results.append(measure_case(pipe, case, size, prompt, repeats, warmup, device))
    finally:
        pipe.scheduler = original
    reference = results[-1]
    for row in results:
        row.speedup = reference.median.seconds / row.median.seconds
        row.evaluation_limit = reference.median.unet_evaluations / row.median.unet_evaluations
    return results


GENERATION_HEADER = (
    "size", "sampler", "UNet evals", "s / clip", "text s", "UNet s", "VAE decode s", "other s",
    "speed-up", "UNet-eval limit", "peak MiB", "Δ peak MiB",
)  # fmt: skip


def generation_rows(size: ClipSize, results: list[CaseResult]) -> list[list]:
    """Table rows (``GENERATION_HEADER``) of one clip size."""
    rows = []
    for r in results:
        d = r.to_dict()
        rows.append([
            size.label(), r.case.name, d["unet_evaluations"], d["seconds"], d["text_seconds"], d["unet_seconds"],
            d["vae_decode_seconds"], d["other_seconds"], d["speedup"], d["evaluation_limit"],
            d["peak_memory_mib"], d["peak_memory_delta_mib"],
        ])  # fmt: skip
    return rows


def generation_table(size: ClipSize, results: list[CaseResult]) -> str:
    return markdown_table(GENERATION_HEADER, generation_rows(size, results))


__all__ = [
    "DEFAULT_CASES",
    "DEFAULT_PROMPT",
    "GENERATION_HEADER",
    "CaseResult",
    "ClipSize",
    "ClipTiming",
    "GenerationCase",
    "ddim_scheduler",
    "default_cases",
    "generation_rows",
    "generation_table",
    "measure_case",
    "measure_generation",
    "time_clip",
]
