"""Seconds per clip: PeRFlow 4 steps (CFG 1 and CFG w) vs the teacher's DDIM 25 steps with CFG 7.5.

    python scripts/benchmark_generate.py                       # the tiny default (docs/benchmark_generate.md)
    python scripts/benchmark_generate.py --run outputs/<run> --num_frames 16 --height 384 --width 384

The command line is perflow_video.evaluation.benchmark_generate_cli; the model loads as in scripts/generate.py.
"""

from __future__ import annotations

import sys

from perflow_video.errors import exit_status_of
from perflow_video.evaluation.benchmark_generate import ClipSize
from perflow_video.evaluation.benchmark_generate_cli import (
    ModelUnderTest,
    build_parser,
    resolve_settings,
    run_benchmark,
)


def load_model(args) -> ModelUnderTest:
    """--run, --base / --delta, or the tiny default, exactly as generate.py loads them."""
    from perflow_video.generation.model_source import load_base, load_run, load_tiny_default

    if args.run:
        loaded = load_run(args.run, args.num_frames)
    elif args.base or args.delta:
        loaded = load_base(args.base, args.motion_adapter, args.delta, args.delta_scale, args.num_frames)
    else:
        loaded, note = load_tiny_default(args.num_frames)
        print(note)
    if not loaded.is_video:
        from perflow_video.errors import ConfigError

        raise ConfigError(f"{loaded.description}: an image model; this benchmark times video clips")
    pipe = loaded.family.pipeline(loaded.models, loaded.student, loaded.scheduler)
    size = ClipSize(loaded.num_frames, loaded.resolution, loaded.resolution)
    return ModelUnderTest(pipe, loaded.scheduler, loaded.models.scheduler_config, size, loaded.description)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        settings = resolve_settings(args)  # flag errors before any model loads
        payload = run_benchmark(args, settings, load_model(args))
        for row in payload["rows"]:
            print(
                f"{row['name']}: {row['unet_evaluations']} UNet evaluations, {row['seconds']:.3f} s per clip, "
                f"speed-up {row['speedup']:.2f} (UNet-evaluation limit {row['evaluation_limit']:.2f})"
            )
        print(f"wrote {args.out}/benchmark_generate.json and .md")
        return 0

    return exit_status_of(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
