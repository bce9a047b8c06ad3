"""Command line of ``scripts/generate.py``: 4-step clips (animatediff) or PNG images (sd15, sd21, sdxl) from
a trained PeRFlow student.

The family comes from the run's config.yaml (``--run``), else ``--family``, else the ΔW's metadata
(``--delta``), else animatediff; it is known before anything loads, so that flags the family cannot use
(``--num_frames`` for an image family, ``--format png`` for a video one) are refused first.
A user mistake (a missing run folder, an empty prompts file, too many frames, an unwritable output)
is one ``error: ...`` line on stderr and exit status 2; ``--debug`` shows its traceback instead.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from perflow_video.errors import ConfigError, exit_status_of
from perflow_video.family_names import FAMILY_NAMES
from perflow_video.generation.clip_request import IMAGE_FORMATS
from perflow_video.media.video_export import CLIP_FORMATS

DEFAULT_OUTPUT = "generated"

EPILOG = """\
model source:
  --run DIR      a finished training output folder (config.yaml, student/, scheduler/, train_summary.json);
                 its config.yaml says the family
  --base MODEL [--family F] [--motion_adapter A] [--delta FILE [--delta_scale S]]
                 a base model (+ motion adapter) with a trained delta_weights.safetensors added; the family
                 is --family, else the delta's (its metadata), else animatediff
  (none)         the tiny default of --family (animatediff if not given): the finished run in
                 outputs/tiny-<family> if there is one (python scripts/train_animatediff.py, or
                 python scripts/train_image.py --model <family> --tiny), else the embedded model itself:
                 for animatediff the trained tiny teacher (tiny-teacher: 32 x 32 px, 16 frames), for an
                 image family its untrained tiny model

image families (sd15, sd21, sdxl):
  diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline on the student with the PeRFlowScheduler;
  one PNG per prompt at the run's resolution (--height/--width to change it): --output x.png for one prompt,
  or a folder: NN_<prompt slug>.png beside images.json (prompt, seed, steps, guidance, size, model, file,
  UNet evaluations and seconds of each). The video-only flags (--num_frames, --fps, --video, --strength,
  --context_length, --context_stride, --format gif/mp4) are an error with an image family.

video-to-video (--video IN.mp4 --strength S):
  diffusers' AnimateDiffVideoToVideoPipeline on the same components and scheduler. The first --num_frames
  frames of IN.mp4 are resized to cover --height x --width and center-cropped, encoded by the VAE, noised to
  the teacher's marginal at the first timestep strength keeps, and the remaining PeRFlow steps run from there.
  Strength removes steps, it never adds any: of the --steps steps only the last int(steps x S) run. With
  the default 4 steps (one per time window): S = 1 runs 4 steps from t = 1 (timesteps 1000 750 500 250),
  0.75 runs 3 from t = 0.75 (750 500 250), 0.5 runs 2 (500 250), 0.25 runs 1 (250); S in between rounds
  down, and S < 1/steps runs none (an error). At S = 1 the input keeps a faint trace (sqrt(abar(1)) = 0.04
  for AnimateDiff's schedule), exactly what the student was trained on at t = 1.

long clips (FreeNoise):
  --num_frames above the motion modules' frame positions (motion_max_seq_length: 32 for the tiny models and
  the SD1.5 v2/v3 adapters) needs --context_length N: diffusers' FreeNoise runs the motion modules on
  windows of N frames every --context_stride frames and blends them; the PeRFlow steps are unchanged.

examples:
  python scripts/generate.py --run outputs/perflow-animatediff-sd15 --prompt "a dog running on the beach" \\
      --num_frames 16 --guidance_scale 4.5 --output dog.mp4
  python scripts/generate.py --prompts prompts.txt --output clips/ --format gif
  python scripts/generate.py --run outputs/tiny-sdxl --prompt "a red circle" --output circle.png
  python scripts/generate.py --base stabilityai/stable-diffusion-xl-base-1.0 --delta delta_weights.safetensors \
      --prompts prompts.txt --output images/
  python scripts/generate.py --run RUN --video walk.mp4 --strength 0.5 --prompt "a robot walking" --output robot.mp4
  python scripts/generate.py --run RUN --prompt "waves" --num_frames 64 --context_length 16 --context_stride 4 \\
      --cpu_offload --vae_slicing --output waves.mp4
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="generate.py",
        description="Sample clips (AnimateDiff) or PNG images (SD1.5 / SD2.1 / SDXL) from a PeRFlow student "
        "with diffusers' own pipeline and the PeRFlowScheduler (4 steps by default).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    _add_model_flags(parser)
    _add_prompt_flags(parser)
    _add_sampling_flags(parser)
    _add_video_flags(parser)
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
        help="instead of --run: a base model of --family (diffusers folder, hub id, tiny, or "
        "tiny-teacher for animatediff) to sample, "
        "with --delta added (default with --delta: the base model the delta was trained on)",
    )
    add(
        "--family",
        choices=FAMILY_NAMES,
        help="with --base (or alone: its tiny default): the model family, animatediff (clips) or sd15 / sd21 "
        "/ sdxl (images). Default: the family --delta was trained on, else animatediff; a --run says its own",
    )
    add(
        "--motion_adapter",
        metavar="ADAPTER",
        help="with --base, animatediff only: MotionAdapter folder / hub id / original motion-module file, or "
        "tiny / tiny-teacher (default: the delta's, the base's own for --base tiny / tiny-teacher, else "
        "guoyww/animatediff-motion-adapter-v1-5-2)",
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
        help="a prompt (repeat the flag for several; one clip or image each, in the order given)",
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
        help="video families: frames per clip (default: the run's model.num_frames; 16 for the tiny teacher; "
        "with --video: the input's frames up to that many); at most the motion modules' motion_max_seq_length "
        "unless --context_length is given",
    )
    add("--height", type=int, help="clip / image height in pixels (default: the run's / model's resolution)")
    add("--width", type=int, help="clip / image width in pixels (default: the run's / model's resolution)")
    add(
        "--seed",
        type=int,
        default=0,
        help="random seed (default: 0); prompt i uses seed + i, so the same seed gives the same clips / images",
    )
    add("--fps", type=float, help="video families: frame rate of the written clips (default: 8)")


def _add_video_flags(parser: argparse.ArgumentParser) -> None:
    """Video-to-video and long clips (see the epilog)."""
    add = parser.add_argument_group("video-to-video and long clips").add_argument
    add(
        "--video",
        metavar="IN",
        help="video-to-video: restyle this clip (any file FFmpeg reads; its first --num_frames frames, "
        "resized and center-cropped to the model's resolution) with each prompt",
    )
    add(
        "--strength",
        type=float,
        help="with --video, in (0, 1] (default: 0.75): how far the input is re-noised. Only the last "
        "int(steps x strength) of the --steps steps run, from the input noised to the first of them: with "
        "4 steps 1 / 0.75 / 0.5 / 0.25 run 4 / 3 / 2 / 1 steps (see below)",
    )
    add(
        "--context_length",
        type=int,
        metavar="N",
        help="FreeNoise for clips longer than the motion modules' frame positions: windows of N frames "
        "(at most motion_max_seq_length; best the clip length the model was trained on, e.g. 16). "
        "Default: off",
    )
    add(
        "--context_stride",
        type=int,
        metavar="S",
        help="with --context_length: frames between the starts of FreeNoise windows (default: 4, or N if "
        "smaller)",
    )


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    """Where the clips go."""
    add = parser.add_argument_group("output").add_argument
    add(
        "--output",
        default=DEFAULT_OUTPUT,
        metavar="PATH",
        help="a .gif or .mp4 file (clips) or .png file (images) for one prompt, or a folder (default: "
        "%(default)s/): then the files are named NN_<prompt slug>.<format> in prompt order beside clips.json "
        "/ images.json (prompt, seed, steps, guidance, model and file of each)",
    )
    add(
        "--format",
        dest="video_format",
        choices=(*CLIP_FORMATS, *IMAGE_FORMATS),
        help="file format when --output is a folder: gif or mp4 for clips (default: mp4), png for images "
        "(the default and only choice)",
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
    add(
        "--attention",
        choices=("xformers", "sdpa"),
        help="attention backend of the UNet and VAE: sdpa (PyTorch scaled_dot_product_attention, diffusers' "
        "default) or xformers (needs the xformers package and a CUDA GPU); default: diffusers' own",
    )
    add(
        "--cpu_offload",
        action="store_true",
        help="CUDA only: keep the models in CPU memory and move each to the GPU while it runs (diffusers' "
        "enable_model_cpu_offload; less GPU memory, a little slower); an error on --device cpu",
    )
    add(
        "--vae_slicing",
        action="store_true",
        help="decode (and, for --video, encode) one frame at a time through the VAE (less memory)",
    )
    add(
        "--vae_tiling",
        action="store_true",
        help="decode / encode large frames in overlapping tiles (less memory at high resolutions; no effect "
        "below the VAE's tile size)",
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


def _request(args: argparse.Namespace):
    """The ClipRequest of the flags (device default: cuda if available; dtype: bf16 on CUDA, else fp32)."""
    import torch

    from perflow_video.generation.clips import ClipRequest

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"--device {device!r}: {err}") from None
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    return ClipRequest(
        prompts=_prompts(args), output=Path(args.output), negative_prompt=args.negative_prompt,
        steps=args.steps, guidance_scale=args.guidance_scale, num_frames=args.num_frames,
        height=args.height, width=args.width, seed=args.seed, fps=args.fps,
        video_format=args.video_format, device=device, dtype=dtype,
        video=Path(args.video) if args.video is not None else None, strength=args.strength,
        context_length=args.context_length, context_stride=args.context_stride, attention=args.attention,
        cpu_offload=args.cpu_offload, vae_slicing=args.vae_slicing, vae_tiling=args.vae_tiling,
    )  # fmt: skip


def _from_base(args: argparse.Namespace) -> bool:
    """Whether the model comes from --base/--delta (checked against --run and --motion_adapter)."""
    from_base = args.base is not None or args.delta is not None or args.motion_adapter is not None
    if args.run and (from_base or args.family is not None):
        raise ConfigError(
            "--run takes the model (and its family) from the run folder: leave out "
            "--base/--motion_adapter/--delta/--family"
        )
    if from_base and args.base is None and args.delta is None:
        raise ConfigError("--motion_adapter goes with --base MODEL (or --delta FILE)")
    return from_base


def _model_source(args: argparse.Namespace):
    """What the model flags name, resolved before anything loads: (family name, source) where source is the
    run folder, a ``BaseSource`` (its ΔW read), or None for the tiny default."""
    from perflow_video.generation.model_source import DEFAULT_FAMILY, check_run_folder, resolve_base

    from_base = _from_base(args)
    if args.run:
        return check_run_folder(Path(args.run))[1].name, Path(args.run)
    if from_base:
        source = resolve_base(args.base, args.motion_adapter, args.delta, args.family)
        return source.family.name, source
    return args.family or DEFAULT_FAMILY, None


def _load(args: argparse.Namespace, family: str, source):
    from perflow_video.generation.model_source import load_base_source, load_run, load_tiny_default

    start = time.perf_counter()
    if isinstance(source, Path):
        loaded = load_run(source, args.num_frames)
    elif source is not None:
        loaded = load_base_source(source, args.delta_scale, args.num_frames)
    else:
        loaded, note = load_tiny_default(args.num_frames, family=family)
        print(note)
    print(
        f"model: {loaded.description} ({loaded.family.name}), loaded in {time.perf_counter() - start:.1f} s"
    )
    return loaded


def _main(args: argparse.Namespace) -> int:
    from perflow_video.generation.clips import check_request, generate

    request = _request(args)
    family, source = _model_source(args)
    check_request(request, family)  # before loading anything (creates the output folder)
    loaded = _load(args, family, source)
    samples = generate(request, loaded)
    evaluations = sum(s.unet_evaluations for s in samples)
    seconds = sum(s.seconds for s in samples)
    kind = "clip(s)" if loaded.is_video else "image(s)"
    print(f"done: {len(samples)} {kind}, {evaluations} UNet evaluations, {seconds:.2f} s sampling")
    return 0
