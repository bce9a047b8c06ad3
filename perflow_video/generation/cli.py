"""Command line of ``scripts/generate.py``: 4-step clips from a trained PeRFlow student.

A user mistake (a missing run folder, an empty prompts file, too many frames, an unwritable output)
is one ``error: ...`` line on stderr and exit status 2; ``--debug`` shows its traceback instead.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from perflow_video.errors import ConfigError, exit_status_of
from perflow_video.media.video_export import CLIP_FORMATS

DEFAULT_OUTPUT = "generated"

EPILOG = """\
model source:
  --run DIR      a finished training output folder (config.yaml, student/, scheduler/, train_summary.json)
  --base MODEL [--motion_adapter A] [--delta FILE [--delta_scale S]]
                 a base model (+ motion adapter) with a trained delta_weights.safetensors added
  (none)         the tiny default: the finished run in outputs/tiny-animatediff if there is one
                 (python scripts/train_animatediff.py), else the untrained tiny teacher

examples:
  python scripts/generate.py --run outputs/perflow-animatediff-sd15 --prompt "a dog running on the beach" \\
      --num_frames 16 --guidance_scale 4.5 --output dog.mp4
  python scripts/generate.py --prompts prompts.txt --output clips/ --format gif
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="generate.py",
        description="Sample clips from a PeRFlow student with diffusers' own pipeline and the "
        "PeRFlowScheduler (4 steps by default).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    _add_model_flags(parser)
    _add_prompt_flags(parser)
    _add_sampling_flags(parser)
    _add_output_flags(parser)
    _add_device_flags(parser)
    return parser


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Where the student comes from (see the epilog)."""
    add = parser.add_argument_group("model source").add_argument
    add(
        "--run",
        metavar="DIR",
        help="a finished training output folder; without it: the tiny default (see below)",
    )
    add(
        "--base",
        metavar="MODEL",
        help="instead of --run: a base SD1.5 model (diffusers folder, hub id, or tiny) to sample, "
        "with --delta added (default with --delta: the base model the delta was trained on)",
    )
    add(
        "--motion_adapter",
        metavar="ADAPTER",
        help="with --base: MotionAdapter folder / hub id / original motion-module file, or tiny "
        "(default: the delta's, tiny for --base tiny, else guoyww/animatediff-motion-adapter-v1-5-2)",
    )
    add(
        "--delta",
        metavar="FILE",
        help="with --base (or alone): a delta_weights.safetensors to add to the base model; its metadata "
        "gives the scheduler's parameterization and K",
    )
    add(
        "--delta_scale",
        type=float,
        default=1.0,
        help="scale of the delta (default: 1 = the trained student; 0 = the base model)",
    )


def _add_prompt_flags(parser: argparse.ArgumentParser) -> None:
    """What to generate."""
    add = parser.add_argument_group("prompts").add_argument
    add(
        "--prompt",
        action="append",
        default=[],
        metavar="TEXT",
        help="a prompt (repeat the flag for several; one clip each, in the order given)",
    )
    add(
        "--prompts",
        metavar="FILE",
        help="a text file with one prompt per line (blank lines and lines starting with # are skipped); "
        "its prompts follow those of --prompt",
    )
    add("--negative_prompt", metavar="TEXT", help="negative prompt (used only with --guidance_scale > 1)")


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """How to sample: steps, guidance, size, seed."""
    add = parser.add_argument_group("sampling").add_argument
    add("--steps", type=int, default=4, help="sampling steps (default: 4, one per PeRFlow time window)")
    add(
        "--guidance_scale",
        type=float,
        default=1.0,
        help="classifier-free guidance scale; 1 (default) = no CFG, one UNet evaluation per step, "
        "> 1 = two per step",
    )
    add(
        "--num_frames",
        type=int,
        help="frames per clip (default: the run's model.num_frames; 16 for the tiny teacher); at most the "
        "motion modules' motion_max_seq_length",
    )
    add("--height", type=int, help="clip height in pixels (default: the run's / model's resolution)")
    add("--width", type=int, help="clip width in pixels (default: the run's / model's resolution)")
    add(
        "--seed",
        type=int,
        default=0,
        help="random seed (default: 0); prompt i uses seed + i, so the same seed gives the same clips",
    )
    add("--fps", type=float, default=8, help="frame rate of the written clips (default: 8)")


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    """Where the clips go."""
    add = parser.add_argument_group("output").add_argument
    add(
        "--output",
        default=DEFAULT_OUTPUT,
        metavar="PATH",
        help="a .gif or .mp4 file (one prompt), or a folder (default: %(default)s/): then clips are "
        "named NN_<prompt slug>.<format> in prompt order beside clips.json (prompt, seed, steps, "
        "guidance, model and file of each)",
    )
    add(
        "--format",
        dest="video_format",
        choices=CLIP_FORMATS,
        default="mp4",
        help="clip format when --output is a folder (default: mp4)",
    )


def _add_device_flags(parser: argparse.ArgumentParser) -> None:
    """Device, dtype and debugging."""
    add = parser.add_argument_group("device").add_argument
    add("--device", help="torch device (default: cuda if available, else cpu)")
    add(
        "--dtype",
        choices=("fp32", "fp16", "bf16"),
        help="weights and activations dtype (default: bf16 on CUDA, fp32 on CPU)",
    )
    add("--debug", action="store_true", help="show the traceback of a user error")  # fmt: skip


def _prompts(args: argparse.Namespace) -> list[str]:
    from perflow_video.generation.prompts import read_prompts

    prompts = [p.strip() for p in args.prompt]
    if any(not p for p in prompts):
        raise ConfigError("--prompt: an empty prompt; give some text")
    if args.prompts:
        prompts += read_prompts(args.prompts)
    if not prompts:
        raise ConfigError("no prompt: give --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_status_of(lambda: _main(args), args.debug)


def _main(args: argparse.Namespace) -> int:
    import torch

    from perflow_video.generation.clips import ClipRequest, check_request, generate
    from perflow_video.generation.model_source import (
        check_run_folder,
        load_base,
        load_run,
        load_tiny_default,
    )

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"--device {device!r}: {err}") from None
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    request = ClipRequest(
        prompts=_prompts(args), output=Path(args.output), negative_prompt=args.negative_prompt,
        steps=args.steps, guidance_scale=args.guidance_scale, num_frames=args.num_frames,
        height=args.height, width=args.width, seed=args.seed, fps=args.fps,
        video_format=args.video_format, device=device, dtype=dtype,
    )  # fmt: skip
    from_base = args.base is not None or args.delta is not None or args.motion_adapter is not None
    if args.run and from_base:
        raise ConfigError(
            "--run takes the model from the run folder: leave out --base/--motion_adapter/--delta"
        )
    if from_base and args.base is None and args.delta is None:
        raise ConfigError("--motion_adapter goes with --base MODEL (or --delta FILE)")
    if args.run:
        check_run_folder(Path(args.run))
    check_request(request)  # before loading anything (creates the output folder)
    start = time.perf_counter()
    if args.run:
        loaded = load_run(args.run, args.num_frames)
    elif from_base:
        loaded = load_base(args.base, args.motion_adapter, args.delta, args.delta_scale, args.num_frames)
    else:
        loaded, note = load_tiny_default(args.num_frames)
        print(note)
    print(
        f"model: {loaded.description} ({loaded.family.name}), loaded in {time.perf_counter() - start:.1f} s"
    )
    clips = generate(request, loaded)
    evaluations = sum(c.unet_evaluations for c in clips)
    seconds = sum(c.seconds for c in clips)
    print(f"done: {len(clips)} clip(s), {evaluations} UNet evaluations, {seconds:.2f} s sampling")
    return 0
