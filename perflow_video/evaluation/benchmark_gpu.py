"""``scripts/benchmark_gpu.py``: training-step and generation figures of full-size AnimateDiff on one GPU.

Random-weight SD1.5 + motion adapter v1-5-2 (:mod:`.benchmark_models`), three sections:

* ``models``: parameter counts of the full-size networks (built on the meta device: checks the configs);
* ``training``: one PeRFlow step at 16×384×384, batch 1, bf16 autocast, per set-up of
  :data:`~.benchmark_train_step.TRAINING_CASES` (teacher solve vs student forward + backward, peak memory);
* ``generation``: seconds per clip of PeRFlow 4 steps (CFG 1 and 4.5) vs DDIM 25 steps with CFG 7.5 at
  16×384×384 and 16×512×512 (:mod:`.benchmark_generate`), bf16.

Each section, and each case inside it, is guarded: an error (e.g. out of memory) is recorded with its
message and the rest still runs. A global time budget skips what would start after it. The JSON and the
markdown table are rewritten atomically to ``--out`` after every case, so a killed run keeps what it had.
``--smoke`` runs the same code on the CPU with the tiny networks at a few frames and 32 / 64 px.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from perflow_video.evaluation.benchmark_generate import (
    DEFAULT_CASES,
    GENERATION_HEADER,
    ClipSize,
    generation_rows,
    measure_generation,
)
from perflow_video.evaluation.benchmark_models import (
    ModelSize,
    build_pipeline_parts,
    parameter_counts,
    teacher_scheduler_config,
)
from perflow_video.evaluation.benchmark_report import error_text, markdown_table, write_report
from perflow_video.evaluation.benchmark_timing import environment, load_average
from perflow_video.evaluation.benchmark_train_step import (
    TRAINING_CASES,
    TrainingSetup,
    free_memory,
    measure_training_case,
    step_inputs,
)
from perflow_video.families import FamilyModels, get_family
from perflow_video.families.attention import resolve_attention_backend
from perflow_video.scheduler import perflow_scheduler_for

DEFAULT_OUT = Path("outputs") / "benchmark_gpu"
STEM = "benchmark_gpu"
SECTIONS = ("models", "training", "generation")
DEFAULT_BUDGET_S = 420.0


@dataclass(frozen=True)
class GpuPlan:
    """What one run measures: the training set-up, the generation sizes and repeats, the time budget."""

    mode: str
    size: ModelSize
    device: str
    training: TrainingSetup
    generation_sizes: tuple[ClipSize, ...]
    generation_dtype: torch.dtype
    repeats: int
    warmup: int
    budget_s: float


def full_plan(
    device: str, budget_s: float, train_steps: int = 3, repeats: int = 3, lora_rank: int = 32
) -> GpuPlan:
    """Full-size networks: training at 16×384×384 batch 1 bf16; generation at 16×384² and 16×512², bf16."""
    training = TrainingSetup("full", 16, 384, 1, device, steps=train_steps, warmup=1, lora_rank=lora_rank)
    sizes = (ClipSize(16, 384, 384), ClipSize(16, 512, 512))
    return GpuPlan("full", "full", device, training, sizes, torch.bfloat16, repeats, 1, budget_s)


def smoke_plan(budget_s: float) -> GpuPlan:
    """The same code on the CPU with the tiny networks: 4 frames, training at 32 px, generation at 32 / 64 px."""
    training = TrainingSetup("tiny", 4, 32, 1, "cpu", steps=1, warmup=0, lora_rank=4)
    sizes = (ClipSize(4, 32, 32), ClipSize(4, 64, 64))
    return GpuPlan("smoke", "tiny", "cpu", training, sizes, torch.float32, 1, 0, budget_s)


class Report:
    """The run's JSON payload, rewritten (with its markdown) to ``out`` after every change."""

    def __init__(self, plan: GpuPlan, out: Path):
        self.plan, self.out, self.start = plan, out, time.monotonic()
        self.payload = {
            "benchmark": "gpu", "mode": plan.mode, "budget_s": plan.budget_s,
            "environment": {**environment(plan.device), **_package_versions()},
            "sections": {name: {"status": "pending"} for name in SECTIONS},
        }  # fmt: skip

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def over_budget(self) -> bool:
        return self.elapsed() > self.plan.budget_s

    def save(self) -> None:
        self.payload["elapsed_s"] = round(self.elapsed(), 2)
        self.payload["environment"]["load_average_now"] = load_average()
        write_report(self.out, STEM, self.payload, gpu_markdown(self.payload))


def _package_versions() -> dict:
    import peft

    xformers = importlib.util.find_spec("xformers") is not None
    versions = {"peft": peft.__version__, "xformers": None}
    if xformers:
        import xformers as xf

        versions["xformers"] = xf.__version__
    return versions


def run_section(report: Report, name: str, body: Callable[[dict], None]) -> None:
    """Run one section into ``report.payload['sections'][name]``; an error is recorded there, not raised."""
    section = report.payload["sections"][name] = {"status": "running"}
    start = time.monotonic()
    if report.over_budget():
        section["status"] = "skipped: time budget"
    else:
        try:
            body(section)
            section["status"] = "ok"
        except Exception as err:  # one failing section (e.g. OOM) must not lose the others
            section["status"], section["error"] = "error", error_text(err)
    free_memory(report.plan.device)
    section["seconds"] = round(time.monotonic() - start, 2)
    report.save()


def models_section(report: Report, section: dict) -> None:
    section["full"] = parameter_counts("full")
    if report.plan.size != "full":
        section[report.plan.size] = parameter_counts(report.plan.size)


def _skip_reason(attention: str) -> str | None:
    try:
        resolve_attention_backend(attention)
    except ValueError as err:
        return f"skipped: {err}"
    return None


def training_section(report: Report, section: dict) -> None:
    setup = report.plan.training
    section["setup"] = setup.to_dict()
    inputs = step_inputs(setup, teacher_scheduler_config())
    cases = section["cases"] = []
    for case in TRAINING_CASES:
        reason = "skipped: time budget" if report.over_budget() else _skip_reason(case.attention)
        row = {**asdict(case), "status": reason}
        if reason is None:
            try:
                row = measure_training_case(case, setup, inputs)
            except Exception as err:  # e.g. out of memory: record it, free what the case held, go on
                row = {**asdict(case), "status": "error", "error": error_text(err)}
        free_memory(setup.device)
        cases.append(row)
        report.save()


def generation_section(report: Report, section: dict) -> None:
    plan = report.plan
    section["cases"] = [asdict(c) for c in DEFAULT_CASES]
    section["dtype"] = str(plan.generation_dtype).removeprefix("torch.")
    section["repeats"], section["warmup"] = plan.repeats, plan.warmup
    config = teacher_scheduler_config()
    parts = build_pipeline_parts(plan.size, plan.device, plan.generation_dtype)
    scheduler = perflow_scheduler_for(config, "ddim_eps", 4)
    sizes = section["sizes"] = []
    for size in plan.generation_sizes:
        models = FamilyModels(
            parts.unet, parts.unet, parts.vae, [parts.text_encoder], [parts.tokenizer], config,
            f"random {plan.size}-size weights", size.height, size.num_frames,
        )  # fmt: skip
        pipe = get_family("animatediff").pipeline(models, parts.unet, scheduler)  # as generate.py builds it
        entry = {"size": asdict(size), "label": size.label(), "status": "skipped: time budget"}
        if not report.over_budget():
            entry.update(_measure_size(pipe, scheduler, config, size, plan))
        free_memory(plan.device)
        sizes.append(entry)
        report.save()


def _measure_size(pipe, scheduler, config: dict, size: ClipSize, plan: GpuPlan) -> dict:
    """The generation rows at one clip size, or the error that stopped them (e.g. out of memory at 512 px)."""
    try:
        rows = measure_generation(
            pipe, scheduler, config, size, DEFAULT_CASES, repeats=plan.repeats, warmup=plan.warmup,
            device=plan.device,
        )  # fmt: skip
    except Exception as err:  # keep the other size's numbers
        return {"status": "error", "error": error_text(err)}
    return {"status": "ok", "rows": [r.to_dict() for r in rows], "table": generation_rows(size, rows)}


def run_gpu_benchmark(plan: GpuPlan, out: Path, sections: tuple[str, ...] = SECTIONS) -> dict:
    """Every requested section in turn, each guarded; returns the payload (also in ``out``)."""
    report = Report(plan, out)
    bodies = {
        "models": lambda s: models_section(report, s),
        "training": lambda s: training_section(report, s),
        "generation": lambda s: generation_section(report, s),
    }
    for name in SECTIONS:
        if name in sections:
            run_section(report, name, bodies[name])
        else:
            report.payload["sections"][name] = {"status": "skipped: not requested"}
    report.save()
    return report.payload


TRAINING_HEADER = (
    "set-up", "status", "trainable params (M)", "teacher solve s", "student fwd+bwd s", "step s",
    "peak MiB", "Δ peak MiB", "loss",
)  # fmt: skip


def training_rows(cases: list[dict]) -> list[list]:
    rows = []
    for c in cases:
        million = c["trainable_parameters"] / 1e6 if "trainable_parameters" in c else None
        rows.append([
            c["name"], c["status"] if "error" not in c else f"error: {c['error']}", million,
            c.get("solve_seconds"), c.get("student_seconds"), c.get("total_seconds"), c.get("peak_memory_mib"),
            c.get("peak_memory_delta_mib"), c.get("loss"),
        ])  # fmt: skip
    return rows


def describe_setup(setup: dict) -> str:
    r = setup["reflow"]
    return (
        f"{setup['size']} networks, {setup['num_frames']}×{setup['resolution']}×{setup['resolution']}, batch "
        f"{setup['batch_size']}, autocast {setup['autocast']}, teacher {setup['teacher_dtype']}, M = "
        f"{r['solver_steps']}, K = {r['num_time_windows']}, teacher CFG {r['guidance_scale']:g}, LoRA rank "
        f"{setup['lora_rank']}; the median of {setup['steps']} steps after {setup['warmup']} warm-up."
    )


def _status(entry: dict) -> str:
    return entry["status"] + (f" ({entry['error']})" if "error" in entry else "")


def _section_markdown(name: str, s: dict) -> str:
    text = f"## {name}: {_status(s)}\n"
    if name == "models" and "full" in s:
        counts = [[size, *v.values()] for size, v in s.items() if isinstance(v, dict)]
        text += "\nParameters:\n\n" + markdown_table(("networks", *s["full"]), counts)
    if name == "training" and s.get("cases"):
        text += (
            "\n"
            + describe_setup(s["setup"])
            + "\n\n"
            + markdown_table(TRAINING_HEADER, training_rows(s["cases"]))
        )
    if name == "generation" and s.get("sizes"):
        rows = [row for entry in s["sizes"] for row in entry.get("table", [])]
        notes = "; ".join(f"{e['label']}: {_status(e)}" for e in s["sizes"])
        text += f"\n{s['dtype']}, median of {s['repeats']} clip(s) after {s['warmup']} warm-up per row.\n\n"
        text += markdown_table(GENERATION_HEADER, rows) + "\n" + notes + "\n"
    return text


def gpu_markdown(payload: dict) -> str:
    """The report: environment, then each section's status and table."""
    env = payload["environment"]
    gpu = f" ({env['gpu']}, CUDA {env.get('cuda')})" if "gpu" in env else ""
    head = (
        f"# GPU benchmark ({payload['mode']})\n\nDevice {env['device']}{gpu}; torch {env['torch']}, diffusers "
        f"{env['diffusers']}, peft {env['peft']}, xformers {env['xformers'] or 'not installed'}; load average "
        f"{env['load_average_start']} at the start; {payload.get('elapsed_s', 0)} s of a {payload['budget_s']:g} s "
        "budget.\n"
    )
    return "\n".join([head, *(_section_markdown(name, payload["sections"][name]) for name in SECTIONS)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmark_gpu.py",
        description="Full-size AnimateDiff (random SD1.5 + motion adapter v1-5-2) on one GPU: PeRFlow training "
        "step time and memory by set-up, and seconds per clip of PeRFlow 4 steps vs DDIM 25 steps. Writes "
        "benchmark_gpu.json and .md to --out. --smoke: the same code on the CPU at tiny size (CI).",
    )
    add = parser.add_argument
    add("--smoke", action="store_true", help="tiny networks on the CPU, a few frames, 32/64 px, 1 repeat")
    add("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    add("--device", default="cuda", help="torch device of the full-size run (default: %(default)s)")
    add("--budget_s", type=float, default=DEFAULT_BUDGET_S, help="time budget in s (default: %(default)s)")
    add(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="sections to run (default: all)",
    )
    add("--train_steps", type=int, default=3, help="timed training steps per set-up (default: 3)")
    add("--repeats", type=int, default=3, help="timed clips per generation row (default: 3)")
    add("--lora_rank", type=int, default=32, help="LoRA rank of the motion-LoRA set-ups (default: 32)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        plan = smoke_plan(args.budget_s)
    else:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            print(
                "error: no CUDA GPU here; run with --smoke on a CPU (or --device cpu, very slow)",
                file=sys.stderr,
            )
            return 2
        plan = full_plan(args.device, args.budget_s, args.train_steps, args.repeats, args.lora_rank)
    payload = run_gpu_benchmark(plan, args.out, tuple(args.sections))
    for name, section in payload["sections"].items():
        print(f"{name}: {section['status']}" + (f" ({section['error']})" if "error" in section else ""))
    print(f"wrote {args.out / (STEM + '.json')} and {args.out / (STEM + '.md')} in {payload['elapsed_s']} s")
    return (
        0
        if all(s["status"] == "ok" or s["status"].startswith("skipped") for s in payload["sections"].values())
        else 1
    )


__all__ = [
    "DEFAULT_OUT",
    "SECTIONS",
    "GpuPlan",
    "build_parser",
    "full_plan",
    "gpu_markdown",
    "main",
    "run_gpu_benchmark",
    "smoke_plan",
]
