"""LoRA fidelity of a run's ΔW: per rank, the share of the ΔW's norm the LoRA files keep, their size,
and the 4-step sample distance to the full-ΔW student from the same noise (README "ΔW in other tools").

    python scripts/benchmark_lora.py --run outputs/tiny-animatediff --ranks 1,2,4,8,16,64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from perflow_video.errors import exit_status_of
from perflow_video.evaluation.lora_fidelity import sample_distance
from perflow_video.generation.model_source import load_run
from perflow_video.weights.delta_export import export_delta
from perflow_video.weights.delta_sources import read_delta
from perflow_video.weights.export_cli import print_fidelity

PROMPTS = ["a red circle moving left", "a blue square moving up", "a green triangle moving right"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="outputs/tiny-animatediff", help="a finished run [%(default)s]")
    p.add_argument("--ranks", default="1,2,4,8,16,64", help="LoRA ranks to measure [%(default)s]")
    p.add_argument("--seed", type=int, default=0, help="noise seed [%(default)s]")
    return p


def file_sizes(delta: dict, ranks: list[int]) -> dict[int, float]:
    """MB of the motion LoRA file (diffusers layout) per rank; the full ΔW file for comparison is on disk."""
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in ranks:
            path = export_delta(delta, "motion_lora_diffusers", Path(tmp) / f"r{r}.safetensors", rank=r)
            sizes[r] = path.stat().st_size / 1e6
    return sizes


def run(args: argparse.Namespace) -> int:
    ranks = [int(r) for r in args.ranks.split(",")]
    loaded = load_run(args.run)
    delta, _ = read_delta(Path(args.run) / "delta_weights.safetensors")
    print_fidelity(delta, ranks)
    family, models = loaded.family, loaded.models
    cond = family.expand_conditioning(models, family.encode_text(models, PROMPTS, "cpu"))
    size = loaded.resolution // 2 ** (len(models.vae.config.block_out_channels) - 1)  # latent side
    shape = (len(PROMPTS), 4, loaded.num_frames, size, size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    distances = sample_distance(models.teacher, delta, ranks, loaded.scheduler, noise, cond)
    sizes = file_sizes(delta, ranks)
    full_mb = (Path(args.run) / "delta_weights.safetensors").stat().st_size / 1e6
    print(f"4-step distance to the full-ΔW student: teacher {distances['0']:.4f}; ΔW file {full_mb:.2f} MB")
    print("| rank | RMS latent distance | motion LoRA file MB |\n|---:|---:|---:|")
    for r in ranks:
        print(f"| {r} | {distances[str(r)]:.4f} | {sizes[r]:.2f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_status_of(lambda: run(args), debug=False)


if __name__ == "__main__":
    sys.exit(main())
