"""Train a PeRFlow-accelerated AnimateDiff (SD1.5 UNet + motion modules).

With no --config: configs/tiny/animatediff.yaml, the embedded tiny AnimateDiff on the toy clips in data/
(CPU, a few minutes). Real recipe: --config configs/animatediff_sd15.yaml (16 x 384 x 384 clips, motion
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
