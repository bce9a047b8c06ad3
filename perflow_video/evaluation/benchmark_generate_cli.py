"""Command line of ``scripts/benchmark_generate.py``: PeRFlow 4 steps vs the teacher's DDIM 25 steps per clip.

The script loads the model (``--run`` / ``--base`` / the tiny default, as ``scripts/generate.py`` does) and
hands its pipeline to :func:`run_benchmark`, which times every row (:mod:`.benchmark_generate`), and writes
``benchmark_generate.json`` and ``benchmark_generate.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from perflow_video.errors import ConfigError
from perflow_video.evaluation.benchmark_generate import (
    DEFAULT_PROMPT,
    ClipSize,
    default_cases,
    generation_table,
    measure_generation,
)
from perflow_video.evaluation.benchmark_report import write_report
from perflow_video.evaluation.benchmark_timing import environment, load_average
from perflow_video.families.attention import configure_attention, resolve_attention_backend

DEFAULT_OUT = Path("outputs") / "benchmark_generate"
STEM = "benchmark_generate"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmark_generate.py",
        description="Seconds per clip of PeRFlow 4 steps (CFG 1 and CFG w) against the teacher's DDIM 25 steps "
        "with CFG 7.5 on the same AnimateDiffPipeline, split into text encoder / UNet / VAE decode, with "
        "the peak memory of generation. Writes JSON + a markdown table to --out.",
    )
    add = parser.add_argument_group(
        "model source (as scripts/generate.py; default: the tiny default)"
    ).add_argument
    add("--run", metavar="DIR", help="a finished training output folder")
    add("--base", metavar="MODEL", help="a base SD1.5 model (folder, hub id or tiny), with --delta added")
    add("--motion_adapter", metavar="ADAPTER", help="with --base: the motion adapter")
    add("--delta", metavar="FILE", help="a delta_weights.safetensors added to --base")
    add("--delta_scale", type=float, default=1.0, help="scale of --delta (default: 1)")
    add = parser.add_argument_group("rows and clips").add_argument
    add("--prompt", default=DEFAULT_PROMPT, help="the prompt of every clip (default: %(default)r)")
    add("--steps", type=int, default=4, help="PeRFlow steps (default: 4)")
    add("--guidance_scale", type=float, default=4.5, help="CFG w of the PeRFlow CFG row (default: 4.5)")
    add("--teacher_steps", type=int, default=25, help="DDIM steps of the teacher row (default: 25)")
    add("--teacher_guidance_scale", type=float, default=7.5, help="CFG of the teacher row (default: 7.5)")
    add("--num_frames", type=int, help="frames per clip (default: the model's)")
    add("--height", type=int, help="pixels (default: the model's resolution)")
    add("--width", type=int, help="pixels (default: the model's resolution)")
    add("--repeats", type=int, default=3, help="timed clips per row; the median is reported (default: 3)")
    add("--warmup", type=int, default=1, help="untimed clips per row before those (default: 1)")
    add = parser.add_argument_group("device and output").add_argument
    add("--device", help="torch device (default: cuda if available, else cpu)")
    add("--dtype", choices=tuple(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    add("--attention", choices=("xformers", "sdpa"), help="attention backend (default: diffusers' own)")
    add("--threads", type=int, help="torch CPU threads (default: torch's, i.e. OMP_NUM_THREADS)")
    add("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    add("--debug", action="store_true", help="show the traceback of a user error")
    return parser


@dataclass
class BenchSettings:
    """What the flags resolved to (recorded in the JSON)."""

    device: str
    dtype: str
    attention: str | None
    repeats: int
    warmup: int
    prompt: str


def resolve_settings(args: argparse.Namespace) -> BenchSettings:
    """Device / dtype defaults, checked before any model loads (a ConfigError names the flag)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU here; use --device cpu")
    if args.repeats < 1 or args.warmup < 0:
        raise ConfigError(
            f"--repeats {args.repeats} / --warmup {args.warmup}: need repeats >= 1, warmup >= 0"
        )
    if args.attention is not None:
        try:
            resolve_attention_backend(args.attention)
        except ValueError as err:
            raise ConfigError(f"--attention {args.attention}: {err}") from None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    return BenchSettings(device, dtype, args.attention, args.repeats, args.warmup, args.prompt)


def prepare_pipeline(pipe, settings: BenchSettings):
    """The pipeline with the attention backend, dtype and device of the settings."""
    if settings.attention is not None:
        configure_attention([pipe.unet, pipe.vae], settings.attention)
    if DTYPES[settings.dtype] != torch.float32:
        pipe.to(dtype=DTYPES[settings.dtype])
    return pipe.to(settings.device)


@dataclass
class ModelUnderTest:
    """What the script loaded: the pipeline (student UNet + PeRFlowScheduler), the teacher's scheduler config
    (for the DDIM row), the model's default clip size, and a description for the report."""

    pipe: object
    perflow_scheduler: object
    teacher_scheduler_config: dict
    default_size: ClipSize
    description: str


def run_benchmark(args: argparse.Namespace, settings: BenchSettings, model: ModelUnderTest) -> dict:
    """Time every row on the model's pipeline and write the report to ``args.out``; returns the JSON payload."""
    default = model.default_size
    size = ClipSize(
        args.num_frames or default.num_frames, args.height or default.height, args.width or default.width
    )
    cases = default_cases(args.steps, args.guidance_scale, args.teacher_steps, args.teacher_guidance_scale)
    env = environment(settings.device)
    pipe = prepare_pipeline(model.pipe, settings)
    results = measure_generation(
        pipe, model.perflow_scheduler, model.teacher_scheduler_config, size, cases, settings.prompt,
        settings.repeats, settings.warmup, settings.device,
    )  # fmt: skip
    env["load_average_end"] = load_average()
    payload = {
        "benchmark": "generate", "model": model.description, "size": asdict(size),
        "settings": asdict(settings), "environment": env, "rows": [r.to_dict() for r in results],
    }  # fmt: skip
    write_report(args.out, STEM, payload, report_markdown(payload, generation_table(size, results)))
    return payload


def report_markdown(payload: dict, table: str) -> str:
    env, s = payload["environment"], payload["settings"]
    return (
        f"# Generation benchmark\n\nModel: {payload['model']}. Device {env['device']}"
        f"{' (' + env['gpu'] + ')' if 'gpu' in env else ''}, {s['dtype']}, torch {env['torch']}, "
        f"diffusers {env['diffusers']}, torch threads {env['torch_threads']}, CPUs {env['cpu_count']}; "
        f"load average {env['load_average_start']} at the start, {env['load_average_end']} at the end. "
        f"Per row: the median of {s['repeats']} timed clip(s) after {s['warmup']} warm-up; seconds per clip.\n\n{table}"
    )


__all__ = [
    "DEFAULT_OUT",
    "BenchSettings",
    "ModelUnderTest",
    "build_parser",
    "prepare_pipeline",
    "resolve_settings",
    "run_benchmark",
]
