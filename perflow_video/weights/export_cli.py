"""Command line of ``scripts/export_delta.py``: a run's ΔW (or any ΔW) in the files other tools load.

A user mistake (a missing run, a format the ΔW has no keys for, a bad rank) is one ``error: ...`` line on
stderr and exit status 2; ``--debug`` shows its traceback instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from perflow_video.errors import ConfigError, PathNotFoundError, exit_status_of
from perflow_video.weights.delta_export import DELTA_FORMATS, FILENAMES, applicable_formats, export_all
from perflow_video.weights.delta_sources import delta_from_merged, read_delta, read_state
from perflow_video.weights.delta_weights import DeltaMetadata, is_motion_key
from perflow_video.weights.lora_export import lora_fidelity
from perflow_video.weights.motion_lora import captured_share_by_rank

EPILOG = (
    """\
formats (default: every one the ΔW has keys for):
"""
    + "\n".join(f"  {f:22s} -> {FILENAMES[f]}" for f in DELTA_FORMATS)
    + """

examples:
  python scripts/export_delta.py --run outputs/tiny-animatediff --out exported/ --rank 16
  python scripts/export_delta.py --delta perflow-sd15-delta/unet --variant v0-1 --format lora_kohya --rank 64
  python scripts/export_delta.py --merged perflow-sd15/unet --base sd15/unet --format lora_peft --energy 0.9
  python scripts/export_delta.py --run outputs/tiny-animatediff --fidelity 1,4,16,64
"""
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="export_delta.py",
        description="Write a PeRFlow ΔW as diffusers / ComfyUI / A1111 files: exact ΔW, LoRAs (truncated "
        "SVD), full .diff patches, motion LoRAs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    src = p.add_argument_group("ΔW source (one of)").add_argument
    src("--run", metavar="DIR", help="a finished training run (its delta_weights.safetensors)")
    src("--delta", metavar="PATH", help="a ΔW .safetensors file, or a diffusers UNet folder of differences")
    src("--variant", help="weight variant of a --delta / --merged folder (the official PeRFlow ΔW: v0-1)")
    src("--merged", metavar="PATH", help="an accelerated UNet (folder or file); ΔW = merged - --base")
    src("--base", metavar="PATH", help="the UNet --merged was made from (folder or .safetensors file)")
    out = p.add_argument_group("what to write").add_argument
    out("--out", metavar="DIR", default="exported", help="output folder [%(default)s]")
    out(
        "--format",
        action="append",
        choices=DELTA_FORMATS,
        help="a format to write (repeatable) [all that fit]",
    )
    out("--rank", type=int, default=64, help="rank cap of the LoRA formats [%(default)s]")
    out("--energy", type=float, help="instead of / with --rank: keep the fewest singular values holding this "
        "share of each layer's squared norm, e.g. 0.9")  # fmt: skip
    out("--fidelity", metavar="RANKS", help="print LoRA fidelity for these ranks (e.g. 1,4,16,64) and stop")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return p


def _metadata_stub(base: str) -> DeltaMetadata:
    """Metadata for a ΔW that came without ours (official release, merged - base): SD1.5 defaults."""
    return DeltaMetadata("sd15", base, "diff_eps", 4, "fixed", 7.5, "diffusers_unet")


def _read(args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], DeltaMetadata]:
    chosen = [name for name in ("run", "delta", "merged") if getattr(args, name)]
    if len(chosen) != 1:
        raise ConfigError("give exactly one ΔW source: --run, --delta or --merged (with --base)")
    if args.merged:
        if not args.base:
            raise ConfigError("--merged needs --base (ΔW = merged - base)")
        merged, base = read_state(args.merged, args.variant), read_state(args.base)
        return delta_from_merged(merged, base), _metadata_stub(args.base)
    path = Path(args.run) / "delta_weights.safetensors" if args.run else Path(args.delta)
    if args.run and not path.is_file():
        raise PathNotFoundError(f"--run {args.run}: no delta_weights.safetensors (did the run finish?)")
    delta, meta = read_delta(path, args.variant)
    return delta, meta or _metadata_stub(str(path))


def print_fidelity(delta: dict[str, torch.Tensor], ranks: list[int]) -> None:
    """Per rank: the spatial LoRA's relative Frobenius error and size; the motion LoRA's captured share."""
    if any(not is_motion_key(k) for k in delta):
        print("spatial LoRA: rank | relative error (LoRA'd layers) | overall | MB")
        for r, fid in lora_fidelity(delta, ranks).items():
            print(f"  {r:5d} | {fid.lora_relative_error:.4f} | {fid.relative_error:.4f} | "
                  f"{fid.payload_bytes / 1e6:.2f}")  # fmt: skip
    if any(is_motion_key(k) for k in delta):
        print("motion LoRA: rank | share of the motion ΔW's norm applied")
        for r, rep in captured_share_by_rank(delta, ranks).items():
            print(f"  {r:5d} | {rep.captured_share:.4f}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_status_of(lambda: _main(args), args.debug)


def _main(args: argparse.Namespace) -> int:
    delta, meta = _read(args)
    if args.fidelity:
        print_fidelity(delta, [int(r) for r in args.fidelity.split(",")])
        return 0
    formats = tuple(args.format) if args.format else tuple(applicable_formats(delta))

    def meta_for(layout: str) -> DeltaMetadata:
        return DeltaMetadata(**{**vars(meta), "layout": layout})

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = export_all(delta, out, meta_for, args.rank, args.energy, formats, meta.layout)
    for fmt, path in written.items():
        print(f"{fmt:22s} {path} ({path.stat().st_size / 1e6:.2f} MB)")
    manifest = {
        "source": vars(args),
        "metadata": vars(meta),
        "files": {f: p.name for f, p in written.items()},
    }
    (out / "export_manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return 0
