"""Fine-tune the tiny teacher into a variant that draws smaller objects: the stand-in for a community SD1.5
checkpoint in the plug-and-play evidence (docs/evidence.md, claim (f)).

    python scripts/train_tiny_variant.py --out outputs/tiny-variant
    python scripts/benchmark_evidence.py --teacher outputs/tiny-variant \\
        --student base-dW=perflow_video/tiny/assets/tiny_teacher_student/delta_weights.safetensors ...

Only the spatial UNet is trained (single frames, epsilon objective), as community checkpoints are image
fine-tunes; VAE, text encoder, tokenizer, scheduler and motion adapter are the teacher's. Run it again with
the same --out to resume. At the end the variant and the teacher sample the same prompts and noise (DDIM-50,
CFG 5): the mean object area of their clips and the probe's accuracy are printed and stored in
<out>/variant_info.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from perflow_video.atomic_files import atomic_destination  # noqa: E402
from perflow_video.errors import exit_status_of  # noqa: E402
from perflow_video.evaluation.evidence_models import load_teacher  # noqa: E402
from perflow_video.evaluation.evidence_samplers import make_items, select_prompts  # noqa: E402
from perflow_video.evaluation.evidence_samplers import teacher_scheduler as sampler_of  # noqa: E402
from perflow_video.evaluation.sampling import sample_latents  # noqa: E402
from perflow_video.evaluation.teacher_variant import (  # noqa: E402
    VARIANT_INFO,
    VariantConfig,
    disc_area,
    finetune_variant,
    object_area,
)
from perflow_video.families.loading import resolve_model_path  # noqa: E402
from perflow_video.toy.probe import probe_accuracy  # noqa: E402

DEFAULTS = VariantConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--teacher", default="tiny-teacher", help="the teacher's diffusers AnimateDiff folder [%(default)s]")
    a(
        "--out",
        default="outputs/tiny-variant",
        help="the variant's folder (and training/ checkpoint) [%(default)s]",
    )
    a(
        "--min-radius",
        type=float,
        default=DEFAULTS.min_radius,
        help="smallest object half-size, pixels [%(default)s]",
    )
    a(
        "--max-radius",
        type=float,
        default=DEFAULTS.max_radius,
        help="largest object half-size, pixels [%(default)s]",
    )
    a("--steps", type=int, default=DEFAULTS.steps, help="optimizer steps [%(default)s]")
    a("--frames", type=int, default=DEFAULTS.frames_per_step, help="single frames per step [%(default)s]")
    a("--lr", type=float, default=DEFAULTS.learning_rate, help="AdamW learning rate [%(default)s]")
    a("--seed", type=int, default=DEFAULTS.seed, help="seed of data, noise and timesteps [%(default)s]")
    a(
        "--eval-prompts",
        type=int,
        default=12,
        help="prompts sampled by variant and teacher at the end [%(default)s]",
    )
    a("--threads", type=int, default=1, help="torch CPU threads [%(default)s]")
    a("--debug", action="store_true", help="show the traceback of a user error")
    return p  # fmt: skip


@torch.no_grad()
def sample_and_measure(folder: str, prompts: int, steps: int = 50, cfg: float = 5.0) -> dict:
    """DDIM-``steps`` clips at CFG ``cfg`` of ``folder`` on the evidence prompts (seed 0): object area, probe."""
    model = load_teacher(folder, num_frames=16)
    items = make_items(select_prompts(str(prompts)), 1)
    noise = torch.stack([it.noise(model.latent_shape()) for it in items])
    texts = [it.prompt for it in items]
    scheduler = sampler_of("ddim", "trailing", model.scheduler_config)
    cond, uncond = model.conditioning(texts), model.conditioning([""] * len(texts))
    pixels = model.decode(sample_latents(model.unet, scheduler, noise, cond, uncond, steps, cfg))
    acc = probe_accuracy(list(pixels), texts)
    return {"object_area": round(sum(object_area(p) for p in pixels) / len(pixels), 1),
            "probe": {k: round(v, 3) for k, v in acc.items()}}  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    teacher = Path(resolve_model_path(args.teacher, "animatediff"))
    config = VariantConfig(args.min_radius, args.max_radius, args.steps, args.frames, args.lr, seed=args.seed)
    out = Path(args.out)
    bar = tqdm(total=config.steps, desc="variant", unit="step")

    def progress(step: int, total: int, loss: float) -> None:
        bar.n = step
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.refresh()

    summary = finetune_variant(teacher, out, config, progress)
    bar.close()
    summary["samples_ddim50_cfg5"] = {
        "variant": sample_and_measure(str(out), args.eval_prompts),
        "teacher": sample_and_measure(str(teacher), args.eval_prompts),
        "disc_area_at_radius": {r: round(disc_area(r), 1) for r in (3.0, 4.5, 7.0)},
    }
    with atomic_destination(out / VARIANT_INFO) as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["samples_ddim50_cfg5"], indent=2))
    print(f"wrote the variant to {out}/ (loss {summary['loss_first_50']} -> {summary['loss_last_50']})")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_status_of(lambda: run(args) and 0, args.debug)


if __name__ == "__main__":
    sys.exit(main())
