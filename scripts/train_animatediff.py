"""Train a PeRFlow-accelerated AnimateDiff (SD1.5 UNet + motion modules).

With no arguments: trains the embedded tiny AnimateDiff on the toy clips in data/ (CPU, a few minutes).
Real recipe: --config configs/animatediff_sd15.yaml (16 x 384 x 384 clips, motion adapter v1-5-2).
Multi-GPU: accelerate launch --config_file configs/accelerate/multi_gpu.yaml scripts/train_animatediff.py ...
"""

import sys

from perflow_video.training.cli import CONFIG_DIR, build_parser, run


def main() -> int:
    args = build_parser(__doc__, with_model=False).parse_intermixed_args()
    default = CONFIG_DIR / "tiny" / "animatediff.yaml"
    if args.config is None and not args.tiny:
        print("no --config given: training the embedded tiny AnimateDiff on data/toy_clips", file=sys.stderr)
    return run(args, default, ("animatediff",))


if __name__ == "__main__":
    sys.exit(main())
