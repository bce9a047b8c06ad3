"""How few teacher evaluations a window solve needs: the study behind docs/teacher_solver.md (issue 11).

For a trained tiny AnimateDiff teacher (a diffusers-layout folder: ``vae/``, ``text_encoder/``, ``tokenizer/``,
``unet/``, ``motion_adapter/``, ``scheduler/``, as ``scripts/train_tiny_teacher.py`` writes it), this measures
the endpoint error of the window solve phi(z_s, t_s, t_e) (docs/method.md §3, step 4) for several solvers and
step counts M, against a reference solve of the same window with many DDIM steps:

* window starts as the trainer draws them: shape-world clips encoded with the teacher's VAE (posterior mean
  times the scaling factor, ``encode_pixels_to_latents``), noised to the window start,
  ``z_s = sqrt(abar_s) z_0 + sqrt(1 - abar_s) eps``; prompts of the clips with the trainer's 10 % dropout;
* the teacher guided as the trainer's solve guides it (``guidance_scale`` 1 = CFG-sync, the default recipe);
* each of the K windows separately; errors are RMS over all latent elements and samples, absolute and
  relative to the RMS displacement ``z_e_ref - z_s`` of the reference;
* the project's solvers (``solve_window(..., solver=...)``) and, for the multistep ones, diffusers'
  ``DPMSolverMultistepScheduler`` / ``UniPCMultistepScheduler`` restricted to the window
  (:func:`diffusers_window_solve`), as a cross-check of the implementation;
* the wall time of each solve at the trainer's batch size (one CPU thread).

:func:`forward_speed` times one no-grad teacher forward as it is, in ``channels_last`` memory format and
under ``torch.compile``, to see whether either is worth keeping.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from torch import Tensor

from perflow_video.evaluation.evidence_models import Teacher, load_teacher
from perflow_video.families.base import encode_pixels_to_latents
from perflow_video.method.noise_schedule import make_alphas_cumprod
from perflow_video.method.parameterization import expand_like
from perflow_video.method.teacher_solver import Conditioning, guided_eps, solve_window, solver_grid
from perflow_video.method.time_windows import abar_at, window_bounds
from perflow_video.toy.shape_world import ShapeWorld, ShapeWorldConfig

#: (solver, M, grid spacing) runs of the study: DDIM at the paper's M = 8 and below on its time-uniform grid,
#: the multistep solvers at M <= 4 on their default log-SNR grid, and DPM-Solver++ at M = 4 on the time grid
#: (which fails the multistep solvers in the last window).
DEFAULT_RUNS: tuple[tuple[str, int, str], ...] = (
    ("ddim", 2, "time"), ("ddim", 3, "time"), ("ddim", 4, "time"), ("ddim", 8, "time"),
    ("dpm++", 2, "log_snr"), ("dpm++", 3, "log_snr"), ("dpm++", 4, "log_snr"),
    ("unipc", 2, "log_snr"), ("unipc", 3, "log_snr"), ("unipc", 4, "log_snr"),
    ("dpm++", 4, "time"),
)  # fmt: skip


@dataclass
class TinyTeacher:
    """The frozen pieces of a trained tiny AnimateDiff teacher that a window solve needs (loaded through the
    animatediff family adapter, as the evidence table loads it)."""

    loaded: Teacher
    alphas_cumprod: Tensor  # (N,) float32, the teacher scheduler's abar
    beta_start: float
    beta_end: float
    beta_schedule: str
    frame_size: int

    @property
    def unet(self) -> torch.nn.Module:
        return self.loaded.unet

    @property
    def vae(self) -> AutoencoderKL:
        return self.loaded.models.vae

    @property
    def num_frames(self) -> int:
        return self.loaded.models.num_frames

    def conditioning(self, prompts: list[str]) -> Conditioning:
        """The UNetMotionModel's conditioning: the prompt embedding repeated per frame (b-major)."""
        return self.loaded.conditioning(prompts)


def load_tiny_teacher(folder: str | Path, num_frames: int = 16) -> TinyTeacher:
    """A ``scripts/train_tiny_teacher.py`` snapshot or final folder (or ``tiny-teacher``), frozen, float32,
    on the CPU."""
    loaded = load_teacher(str(folder), num_frames)
    sched = loaded.scheduler_config
    abar = make_alphas_cumprod(
        sched["num_train_timesteps"], sched["beta_start"], sched["beta_end"], sched["beta_schedule"]
    )
    vae_factor = 2 ** (len(loaded.models.vae.config.block_out_channels) - 1)
    return TinyTeacher(
        loaded=loaded,
        alphas_cumprod=abar,
        beta_start=sched["beta_start"],
        beta_end=sched["beta_end"],
        beta_schedule=sched["beta_schedule"],
        frame_size=loaded.unet.config.sample_size * vae_factor,
    )


@dataclass
class WindowStarts:
    """Clean latents, their prompts (after dropout) and one noise draw per window (trainer's step 3)."""

    z_0: Tensor  # (B, 4, F, h, w)
    prompts: list[str]
    noise: Tensor  # (K, B, 4, F, h, w)

    def z_s(self, k: int, num_windows: int, alphas_cumprod: Tensor) -> Tensor:
        """z_s = sqrt(abar_s) z_0 + sqrt(1 - abar_s) eps at the start of window k."""
        t_s = torch.full((self.z_0.shape[0],), window_bounds(k, num_windows)[0], dtype=torch.float64)
        abar_s = abar_at(t_s, alphas_cumprod).to(self.z_0.dtype)
        return (
            expand_like(abar_s.sqrt(), self.z_0) * self.z_0
            + expand_like((1.0 - abar_s).sqrt(), self.z_0) * self.noise[k]
        )


@torch.no_grad()
def window_starts(
    teacher: TinyTeacher, num_samples: int, num_windows: int, seed: int = 0, prompt_dropout: float = 0.1
) -> WindowStarts:
    """Shape-world clips (train split) encoded as the trainer encodes them, with dropped prompts and noise."""
    world = ShapeWorld(
        "train", seed=seed, config=ShapeWorldConfig(size=teacher.frame_size, num_frames=teacher.num_frames)
    )
    clips, prompts = world.batch(0, num_samples)  # (B, 3, F, H, W)
    b, _, f, h, w = clips.shape
    pixels = clips.permute(0, 2, 1, 3, 4).reshape(b * f, 3, h, w)
    latents = encode_pixels_to_latents(teacher.vae, pixels)
    z_0 = latents.reshape(b, f, *latents.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()
    gen = torch.Generator().manual_seed(seed)
    drop = torch.rand(num_samples, generator=gen) < prompt_dropout
    prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]
    noise = torch.randn((num_windows, *z_0.shape), generator=gen)
    return WindowStarts(z_0, prompts, noise)


def window_grid(
    t_s: float, t_e: float, num_steps: int, spacing: str = "time", alphas_cumprod: Tensor | None = None
) -> list[int]:
    """The M + 1 abar indices of the solver grid of window [t_s, t_e] (``teacher_solver.solver_grid``)."""
    abar = make_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
    edges = (torch.tensor([t], dtype=torch.float64) for t in (t_s, t_e))
    return [int(i[0]) for i in solver_grid(*edges, num_steps, abar, spacing, strict=False)]


def restricted_scheduler(
    kind: str, grid: list[int], beta_start: float, beta_end: float, beta_schedule: str
) -> DPMSolverMultistepScheduler | UniPCMultistepScheduler:
    """A diffusers multistep scheduler (order 2) whose first M steps go along ``grid`` (M + 1 indices) and
    whose M-th step lands on ``grid[-1]``, the window end.

    diffusers always appends a final sigma after the last timestep (``final_sigmas_type``: 0 or abar[0], i.e.
    t = 0), so the window end cannot be the last *target*; it is made the last *timestep* instead and the
    caller runs only M of the M + 1 steps (step M - 1 goes from sigma(grid[M-1]) to sigma(grid[M])). Since
    the last step actually run is not the scheduler's final one, ``lower_order_final`` never triggers and
    every step after the first is second order, as in the project's own solvers.
    ``DPMSolverMultistepScheduler`` takes the grid as custom ``timesteps``; ``UniPCMultistepScheduler`` has no
    such argument, so its ``timesteps`` and ``sigmas`` are overwritten after ``set_timesteps(M + 1)``.
    """
    common = dict(
        num_train_timesteps=1000, beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule,
        solver_order=2, lower_order_final=True, final_sigmas_type="sigma_min",
    )  # fmt: skip
    if kind == "dpm++":
        sched = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_type="midpoint", **common)
        sched.set_timesteps(timesteps=grid)
    elif kind == "unipc":
        sched = UniPCMultistepScheduler(solver_type="bh2", predict_x0=True, **common)
        sched.set_timesteps(len(grid))
        abar = sched.alphas_cumprod[grid].double()
        sigmas = ((1.0 - abar) / abar).sqrt()
        sched.timesteps = torch.tensor(grid, dtype=torch.int64)
        sched.sigmas = torch.cat([sigmas, sigmas[-1:]]).float()
    else:
        raise ValueError(f"no diffusers scheduler for {kind!r}")
    return sched


@torch.no_grad()
def diffusers_window_solve(
    kind: str,
    teacher: torch.nn.Module,
    z_s: Tensor,
    t_s: float,
    t_e: float,
    num_steps: int,
    alphas_cumprod: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    guidance_scale: float,
    schedule: tuple[float, float, str],
    spacing: str = "log_snr",
) -> Tensor:
    """The window [t_s, t_e] (one window for the whole batch) solved by a restricted diffusers scheduler."""
    grid = window_grid(t_s, t_e, num_steps, spacing, alphas_cumprod)
    sched = restricted_scheduler(kind, grid, *schedule)
    z = z_s
    for i in range(num_steps):
        idx = torch.full((z.shape[0],), grid[i], dtype=torch.long)
        eps = guided_eps(teacher, z, idx, alphas_cumprod[idx], cond, uncond, guidance_scale, "epsilon")
        z = sched.step(eps, sched.timesteps[i], z).prev_sample
    if not torch.isclose(sched.sigmas[num_steps].double(), _sigma_of(alphas_cumprod, grid[-1]), rtol=1e-6):
        raise AssertionError("the restricted scheduler did not end on the window end")
    return z


def _sigma_of(alphas_cumprod: Tensor, index: int) -> Tensor:
    a = alphas_cumprod[index].double()
    return ((1.0 - a) / a).sqrt()


def rms(x: Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item()


@dataclass
class SolverRow:
    """One (solver, M, window) cell of the study."""

    solver: str
    steps: int
    spacing: str
    window: int
    rms_error: (
        float  # RMS of z_e - z_e_ref over all elements and samples (ref: DDIM, reference_steps, time grid)
    )
    relative_error: float  # rms_error / RMS of the reference displacement z_e_ref - z_s
    relative_error_unipc_ref: float  # the same against UniPC with alt_reference_steps on the log-SNR grid
    seconds: float  # median wall time of one solve at the timing batch size
    diffusers_gap: float | None = None  # RMS gap to the restricted diffusers scheduler (multistep only)


@dataclass
class StudyResult:
    rows: list[SolverRow] = field(default_factory=list)
    reference_steps: int = 64
    alt_reference_steps: int = 32
    reference_self_error: list[float] = field(default_factory=list)  # relative RMS(DDIM-(ref/2) - ref)
    reference_vs_unipc: list[float] = field(default_factory=list)  # relative RMS(UniPC-ref log_snr - ref)
    unipc_reference_self_error: list[float] = field(
        default_factory=list
    )  # relative RMS(UniPC-(ref/2) - UniPC-ref)
    displacement: list[float] = field(default_factory=list)  # RMS(z_e_ref - z_s) per window
    forward_seconds: list[float] = field(default_factory=list)  # one teacher forward at the timing batch
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def _median_time(fn: Callable[[], Tensor], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class _WindowSolves:
    """Solves of window ``k`` of the study's ``z_s`` batch: every solve runs in chunks of ``chunk`` samples with
    their rows of the (per-frame) conditioning."""

    teacher: TinyTeacher
    edges: tuple[int, int]  # (t_s, t_e)
    cond: Conditioning
    uncond: Conditioning | None
    guidance_scale: float
    chunk: int

    def rows(self, cond: Conditioning | None, lo: int, hi: int) -> Conditioning | None:
        if cond is None:
            return None
        frames = self.teacher.num_frames
        return Conditioning(cond.encoder_hidden_states[lo * frames : hi * frames])

    def ours(
        self, solver: str, steps: int, spacing: str, z: Tensor, c: Conditioning, u: Conditioning | None
    ) -> Tensor:
        ts, te = (torch.full((z.shape[0],), v, dtype=torch.float64) for v in self.edges)
        abar = self.teacher.alphas_cumprod
        return solve_window(
            self.teacher.unet, z, ts, te, abar, c, u, self.guidance_scale, steps, "epsilon", solver, spacing
        )

    def diffusers(
        self, solver: str, steps: int, spacing: str, z: Tensor, c: Conditioning, u: Conditioning | None
    ) -> Tensor:
        t = self.teacher
        schedule = (t.beta_start, t.beta_end, t.beta_schedule)
        return diffusers_window_solve(
            solver, t.unet, z, self.edges[0], self.edges[1], steps, t.alphas_cumprod, c, u, self.guidance_scale,
            schedule, spacing,
        )  # fmt: skip

    def chunked(self, solve: Callable, solver: str, steps: int, spacing: str, z_s: Tensor) -> Tensor:
        outs = []
        for lo in range(0, z_s.shape[0], self.chunk):
            hi = min(lo + self.chunk, z_s.shape[0])
            c, u = self.rows(self.cond, lo, hi), self.rows(self.uncond, lo, hi)
            outs.append(solve(solver, steps, spacing, z_s[lo:hi], c, u))
        return torch.cat(outs)


def _window_references(
    w: _WindowSolves, z_s: Tensor, reference_steps: int, alt_reference_steps: int, n_check: int,
    result: StudyResult,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The window's DDIM and UniPC reference solves, and their self-errors (at half the steps) recorded."""
    ref = w.chunked(w.ours, "ddim", reference_steps, "time", z_s)
    alt = w.chunked(w.ours, "unipc", alt_reference_steps, "log_snr", z_s)
    z_check = z_s[:n_check]
    half = w.chunked(w.ours, "ddim", reference_steps // 2, "time", z_check)
    alt_half = w.chunked(w.ours, "unipc", alt_reference_steps // 2, "log_snr", z_check)
    disp = rms(ref - z_s)
    result.displacement.append(disp)
    result.reference_self_error.append(rms(half - ref[:n_check]) / rms(ref[:n_check] - z_check))
    result.reference_vs_unipc.append(rms(alt - ref) / disp)
    result.unipc_reference_self_error.append(rms(alt_half - alt[:n_check]) / rms(alt[:n_check] - z_check))
    return ref, alt


def _time_forward(w: _WindowSolves, z_s: Tensor, timing_batch: int, repeats: int) -> float:
    """Median seconds of one guided teacher forward at the window start, ``timing_batch`` samples."""
    abar = w.teacher.alphas_cumprod
    c, u = w.rows(w.cond, 0, timing_batch), w.rows(w.uncond, 0, timing_batch)
    idx = torch.full((timing_batch,), window_grid(w.edges[0], w.edges[1], 1)[0], dtype=torch.long)
    return _median_time(
        lambda: guided_eps(
            w.teacher.unet, z_s[:timing_batch], idx, abar[idx], c, u, w.guidance_scale, "epsilon"
        ),
        repeats,
    )


@torch.no_grad()
def run_study(
    teacher: TinyTeacher,
    num_samples: int = 32,
    num_windows: int = 4,
    reference_steps: int = 64,
    guidance_scale: float = 1.0,
    runs: tuple[tuple[str, int, str], ...] = DEFAULT_RUNS,
    timing_batch: int = 2,
    timing_repeats: int = 3,
    chunk: int = 16,
    seed: int = 0,
    cross_check: bool = True,
    cross_check_steps: tuple[int, ...] = (4,),
    self_check_samples: int = 4,
    alt_reference_steps: int = 32,
    log: Callable[[str], None] = print,
) -> StudyResult:
    """Endpoint error and time of every (solver, M) in ``runs``, per window (module docstring)."""
    starts = window_starts(teacher, num_samples, num_windows, seed)
    cond = teacher.conditioning(starts.prompts)
    uncond = teacher.conditioning([""] * num_samples) if guidance_scale != 1.0 else None
    result = StudyResult(
        reference_steps=reference_steps,
        alt_reference_steps=alt_reference_steps,
        settings=dict(
            num_samples=num_samples, num_windows=num_windows, guidance_scale=guidance_scale, seed=seed,
            timing_batch=timing_batch, latent_shape=list(starts.z_0.shape[1:]), threads=torch.get_num_threads(),
        ),
    )  # fmt: skip
    n_check = min(self_check_samples, num_samples)
    for k in range(num_windows):
        w = _WindowSolves(teacher, window_bounds(k, num_windows), cond, uncond, guidance_scale, chunk)
        z_s = starts.z_s(k, num_windows, teacher.alphas_cumprod)
        ref, alt = _window_references(w, z_s, reference_steps, alt_reference_steps, n_check, result)
        log(f"window {k} {list(w.edges)}: displacement {result.displacement[-1]:.4f}; relative to it: "
            f"DDIM-{reference_steps // 2} vs DDIM-{reference_steps} {result.reference_self_error[-1]:.2e}, "
            f"UniPC-{alt_reference_steps // 2} vs UniPC-{alt_reference_steps} (log_snr) "
            f"{result.unipc_reference_self_error[-1]:.2e}, the two references {result.reference_vs_unipc[-1]:.2e}")  # fmt: skip
        result.forward_seconds.append(_time_forward(w, z_s, timing_batch, timing_repeats * 3))
        timing = (z_s[:timing_batch], w.rows(cond, 0, timing_batch), w.rows(uncond, 0, timing_batch))
        for solver, steps, spacing in runs:
            out = w.chunked(w.ours, solver, steps, spacing, z_s)
            err, disp = rms(out - ref), result.displacement[-1]
            gap = None
            if cross_check and solver != "ddim" and steps in cross_check_steps and spacing == "log_snr":
                gap = rms(w.chunked(w.diffusers, solver, steps, spacing, z_s) - out)
            seconds = _median_time(
                lambda s=solver, m=steps, g=spacing, f=w.ours, a=timing: f(s, m, g, *a), timing_repeats
            )
            err_alt = rms(out - alt) / rms(alt - z_s)
            result.rows.append(SolverRow(solver, steps, spacing, k, err, err / disp, err_alt, seconds, gap))
            log(f"  {solver:6s} M={steps} {spacing:8s}: rms {err:.3e} rel {err / disp:.3e} (vs UniPC ref "
                f"{err_alt:.3e}) time {seconds:.3f}s"
                + ("" if gap is None else f" diffusers gap {gap:.1e}"))  # fmt: skip
    return result


def step_speedup(solve_seconds: float, other_seconds: float, steps_from: int, steps_to: int) -> float:
    """Training-step speed-up when the solve's M goes from ``steps_from`` to ``steps_to`` (solve time
    proportional to M, docs/benchmark_training.md: solve/(M fwd) ~ 1), the rest of the step unchanged."""
    return (solve_seconds + other_seconds) / (solve_seconds * steps_to / steps_from + other_seconds)


def markdown_table(result: StudyResult, reference: str = "ddim") -> str:
    """The study as a Markdown table: one row per (solver, M, grid), per window relative error and time;
    errors against the DDIM reference (``reference="ddim"``) or the UniPC one (``"unipc"``)."""
    k_all = sorted({r.window for r in result.rows})
    head = "| solver | M | grid | " + " | ".join(f"w{k} rel. err" for k in k_all)
    head += " | mean rel. err | " + " | ".join(f"w{k} s" for k in k_all) + " |"
    lines = [head, "|" + "---|" * (4 + 2 * len(k_all))]
    keys = list(dict.fromkeys((r.solver, r.steps, r.spacing) for r in result.rows))
    for solver, steps, spacing in keys:
        cells = {
            r.window: r for r in result.rows if (r.solver, r.steps, r.spacing) == (solver, steps, spacing)
        }
        rel = [
            cells[k].relative_error if reference == "ddim" else cells[k].relative_error_unipc_ref
            for k in k_all
        ]
        line = f"| {solver} | {steps} | {spacing} | " + " | ".join(f"{x:.2e}" for x in rel)
        line += f" | {np.mean(rel):.2e} | " + " | ".join(f"{cells[k].seconds:.3f}" for k in k_all) + " |"
        lines.append(line)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Teacher forward: channels_last, torch.compile
# ----------------------------------------------------------------------------------------------------


@dataclass
class ForwardTiming:
    variant: str
    seconds: float | None  # median of the timed forwards; None if the variant failed
    max_abs_diff: float | None  # against the eager contiguous forward
    note: str = ""


def sd15_random_unet() -> UNet2DConditionModel:
    """The SD1.5 UNet architecture of ``model.init=random`` (shipped config, random weights; ~3.4 GB fp32)."""
    from perflow_video.architectures import component_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DConditionModel.from_config(component_config("sd15", "unet")).eval().requires_grad_(False)


@torch.no_grad()
def forward_speed(
    unet: torch.nn.Module,
    sample: Tensor,
    timestep: Tensor,
    encoder_hidden_states: Tensor,
    repeats: int = 5,
    variants: tuple[str, ...] = ("eager", "channels_last", "compile"),
) -> list[ForwardTiming]:
    """Median time of one no-grad forward per variant, the variants interleaved round by round (so that load
    from other processes hits them alike); warm-up calls are not timed.

    ``channels_last`` converts the module's weights (and a 4-D input; a 5-D video sample stays as it is, the
    UNetMotionModel reshapes it to frames inside) before its call of each round and back afterwards.
    ``compile`` is ``torch.compile(unet)`` with the default inductor backend; its first call (compilation)
    is reported in ``note``, and a failure is reported, not raised.
    """

    def call(model: torch.nn.Module, x: Tensor) -> Tensor:
        out = model(x, timestep, encoder_hidden_states=encoder_hidden_states)
        return out.sample if hasattr(out, "sample") else out[0]

    def as_channels_last(on: bool) -> Tensor:
        unet.to(memory_format=torch.channels_last if on else torch.contiguous_format)
        if on and sample.ndim == 4:
            return sample.contiguous(memory_format=torch.channels_last)
        return sample

    out_ref = call(unet, sample)
    notes, diffs, times = {}, {}, {v: [] for v in variants}
    compiled = None
    if "compile" in variants:
        try:
            compiled = torch.compile(unet)
            start = time.perf_counter()
            diffs["compile"] = (call(compiled, sample) - out_ref).abs().max().item()
            notes["compile"] = f"first call (compilation) {time.perf_counter() - start:.1f} s"
            call(compiled, sample)
        except Exception as error:  # noqa: BLE001 - a failing variant is a result of the study
            notes["compile"], compiled = f"{type(error).__name__}: {error}"[:300], None
    if "channels_last" in variants:
        x = as_channels_last(True)
        diffs["channels_last"] = (call(unet, x) - out_ref).abs().max().item()
        as_channels_last(False)
    diffs["eager"] = 0.0
    call(unet, sample)
    for _ in range(repeats):
        for variant in variants:
            if variant == "compile" and compiled is None:
                continue
            x = as_channels_last(True) if variant == "channels_last" else sample
            model = compiled if variant == "compile" else unet
            start = time.perf_counter()
            call(model, x)
            times[variant].append(time.perf_counter() - start)
            if variant == "channels_last":
                as_channels_last(False)
    return [
        ForwardTiming(v, statistics.median(times[v]) if times[v] else None, diffs.get(v), notes.get(v, ""))
        for v in variants
    ]


@torch.no_grad()
def reference_convergence(
    teacher: TinyTeacher,
    windows: tuple[int, ...] = (0, 3),
    num_samples: int = 2,
    num_windows: int = 4,
    runs: tuple[tuple[str, int, str], ...] = (
        ("ddim", 64, "time"),
        ("ddim", 128, "time"),
        ("unipc", 16, "log_snr"),
        ("unipc", 32, "log_snr"),
        ("unipc", 64, "log_snr"),
    ),
    seed: int = 0,
) -> dict[int, dict[str, float]]:
    """How far apart the candidate references are: per window, RMS(run - last run) / RMS displacement of the
    last run (``unipc`` 64 on the log-SNR grid by default), on the study's first window starts."""
    starts = window_starts(teacher, num_samples, num_windows, seed)
    cond = teacher.conditioning(starts.prompts)
    out: dict[int, dict[str, float]] = {}
    for k in windows:
        t_s, t_e = window_bounds(k, num_windows)
        z_s = starts.z_s(k, num_windows, teacher.alphas_cumprod)
        ts, te = (torch.full((num_samples,), v, dtype=torch.float64) for v in (t_s, t_e))
        ends = {
            f"{s}-{m}-{g}": solve_window(
                teacher.unet, z_s, ts, te, teacher.alphas_cumprod, cond, None, 1.0, m, "epsilon", s, g
            )  # fmt: skip
            for s, m, g in runs
        }
        last = list(ends.values())[-1]
        out[k] = {name: rms(z - last) / rms(last - z_s) for name, z in ends.items()}
    return out
