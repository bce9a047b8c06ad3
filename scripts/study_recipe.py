"""The recipe study: how the distance of a PeRFlow student's 4-step samples to its teacher's 100-step
samples moves as it trains, under several optimisation recipes (docs/recipe_study.md).

    python scripts/study_recipe.py --teacher outputs/tiny-teacher/snapshot --out outputs/recipe-study

Writes <out>/pool.pt (the teacher targets, reused by later runs), <out>/results.jsonl (one line per
recipe: samples seen, distance, training loss, relative weight change) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import DDIMScheduler  # noqa: E402

from perflow_video.evaluation.recipe_study import (  # noqa: E402
    Fidelity,
    Recipe,
    TargetPool,
    build_target_pool,
    reference_trajectory,
    train_recipe,
    window_errors,
)
from perflow_video.families import get_family  # noqa: E402
from perflow_video.families.base import FamilySpec  # noqa: E402
from perflow_video.method.noise_schedule import alphas_cumprod_from_scheduler_config  # noqa: E402
from perflow_video.method.reflow_objective import ReflowConfig  # noqa: E402
from perflow_video.method.teacher_solver import Conditioning  # noqa: E402
from perflow_video.scheduler import perflow_scheduler_for  # noqa: E402
from perflow_video.toy.shape_world import ShapeWorld  # noqa: E402

RECIPES = {
    r.name: r
    for r in (
        Recipe("adamw-1e-4"),
        Recipe("adamw-1e-5", lr=1e-5),
        Recipe("adamw-1e-6", lr=1e-6),
        Recipe("adamw-1e-5-accum8", lr=1e-5, accumulation=8),
        Recipe("adamw-1e-4-accum8", lr=1e-4, accumulation=8),
        Recipe("adamw-1e-4-ema0.99", ema=0.99),
        Recipe("adam-eps1e-3-1e-4", optimizer="adam_large_eps"),
        Recipe("sgd-1e-2", optimizer="sgd", lr=1e-2),
        Recipe("sgd-1e-1", optimizer="sgd", lr=1e-1),
        Recipe("adamw-3e-5-accum8", lr=3e-5, accumulation=8),
    )
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--teacher", required=True, help="the teacher's diffusers folder (vae/, unet/, motion_adapter/ ...)"
    )
    p.add_argument("--out", default="outputs/recipe-study", help="output folder [%(default)s]")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names [all]")
    p.add_argument(
        "--trainable", choices=("motion", "all"), default="motion", help="what trains [%(default)s]"
    )
    p.add_argument("--pool", type=int, default=1024, help="items in the target pool [%(default)s]")
    p.add_argument("--samples", type=int, default=2048, help="training samples per recipe [%(default)s]")
    p.add_argument("--eval-every", type=int, default=256, help="samples between scores [%(default)s]")
    p.add_argument("--prompts", type=int, default=12, help="fidelity prompts (1 seed each) [%(default)s]")
    p.add_argument("--windows", type=int, default=4, help="K [%(default)s]")
    p.add_argument("--solver-steps", type=int, default=8, help="M [%(default)s]")
    p.add_argument("--weighting", choices=("endpoint", "uniform"), default="endpoint", help="[%(default)s]")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads [%(default)s]")
    p.add_argument("--seed", type=int, default=0, help="[%(default)s]")
    return p


def load_teacher(folder: str, num_frames: int = 16):
    family = get_family("animatediff")
    spec = FamilySpec(folder, f"{folder}/motion_adapter", None, None, None, 32, num_frames)
    return family, family.load(spec)


def encode(family, models, prompts: list[str]) -> torch.Tensor:
    return family.encode_text(models, prompts, "cpu").encoder_hidden_states


def pool_batches(family, models, n: int, seed: int, batch: int = 8):
    world = ShapeWorld("train", seed=seed + 1)
    for start in range(0, n, batch):
        clips, captions = world.batch(start, min(batch, n - start))
        z_0 = family.encode_pixels(models, clips.permute(0, 2, 1, 3, 4))
        yield z_0, encode(family, models, captions)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    family, models = load_teacher(args.teacher)

    def expand(text: torch.Tensor) -> Conditioning:
        return family.expand_conditioning(models, Conditioning(text))

    alphas = alphas_cumprod_from_scheduler_config(models.scheduler_config)
    reflow = ReflowConfig(args.windows, args.solver_steps, loss_weighting=args.weighting)
    pool_path = out / f"pool-{args.pool}-K{args.windows}-M{args.solver_steps}-{args.weighting}.pt"
    t0 = time.time()
    if pool_path.exists():
        pool = TargetPool(**torch.load(pool_path))
    else:
        pool = build_target_pool(
            models.teacher,
            pool_batches(family, models, args.pool, args.seed),
            alphas,
            reflow,
            expand,
            args.seed,
        )
        torch.save(vars(pool), pool_path.with_suffix(".tmp"))
        pool_path.with_suffix(".tmp").replace(pool_path)
    print(f"pool: {len(pool)} items ({time.time() - t0:.0f} s)", flush=True)

    prompts = [ShapeWorld("all").spec(i * 6).prompt for i in range(args.prompts)]
    shape = (args.prompts, 4, 16, 8, 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed + 99))
    cond = expand(encode(family, models, prompts))
    t0 = time.time()
    perflow = perflow_scheduler_for(models.scheduler_config, "ddim_eps", args.windows)
    trajectory = reference_trajectory(models.teacher, noise, cond, alphas, args.windows)
    fid = Fidelity(noise, cond, trajectory[-1])  # teacher DDIM-100 on the window grid (25 steps a window)
    baselines = {
        spacing: fid.distance(
            models.teacher, DDIMScheduler.from_config(models.scheduler_config, timestep_spacing=spacing), 4
        )
        for spacing in ("linspace", "leading", "trailing")
    }
    print(f"reference ({time.time() - t0:.0f} s); teacher DDIM-4 distance by spacing {baselines}", flush=True)

    def score(unet: torch.nn.Module) -> dict:
        errors = window_errors(unet, perflow, trajectory, cond)
        return {"distance": fid.distance(unet, perflow, args.windows), "windows": errors}

    trainable = [
        k for k, _ in models.student.named_parameters() if args.trainable == "all" or "motion_modules" in k
    ]
    for name in args.recipes.split(","):
        t0 = time.time()
        r = train_recipe(
            models.student,
            trainable,
            pool,
            RECIPES[name],
            score,
            expand,
            args.samples,
            args.eval_every,
            args.seed,
        )
        row = {"recipe": name, "trainable": args.trainable, "ddim4": baselines, "samples": r.samples,
               "scores": r.scores, "train_loss": r.train_loss, "weight_change": r.weight_change,
               "seconds": round(time.time() - t0, 1)}  # fmt: skip
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        chain = " ".join(f"{d['distance']:.4f}" for d in r.scores)
        local = " | ".join(" ".join(f"{e:.4f}" for e in d["windows"]) for d in (r.scores[0], r.scores[-1]))
        print(
            f"{name:22s} {chain}  ({row['seconds']} s)\n{'':22s} per window, first | last: {local}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
