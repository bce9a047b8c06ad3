"""The rows of the evidence table: which sampler, which model, which guidance, from which noise.

* Clips are :class:`Item` s, (prompt, seed); each item's initial noise is a pure function of the item, so
  every row, every step count and every rerun starts a clip from the same noise.
* A :class:`SamplerSpec` names one sampling configuration: the teacher with one of diffusers' own schedulers
  (DDIM, DPM-Solver++ 2M, Euler, UniPC; configured from the teacher's scheduler config with a timestep
  spacing), or a student with its run's PeRFlowScheduler; a guidance w and a step count.
* :class:`SampleStore` samples specs over items in batches with :func:`~.sampling.sample_latents`, keeps
  every result, counts UNet evaluations per clip (a forward hook: a CFG batch of 2B counts 2 per clip) and
  times them. Teacher samples are cached on disk under the teacher's content fingerprint, so a rerun (a
  new student, more prompts) only samples what is new; the teacher's 100-step references among them.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from torch import Tensor
from tqdm import tqdm

from perflow_video.atomic_files import atomic_destination
from perflow_video.evaluation.evidence_models import StudentRun, Teacher
from perflow_video.evaluation.sampling import sample_latents
from perflow_video.method.teacher_solver import Conditioning
from perflow_video.toy.shape_world import ALL_PROMPTS

TEACHER = "teacher"
#: The training-free samplers a user would pick instead (diffusers' classes), by row kind.
TEACHER_SAMPLERS = {
    "ddim": DDIMScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "unipc": UniPCMultistepScheduler,
}
SAMPLER_LABELS = {
    "ddim": "DDIM",
    "dpm++2m": "DPM++ 2M",
    "euler": "Euler",
    "unipc": "UniPC",
    "perflow": "PeRFlow",
}
SPACINGS = ("linspace", "leading", "trailing")
REFERENCE_SPACING = "trailing"  # DDIM-100 on the window grid: the recipe study's reference (docs/evidence.md)


@dataclass(frozen=True)
class Item:
    """One clip of the evaluation: a prompt and a seed."""

    prompt: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.seed}:{self.prompt}"

    def noise(self, shape: Sequence[int]) -> Tensor:
        """The item's initial noise, (C, F, h, w): seeded by (seed, prompt) only."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(self.prompt.encode()))
        return torch.randn(tuple(shape), generator=gen)


def spread(total: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(total)`` (all of them when n >= total)."""
    if n >= total:
        return list(range(total))
    return [(i * total) // n for i in range(n)]


def select_prompts(value: str) -> list[str]:
    """``all`` -> the 72 shape-world prompts; ``N`` -> N of them spread over colours, shapes, directions."""
    if value == "all":
        return list(ALL_PROMPTS)
    n = int(value)
    if not 1 <= n <= len(ALL_PROMPTS):
        raise ValueError(f"--prompts must be 'all' or 1..{len(ALL_PROMPTS)}, got {value!r}")
    # ALL_PROMPTS is colour-major (12 a colour, then 4 a shape): stride 13 (coprime with 72) changes the colour
    # at every step and walks shapes and directions too, so a few prompts already cover every attribute.
    return [ALL_PROMPTS[(i * 13) % len(ALL_PROMPTS)] for i in range(n)]


def make_items(prompts: Sequence[str], seeds: int) -> list[Item]:
    """Prompt-major: every seed of the first prompt, then of the next ..."""
    return [Item(p, s) for p in prompts for s in range(seeds)]


def subset(items: Sequence[Item], n: int) -> list[Item]:
    """``n`` items spread over ``items`` (prompt-major, so different prompts first)."""
    return [items[i] for i in spread(len(items), n)]


@dataclass(frozen=True)
class SamplerSpec:
    """One sampling configuration: ``model`` (``teacher`` or a student's name) sampled by ``kind`` (a key of
    :data:`TEACHER_SAMPLERS`, or ``perflow``) with ``spacing``, CFG ``guidance`` and ``steps`` steps."""

    model: str
    kind: str
    spacing: str | None
    guidance: float
    steps: int

    @property
    def label(self) -> str:
        name = SAMPLER_LABELS[self.kind]
        return f"{name}-{self.steps}" if self.model == TEACHER else f"{name}-{self.steps} {self.model}"

    def file_stem(self) -> str:
        return f"{self.kind}-{self.spacing}-n{self.steps}-w{self.guidance:g}".replace("+", "p")


def reference_spec(guidance: float, steps: int) -> SamplerSpec:
    """The teacher's many-step DDIM output at ``guidance``: what every row is compared with."""
    return SamplerSpec(TEACHER, "ddim", REFERENCE_SPACING, guidance, steps)


def teacher_scheduler(kind: str, spacing: str, teacher_config: dict):
    """A fresh diffusers scheduler of ``kind`` configured from the teacher's own config (betas, prediction
    type), with ``spacing``; DPM-Solver++ is the 2nd-order multistep ``dpmsolver++`` (2M)."""
    cls = TEACHER_SAMPLERS[kind]
    if kind == "dpm++2m":
        return cls.from_config(
            teacher_config, timestep_spacing=spacing, algorithm_type="dpmsolver++", solver_order=2
        )
    return cls.from_config(teacher_config, timestep_spacing=spacing)


class EvalCounter:
    """Counts UNet evaluations (batch rows) of a module through a forward pre-hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.rows = 0
        self._handle = module.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.rows += int(sample.shape[0])

    def close(self) -> None:
        self._handle.remove()


@dataclass
class SpecRecord:
    """What a spec produced: latents per item key, and what they cost (as first measured)."""

    latents: dict[str, Tensor]
    seconds: float = 0.0  # wall clock
    cpu_seconds: float = 0.0  # this process's CPU time (what a shared machine's load does not inflate)
    clips: int = 0
    unet_rows: int = 0

    def timing(self) -> dict:
        clips = max(self.clips, 1)
        return {"seconds_per_clip": self.seconds / clips, "cpu_seconds_per_clip": self.cpu_seconds / clips,
                "unet_evals_per_clip": self.unet_rows / clips}  # fmt: skip


class SampleStore:
    """Samples :class:`SamplerSpec` s over items on demand and keeps the results (see the module docstring).

    Args:
        teacher: the teacher (its UNet samples ``model == "teacher"`` specs; its text encoder conditions all).
        students: the students by name.
        batch: clips per sampling batch.
        cache_dir: where teacher samples are cached (a folder per teacher fingerprint); None: no cache.
        progress: show a progress bar per request.
    """

    def __init__(
        self,
        teacher: Teacher,
        students: dict[str, StudentRun],
        batch: int,
        cache_dir: Path | None,
        progress: bool,
    ) -> None:
        self.teacher, self.students, self.batch, self.progress = teacher, students, batch, progress
        self.cache_dir = None if cache_dir is None else Path(cache_dir) / teacher.fingerprint
        self.records: dict[SamplerSpec, SpecRecord] = {}
        self._uncond = teacher.conditioning([""])

    def latents(self, spec: SamplerSpec, items: Sequence[Item]) -> Tensor:
        """(N, C, F, h, w) samples of ``spec`` for ``items``, sampling only those not yet known."""
        record = self._record(spec)
        missing = [it for it in dict.fromkeys(items) if it.key not in record.latents]
        if missing:
            self._sample(spec, missing, record)
            self._save(spec, record)
        return torch.stack([record.latents[it.key] for it in items])

    def timing(self, spec: SamplerSpec) -> dict:
        return self.records[spec].timing()

    def unconditional(self, n: int) -> Conditioning:
        """The empty prompt's conditioning for ``n`` clips."""
        return self._uncond.map(lambda x: x.repeat(n, *[1] * (x.ndim - 1)))

    def total_cost(self) -> dict:
        """Seconds and clip-evaluations of every spec sampled or loaded (as first measured)."""
        recs = self.records.values()
        return {"seconds": sum(r.seconds for r in recs), "cpu_seconds": sum(r.cpu_seconds for r in recs),
                "unet_evals": sum(r.unet_rows for r in recs)}  # fmt: skip

    def _model_and_scheduler(self, spec: SamplerSpec) -> tuple[torch.nn.Module, Callable[[], object]]:
        if spec.model == TEACHER:
            return self.teacher.unet, lambda: teacher_scheduler(
                spec.kind, spec.spacing, self.teacher.scheduler_config
            )
        student = self.students[spec.model]
        return student.unet, student.scheduler

    def _sample(self, spec: SamplerSpec, items: list[Item], record: SpecRecord) -> None:
        unet, make_scheduler = self._model_and_scheduler(spec)
        shape = self.teacher.latent_shape()
        batches = [items[i : i + self.batch] for i in range(0, len(items), self.batch)]
        bar = tqdm(batches, desc=f"{spec.label} w={spec.guidance:g}", unit="batch", disable=not self.progress,
                   leave=False)  # fmt: skip
        for part in bar:
            noise = torch.stack([it.noise(shape) for it in part])
            cond = self.teacher.conditioning([it.prompt for it in part])
            uncond = self.unconditional(len(part))
            counter = EvalCounter(unet)
            start, cpu_start = time.perf_counter(), time.process_time()
            try:
                out = sample_latents(unet, make_scheduler(), noise, cond, uncond, spec.steps, spec.guidance)
            finally:
                counter.close()
            record.seconds += time.perf_counter() - start
            record.cpu_seconds += time.process_time() - cpu_start
            record.clips += len(part)
            record.unet_rows += counter.rows
            record.latents.update({it.key: z for it, z in zip(part, out, strict=True)})

    def _path(self, spec: SamplerSpec) -> Path | None:
        if self.cache_dir is None or spec.model != TEACHER:
            return None
        return self.cache_dir / f"{spec.file_stem()}-f{self.teacher.latent_shape()[1]}.pt"

    def _record(self, spec: SamplerSpec) -> SpecRecord:
        if spec not in self.records:
            path = self._path(spec)
            self.records[spec] = SpecRecord(**torch.load(path)) if path and path.is_file() else SpecRecord({})
        return self.records[spec]

    def _save(self, spec: SamplerSpec, record: SpecRecord) -> None:
        path = self._path(spec)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_destination(path) as tmp:
            torch.save(vars(record), tmp)
