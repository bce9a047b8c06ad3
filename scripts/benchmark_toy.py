"""Toy benchmark: mean distance to the teacher's 1000-step endpoint from the same noise (lower is better).

Rows: the teacher with diffusers' DDIM and DPM-Solver++ (trailing timesteps), and PeRFlow students
trained with the project's reflow objective (K windows, parameterization A/B, loss weighting).
Columns: number of sampling steps. Prints a markdown table (the one in the README).

    python scripts/benchmark_toy.py            # ~3-4 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from perflow_video.method.reflow_objective import ReflowConfig
from perflow_video.toy.toy_problem import (
    GaussianMixture,
    MixtureTeacher,
    mean_distance,
    perflow_sample,
    reference_endpoints,
    sample_with_scheduler,
    sd_alphas_cumprod,
    sd_teacher_scheduler,
    train_toy_student,
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--train_steps", type=int, default=2000, help="reflow steps per student (default 2000)"
    )
    parser.add_argument(
        "--num_samples", type=int, default=2000, help="noise samples to evaluate (default 2000)"
    )
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8], help="sampling steps (columns)")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    args = parser.parse_args()

    torch.set_num_threads(1)
    mix = GaussianMixture.ring()
    teacher = MixtureTeacher(mix, sd_alphas_cumprod())
    noise = torch.randn(
        args.num_samples, 2, generator=torch.Generator().manual_seed(123), dtype=torch.float64
    )
    ref = reference_endpoints(teacher, noise)

    rows: list[tuple[str, list[float]]] = []
    ddim = sd_teacher_scheduler(DDIMScheduler, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    rows.append(
        (
            "teacher DDIM",
            [mean_distance(sample_with_scheduler(teacher, ddim, noise, n), ref) for n in args.steps],
        )
    )
    dpm = sd_teacher_scheduler(DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=2)
    rows.append(
        (
            "teacher DPM-Solver++ (2M)",
            [mean_distance(sample_with_scheduler(teacher, dpm, noise, n), ref) for n in args.steps],
        )
    )
    variants = [
        (1, "ddim_eps", "endpoint"),
        (4, "ddim_eps", "endpoint"),
        (4, "diff_eps", "endpoint"),
        (1, "diff_eps", "endpoint"),
        (4, "ddim_eps", "uniform"),
        (4, "diff_eps", "uniform"),
    ]
    for K, param, weighting in variants:
        start = time.time()
        cfg = ReflowConfig(num_time_windows=K, parameterization=param, loss_weighting=weighting)
        student = train_toy_student(
            teacher, mix, cfg, steps=args.train_steps, batch_size=256, lr=1e-3, seed=args.seed
        )
        label = f"PeRFlow K={K}, {'B' if param == 'ddim_eps' else 'A'} ({param}), {weighting} loss"
        rows.append(
            (label, [mean_distance(perflow_sample(student, noise, n, K, param), ref) for n in args.steps])
        )
        print(f"trained {label} in {time.time() - start:.0f} s", flush=True)

    print()
    print("| sampler | " + " | ".join(f"{n} step{'s' if n > 1 else ''}" for n in args.steps) + " |")
    print("|---|" + "---:|" * len(args.steps))
    for label, values in rows:
        print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values) + " |")


if __name__ == "__main__":
    main()
