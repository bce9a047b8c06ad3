"""Where a PeRFlow student's few-step error comes from, window by window (docs/recipe_study.md, run 3).

    python scripts/study_window_errors.py --teacher tiny-teacher \\
        --student lr3e-5=outputs/recipe-s4/all-3e-5-ema-dpm4-b4 --prompts 12

On the teacher's DDIM-100 trajectory at the K + 1 window edges (same noise and prompts as the evidence table),
for the teacher (= the untrained student: trailing DDIM-K) and each student: the local error of one step
from the exact point at each window start, and where the K-step chain ends when it starts exactly on the
reference at window k (windows before k error-free; k = 1 is the plain sample) - mean and median over clips
- and on how many clips the student's plain sample is closer than the teacher's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from perflow_video.evaluation.evidence_models import load_student, load_teacher, parse_student_arg  # noqa: E402
from perflow_video.evaluation.evidence_samplers import make_items, select_prompts  # noqa: E402
from perflow_video.evaluation.recipe_study import (  # noqa: E402
    chains_from_windows,
    reference_trajectory,
    window_errors,
)
from perflow_video.families.loading import resolve_model_path  # noqa: E402
from perflow_video.method.noise_schedule import alphas_cumprod_from_scheduler_config  # noqa: E402
from perflow_video.scheduler import perflow_scheduler_for  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--teacher", default="tiny-teacher", help="AnimateDiff diffusers folder or tiny-teacher [%(default)s]"
    )
    p.add_argument(
        "--student",
        action="append",
        default=[],
        metavar="NAME=RUN_DIR",
        help="a finished run or its delta_weights.safetensors (repeatable)",
    )
    p.add_argument(
        "--prompts",
        default="12",
        help="'all' or N shape-world prompts spread over the attributes [%(default)s]",
    )
    p.add_argument("--seeds", type=int, default=1, help="noise seeds per prompt [%(default)s]")
    p.add_argument(
        "--windows", type=int, default=4, help="K of the trajectory and of the teacher's row [%(default)s]"
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads [%(default)s]")
    return p  # fmt: skip


def row(name: str, local: list[float], chains: list[torch.Tensor], wins: str) -> str:
    cells = " / ".join(f"{float(c.mean()):.4f} ({float(c.median()):.4f})" for c in chains)
    return f"| {name} | {' '.join(f'{e:.4f}' for e in local)} | {cells} | {wins} |"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher = load_teacher(resolve_model_path(args.teacher, "animatediff"), 16)
    students = [load_student(*parse_student_arg(s), teacher) for s in args.student]
    items = make_items(select_prompts(args.prompts), args.seeds)
    noise = torch.stack([it.noise(teacher.latent_shape()) for it in items])
    cond = teacher.conditioning([it.prompt for it in items])
    abar = alphas_cumprod_from_scheduler_config(teacher.scheduler_config)
    trajectory = reference_trajectory(teacher.unet, noise, cond, abar, args.windows)
    sampler = perflow_scheduler_for(teacher.scheduler_config, "ddim_eps", args.windows)
    base = chains_from_windows(teacher.unet, sampler, trajectory, cond)
    print(
        f"{len(items)} clips, no CFG; chain cells: mean (median) per-clip RMS to DDIM-100 starting exact at window 1 .. K"
    )
    print("| model | local error per window | chain from window 1 / 2 / ... | closer than the teacher |")
    print("|---|---|---|---|")
    print(row("teacher (trailing DDIM)", window_errors(teacher.unet, sampler, trajectory, cond), base, "-"))
    for s in students:
        chains = chains_from_windows(s.unet, s.scheduler(), trajectory, cond)
        wins = f"{int((chains[0] < base[0]).sum())} / {len(items)} clips"
        print(row(s.name, window_errors(s.unet, s.scheduler(), trajectory, cond), chains, wins))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
