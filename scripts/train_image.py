"""Train a PeRFlow-accelerated image model: --model sd15 | sd21 | sdxl.

--model M uses configs/M.yaml (the real model, GPU); add --tiny for the embedded CPU-sized model on
toy images (configs/tiny/M.yaml). --config overrides the choice of file.
"""

import sys

from perflow_video.training.cli import CONFIG_DIR, build_parser, run


def main() -> int:
    args = build_parser(__doc__, with_model=True).parse_intermixed_args()
    default = CONFIG_DIR / ("tiny" if args.tiny else "") / f"{args.model}.yaml"
    return run(args, default, (args.model,))


if __name__ == "__main__":
    sys.exit(main())
