"""Regenerate data/toy_images: one still frame of each toy clip with a "a <color> <shape>" caption.

python data/make_toy_images.py [--out_dir data/toy_images]
"""

import argparse
from pathlib import Path

from perflow_video.toy.toy_images import make_toy_images


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out_dir",
        default=str(Path(__file__).parent / "toy_images"),
        help="output folder (default: data/toy_images)",
    )
    args = parser.parse_args()
    print(f"wrote {len(make_toy_images(args.out_dir))} images to {args.out_dir}")


if __name__ == "__main__":
    main()
