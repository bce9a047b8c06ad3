"""Endpoint error and time of the teacher window solve per solver and M (issue 11, docs/teacher_solver.md).

    OMP_NUM_THREADS=1 python scripts/study_teacher_solver.py --teacher outputs/tiny-teacher/snapshot \
        --samples 32 --out outputs/solver-study/cfg1.json

Prints a Markdown table (solver x M: relative endpoint error and time per window) and writes the full
result as JSON. ``--forward-speed`` instead times one teacher forward eager / channels_last / torch.compile.
The logic lives in ``perflow_video/evaluation/solver_study.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perflow_video.evaluation.solver_study import (  # noqa: E402
    forward_speed,
    load_tiny_teacher,
    markdown_table,
    reference_convergence,
    run_study,
    sd15_random_unet,
    window_starts,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--teacher",
        help="tiny AnimateDiff teacher folder (diffusers layout), or tiny-teacher (the shipped one)",
    )
    p.add_argument("--samples", type=int, default=32, help="window starts per window [%(default)s]")
    p.add_argument("--windows", type=int, default=4, help="K [%(default)s]")
    p.add_argument(
        "--reference-steps", type=int, default=64, help="DDIM steps of the reference [%(default)s]"
    )
    p.add_argument(
        "--guidance-scale", type=float, default=1.0, help="teacher CFG w (1 = CFG-sync) [%(default)s]"
    )
    p.add_argument("--timing-batch", type=int, default=2, help="batch size of the timed solves [%(default)s]")
    p.add_argument("--timing-repeats", type=int, default=3, help="timed repeats per solve [%(default)s]")
    p.add_argument("--no-cross-check", action="store_true", help="skip the diffusers-scheduler cross-check")
    p.add_argument("--threads", type=int, default=1, help="torch threads [%(default)s]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--forward-speed", action="store_true", help="time one forward: eager/channels_last/compile"
    )
    p.add_argument(
        "--forward-model",
        choices=("tiny", "sd15"),
        default="tiny",
        help="--forward-speed on the tiny teacher (16x8x8 latents) or the random SD1.5 UNet (32x32)",
    )
    p.add_argument("--forward-repeats", type=int, default=5, help="timed forwards per variant [%(default)s]")
    p.add_argument("--variants", default="eager,channels_last,compile", help="--forward-speed variants")
    p.add_argument(
        "--reference-check",
        action="store_true",
        help="how far apart DDIM-64/128 and UniPC-16/32/64 end (windows 0 and 3, 2 samples)",
    )
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    return p


def forward_payload(args) -> list[dict]:
    """--forward-speed: one teacher forward eager / channels_last / torch.compile."""
    variants = tuple(args.variants.split(","))
    timestep = torch.full((args.timing_batch,), 999)
    if args.forward_model == "sd15":
        unet = sd15_random_unet()
        gen = torch.Generator().manual_seed(args.seed)
        sample = torch.randn(args.timing_batch, 4, 32, 32, generator=gen)
        text = torch.randn(args.timing_batch, 77, unet.config.cross_attention_dim, generator=gen)
        timings = forward_speed(unet, sample, timestep, text, args.forward_repeats, variants)
    else:
        teacher = load_tiny_teacher(args.teacher)
        starts = window_starts(teacher, args.timing_batch, 1, args.seed)
        text = teacher.conditioning(starts.prompts).encoder_hidden_states
        timings = forward_speed(teacher.unet, starts.z_0, timestep, text, args.forward_repeats, variants)
    for t in timings:
        print(t)
    return [asdict(t) for t in timings]


def reference_payload(args) -> dict:
    """--reference-check: how far apart the candidate references end."""
    payload = reference_convergence(load_tiny_teacher(args.teacher), seed=args.seed)
    for k, row in payload.items():
        print(f"window {k}: " + ", ".join(f"{name} {err:.2e}" for name, err in row.items()))
    return payload


def study_payload(args) -> dict:
    """The study: endpoint error and time per solver, M and window."""
    result = run_study(
        load_tiny_teacher(args.teacher), args.samples, args.windows, args.reference_steps, args.guidance_scale,
        timing_batch=args.timing_batch, timing_repeats=args.timing_repeats,
        seed=args.seed, cross_check=not args.no_cross_check,
    )  # fmt: skip
    print(f"errors against DDIM-{args.reference_steps} (time grid):")
    print(markdown_table(result, "ddim"))
    print(f"errors against UniPC-{result.alt_reference_steps} (log-SNR grid):")
    print(markdown_table(result, "unipc"))
    return result.to_json()


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.teacher is None and not (args.forward_speed and args.forward_model == "sd15"):
        parser.error("--teacher is required (except for --forward-speed --forward-model sd15)")
    torch.set_num_threads(args.threads)
    if args.forward_speed:
        payload = forward_payload(args)
    elif args.reference_check:
        payload = reference_payload(args)
    else:
        payload = study_payload(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
