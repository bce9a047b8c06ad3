"""Regenerate the toy captioned clips (coloured shapes moving left/right/up/down) as H.264 MP4s.

Writes <out>/toy_NNN.mp4, <out>/toy_NNN.txt (sidecar caption) and <out>/captions.csv (WebVid layout:
videoid,name,page_dir). Same flags, same files. The shipped sample data/toy_clips/ is the default run:

    python data/make_toy_clips.py

With --shape-world it writes the tiny teacher's world instead (perflow_video/toy/shape_world.py: 32x32,
16 frames, shape half-size 4.5-7 px, 10-17 px of motion, random start), as sw_NNN.mp4 + sw_NNN.txt +
captions.csv in 4:4:4; --sizes, --min-frames and --max-frames do not apply. The shipped
data/shape_world_clips/ (what configs/tiny/animatediff.yaml trains on) is its default run:

    python data/make_toy_clips.py --shape-world
"""

from __future__ import annotations

import argparse
from pathlib import Path

from perflow_video.toy.shape_world_clips import ShapeWorldClipConfig, make_shape_world_clips
from perflow_video.toy.toy_clips import ToyClipConfig, make_toy_clips

DATA = Path(__file__).resolve().parent
DEFAULT_OUT = {False: DATA / "toy_clips", True: DATA / "shape_world_clips"}


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """'64x64,96x128' -> ((64, 64), (96, 128)), each HEIGHTxWIDTH."""
    try:
        sizes = tuple(tuple(int(v) for v in item.lower().split("x")) for item in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"sizes must look like 64x64,96x128; got {text!r}") from e
    if any(len(s) != 2 or min(s) < 16 or s[0] % 2 or s[1] % 2 for s in sizes):
        raise argparse.ArgumentTypeError(f"each size is HEIGHTxWIDTH, even, at least 16; got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    d, w = ToyClipConfig(), ShapeWorldClipConfig()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--out",
        type=Path,
        help=f"output folder (default: {DEFAULT_OUT[False]}; --shape-world: {DEFAULT_OUT[True]})",
    )
    add(
        "--shape-world",
        action="store_true",
        help="write shape-world clips (the tiny teacher's 32x32 world) instead of the toy clips",
    )
    add(
        "--num-clips",
        type=int,
        help=f"clips to write; toy: the first 24 are distinct color/shape/direction triples (default: "
        f"{d.num_clips}); --shape-world: each block of 66 holds every training prompt once (default: {w.num_clips})",
    )
    add("--seed", type=int, default=d.seed, help=f"seed for sizes, lengths, positions (default: {d.seed})")
    add("--fps", type=int, default=d.fps, help=f"frame rate of the MP4s (default: {d.fps})")
    add(
        "--sizes",
        type=parse_sizes,
        default=d.sizes,
        help="comma-separated HEIGHTxWIDTH choices, drawn per clip (default: "
        + ",".join(f"{h}x{w}" for h, w in d.sizes)
        + ")",
    )
    add(
        "--min-frames",
        type=int,
        default=d.min_frames,
        help=f"shortest clip in frames (default: {d.min_frames})",
    )
    add(
        "--max-frames",
        type=int,
        default=d.max_frames,
        help=f"longest clip in frames (default: {d.max_frames})",
    )
    add("--crf", type=int, default=d.crf, help=f"x264 quality, lower is better and bigger (default: {d.crf})")
    return parser


def write(args: argparse.Namespace, out: Path) -> int:
    """Writes what the flags ask for; returns the number of clips."""
    if args.shape_world:
        num_clips = ShapeWorldClipConfig().num_clips if args.num_clips is None else args.num_clips
        config = ShapeWorldClipConfig(num_clips=num_clips, seed=args.seed, fps=args.fps, crf=args.crf)
        return len(make_shape_world_clips(out, config))
    config = ToyClipConfig(
        num_clips=ToyClipConfig().num_clips if args.num_clips is None else args.num_clips,
        seed=args.seed,
        fps=args.fps,
        sizes=args.sizes,
        min_frames=args.min_frames,
        max_frames=args.max_frames,
        crf=args.crf,
    )
    return len(make_toy_clips(out, config))


def main() -> None:
    args = build_parser().parse_args()
    out = args.out or DEFAULT_OUT[args.shape_world]
    count = write(args, out)
    size_kb = sum(p.stat().st_size for p in out.iterdir()) / 1024
    print(f"wrote {count} clips, {size_kb:.0f} KiB, to {out}")


if __name__ == "__main__":
    main()
