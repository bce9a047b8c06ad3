"""Regenerate the toy captioned clips (coloured shapes moving left/right/up/down) as H.264 MP4s.

Writes <out>/toy_NNN.mp4, <out>/toy_NNN.txt (sidecar caption) and <out>/captions.csv (WebVid layout:
videoid,name,page_dir). Same flags, same files. The shipped sample data/toy_clips/ is the default run:

    python data/make_toy_clips.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

from perflow_video.toy.toy_clips import ToyClipConfig, make_toy_clips


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """'64x64,96x128' -> ((64, 64), (96, 128)), each HEIGHTxWIDTH."""
    try:
        sizes = tuple(tuple(int(v) for v in item.lower().split("x")) for item in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"sizes must look like 64x64,96x128; got {text!r}") from e
    if any(len(s) != 2 or min(s) < 16 or s[0] % 2 or s[1] % 2 for s in sizes):
        raise argparse.ArgumentTypeError(f"each size is HEIGHTxWIDTH, even, at least 16; got {text!r}")
    return sizes


def main() -> None:
    d = ToyClipConfig()
    default_out = Path(__file__).resolve().parent / "toy_clips"
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=default_out, help=f"output folder (default: {default_out})"
    )
    parser.add_argument(
        "--num-clips",
        type=int,
        default=d.num_clips,
        help=f"clips to write; the first 24 are distinct color/shape/direction triples (default: {d.num_clips})",
    )
    parser.add_argument(
        "--seed", type=int, default=d.seed, help=f"seed for sizes, lengths, positions (default: {d.seed})"
    )
    parser.add_argument("--fps", type=int, default=d.fps, help=f"frame rate of the MP4s (default: {d.fps})")
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=d.sizes,
        help="comma-separated HEIGHTxWIDTH choices, drawn per clip (default: "
        + ",".join(f"{h}x{w}" for h, w in d.sizes)
        + ")",
    )
    parser.add_argument(
        "--min-frames",
        type=int,
        default=d.min_frames,
        help=f"shortest clip in frames (default: {d.min_frames})",
    )
    parser.add_argument(
        "--max-frames",
        type=int,
        default=d.max_frames,
        help=f"longest clip in frames (default: {d.max_frames})",
    )
    parser.add_argument(
        "--crf", type=int, default=d.crf, help=f"x264 quality, lower is better and bigger (default: {d.crf})"
    )
    args = parser.parse_args()
    config = ToyClipConfig(
        num_clips=args.num_clips,
        seed=args.seed,
        fps=args.fps,
        sizes=args.sizes,
        min_frames=args.min_frames,
        max_frames=args.max_frames,
        crf=args.crf,
        page_dir=d.page_dir,
    )
    clips = make_toy_clips(args.out, config)
    size_kb = sum(p.stat().st_size for p in args.out.iterdir()) / 1024
    print(f"wrote {len(clips)} clips, {size_kb:.0f} KiB, to {args.out}")


if __name__ == "__main__":
    main()
