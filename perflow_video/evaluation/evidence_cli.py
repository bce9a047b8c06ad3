"""Command line of ``scripts/benchmark_evidence.py`` (docs/evidence.md): loads the teacher and the students,
runs :func:`~.evidence_study.run_evidence` and writes ``results.json``, ``table.md`` and ``sheets/`` to --out."""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from perflow_video.errors import ConfigError
from perflow_video.evaluation.benchmark_timing import environment
from perflow_video.evaluation.evidence_models import load_student, load_teacher, parse_student_arg
from perflow_video.evaluation.evidence_report import write_results
from perflow_video.evaluation.evidence_samplers import SampleStore, make_items, select_prompts
from perflow_video.evaluation.evidence_study import LADDER_STEPS, Settings, run_evidence

DEFAULT_OUT = "outputs/evidence"
#: Sizes of a full run and of ``--quick`` (few prompts, one seed), where the flag is not given.
FULL = {"prompts": "all", "seeds": 2, "ladder_clips": 24, "spacing_clips": 12, "sheets": 3}
QUICK = {"prompts": "3", "seeds": 1, "ladder_clips": 2, "spacing_clips": 2, "sheets": 1}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmark_evidence.py",
        description="PeRFlow students against the teacher's DDIM / DPM++ 2M / Euler / UniPC at 1, 2, 4, 8 steps, "
        "from the same noise and prompts: distance to the teacher's DDIM-100 (latent RMS, PSNR), prompt accuracy "
        "of the pixel probe, temporal consistency, diversity, time; the DDIM steps that match PeRFlow-4; contact "
        "sheets. Writes results.json, table.md and sheets/ to --out (docs/evidence.md).",
    )
    add = p.add_argument
    add(
        "--teacher",
        required=True,
        metavar="DIR",
        help="the teacher's diffusers folder (with motion_adapter/), or tiny-teacher (the embedded one)",
    )
    add("--student", action="append", default=[], metavar="NAME=RUN_DIR",
        help="a finished scripts/train_animatediff.py run, or its delta_weights.safetensors alone (added to "
        "the teacher; FILE,rank=R adds what its rank-R LoRA files carry) (repeatable); its recipe is read "
        "from the run / the file's metadata")  # fmt: skip
    add("--steps", default="1,2,4,8", help="step counts of every row [%(default)s]")
    add("--prompts", help=f"'all' (the 72 shape-world prompts) or N spread over them [{FULL['prompts']}]")
    add("--seeds", type=int, help=f"noise seeds per prompt [{FULL['seeds']}]")
    add(
        "--cfg",
        type=float,
        default=5.0,
        help="guidance w of teacher rows and CFG-sync students [%(default)s]",
    )
    add("--reference-steps", type=int, default=100, help="DDIM steps of the reference [%(default)s]")
    add(
        "--ladder-steps",
        default=",".join(map(str, LADDER_STEPS)),
        help="DDIM step counts of the ladder [%(default)s]",
    )
    add("--ladder-clips", type=int, help=f"clips of the DDIM 1..50 ladder [{FULL['ladder_clips']}]")
    add("--spacing-clips", type=int, help=f"clips of the spacing choice [{FULL['spacing_clips']}]")
    add("--sheets", type=int, help=f"contact sheets (prompts) [{FULL['sheets']}]")
    add("--quick", action="store_true", help="a few prompts, 1 seed (smoke test): " + str(QUICK))
    add("--frames", type=int, default=16, help="frames per clip [%(default)s]")
    add("--batch", type=int, default=8, help="clips per sampling batch [%(default)s]")
    add("--threads", type=int, default=1, help="torch CPU threads [%(default)s]")
    add(
        "--out",
        default=DEFAULT_OUT,
        help="output folder (teacher samples are cached in <out>/cache) [%(default)s]",
    )
    add("--no-cache", action="store_true", help="do not read or write the teacher-sample cache")
    add("--no-progress", action="store_true", help="no progress bars")
    add("--debug", action="store_true", help="show the traceback of a user error")
    return p


def resolve_sizes(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the size flags not given from :data:`QUICK` (``--quick``) or :data:`FULL`."""
    sizes = QUICK if args.quick else FULL
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def parse_steps(text: str, flag: str = "--steps") -> tuple[int, ...]:
    try:
        steps = tuple(int(s) for s in text.split(","))
    except ValueError as err:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,2,4,8") from err
    if not steps or min(steps) < 1:
        raise ConfigError(f"{flag} {text!r}: every step count must be >= 1")
    return steps


def settings_of(args: argparse.Namespace) -> Settings:
    return Settings(parse_steps(args.steps), args.cfg, args.reference_steps, args.ladder_clips, args.spacing_clips,
                    args.sheets, parse_steps(args.ladder_steps, "--ladder-steps"))  # fmt: skip


def items_of(args: argparse.Namespace):
    try:
        prompts = select_prompts(str(args.prompts))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    return make_items(prompts, args.seeds)


@contextlib.contextmanager
def run_settings(threads: int) -> Iterator[None]:
    """torch threads and a quiet scheduler logger (n < K warns; the table marks it) for one run, restored
    after it (the tests run the command in-process)."""
    logger = logging.getLogger("perflow_video.scheduler")
    level, before = logger.level, torch.get_num_threads()
    logger.setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        logger.setLevel(level)
        torch.set_num_threads(before)


def run(argv: list[str]) -> dict:
    """Parse ``argv``, run the evidence, write its outputs; returns the results."""
    args = resolve_sizes(build_parser().parse_args(argv))
    with run_settings(args.threads):
        return run_evidence_command(args, argv)


def run_evidence_command(args: argparse.Namespace, argv: list[str]) -> dict:
    start, cpu_start = time.perf_counter(), time.process_time()
    settings, items = settings_of(args), items_of(args)
    teacher = load_teacher(args.teacher, args.frames)
    students = dict(parse_student_arg(s) for s in args.student)
    students = {name: load_student(name, run_dir, teacher) for name, run_dir in students.items()}
    out = Path(args.out)
    cache = None if args.no_cache else out / "cache"
    store = SampleStore(teacher, students, args.batch, cache, progress=not args.no_progress)
    results = run_evidence(store, students, settings, items, out / "sheets")
    results["command"] = shlex.join(["python", "scripts/benchmark_evidence.py", *argv])
    results["environment"] = environment("cpu")
    results["timings"]["wall_seconds"] = round(time.perf_counter() - start, 1)
    results["timings"]["cpu_seconds"] = round(time.process_time() - cpu_start, 1)
    json_path, md_path = write_results(out, results)
    print(f"wrote {json_path}, {md_path} and {out / 'sheets'}/ ({results['timings']['wall_seconds']} s)")
    return results


def main(argv: list[str] | None = None) -> int:
    run(sys.argv[1:] if argv is None else argv)
    return 0
