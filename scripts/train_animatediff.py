"""Train a PeRFlow-accelerated AnimateDiff (SD1.5 UNet + motion modules).

With no --config: configs/tiny/animatediff.yaml, the embedded trained tiny teacher (tiny-teacher, 16 x 32 x 32)
on the shape-world clips in data/shape_world_clips (CPU, minutes). Real recipe: --config configs/animatediff_sd15.yaml (16 x 384 x 384 clips, motion
adapter v1-5-2). Multi-GPU: accelerate launch --config_file configs/accelerate/multi_gpu.yaml
scripts/train_animatediff.py ...
"""

import sys

from perflow_video.training.cli import CONFIG_DIR, build_parser, run


def main() -> int:
    args = build_parser(__doc__, with_model=False).parse_intermixed_args()
    return run(args, CONFIG_DIR / "tiny" / "animatediff.yaml", ("animatediff",))


if __name__ == "__main__":
    sys.exit(main())
