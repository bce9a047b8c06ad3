"""Seconds per PeRFlow training step on the embedded tiny models, split by phase. Prints a markdown table.

One step is the trainer's PeRFlow step (perflow_video/training/step.py) run on the same library pieces, without
accelerate (CPU, mixed_precision=no: accelerate adds nothing there):

  data     next batch from the DataLoader (decode, crop, collate)
  encode   VAE encode of the pixels, per-sample draws (t, window, noise, prompt dropout), text encoding
  solve    the teacher's window solve (``solve_window``, M DDIM steps, no grad), timed inside ``reflow_loss``
  student  the rest of ``reflow_loss`` (student forward, target, loss) + backward + clipping + AdamW step

Separately, ONE no-grad teacher evaluation (``guided_eps``, as one solver step makes it) on the same
z_s, to report solve / (M x one forward). Medians over --steps steps after --warmup steps; "total" is
the median of the per-step sums; the footnotes repeat the ratio from minima (robust to shared cores).
Families without configs/tiny/<family>.yaml use the dataclass defaults.

    python scripts/benchmark_training.py                          # numbers in docs/benchmark_training.md
    python scripts/benchmark_training.py --families sd15 sdxl --steps 20 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
FALLBACK_RESOLUTION = {"sd15": 64, "sd21": 96, "sdxl": 128}  # tiny analogues of 512 / 768 / 1024
PHASES = ("data", "encode", "solve", "student", "total", "forward")


def load_config(family: str):
    """configs/tiny/<family>.yaml, or the dataclass defaults with the tiny image settings."""
    from perflow_video.training.train_config import load_train_config

    path = REPO / "configs" / "tiny" / f"{family}.yaml"
    if path.is_file():
        cfg = load_train_config(str(path), {}, [])
    else:
        overrides = [
            f"model.family={family}", "model.pretrained_model_name_or_path=tiny", "model.trainable=all",
            "data.train_data=data/toy_images/captions.csv", "data.caption_column=caption",
            f"model.resolution={FALLBACK_RESOLUTION[family]}",
        ]  # fmt: skip
        cfg = load_train_config(None, {}, overrides)
    if cfg.model.family != family:
        raise ValueError(f"{path}: model.family={cfg.model.family!r}, expected {family!r}")
    if not os.path.isabs(cfg.data.train_data):
        cfg.data.train_data = str(REPO / cfg.data.train_data)
    return cfg, path.is_file()


class TimedSolve:
    """Wraps ``solve_window`` where ``reflow_loss`` looks it up; keeps the last call's seconds and args."""

    def __init__(self, solve):
        self.solve, self.seconds, self.args = solve, 0.0, None

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.solve(*args, **kwargs)
        self.seconds, self.args = time.perf_counter() - start, args
        return out


def endless_batches(loader, dataset):
    """(epoch, batch) forever, calling set_epoch before each epoch's iterator as the trainer does."""
    epoch = 0
    while True:
        dataset.dataset.set_epoch(epoch)
        for batch in loader:
            yield epoch, batch
        epoch += 1


def bench_family(name: str, steps: int, warmup: int) -> dict:
    from perflow_video.families import get_family
    from perflow_video.families.attention import configure_attention
    from perflow_video.method import reflow_objective
    from perflow_video.method.noise_schedule import alphas_cumprod_from_scheduler_config
    from perflow_video.method.teacher_solver import guided_eps
    from perflow_video.method.time_windows import abar_index_of_time
    from perflow_video.training.frozen_models import FrozenModel
    from perflow_video.training.run_setup import family_spec
    from perflow_video.training.step import per_sample_draws
    from perflow_video.training.training_data import build_dataset

    cfg, from_yaml = load_config(name)
    torch.manual_seed(cfg.optim.seed)
    family = get_family(cfg.model.family)
    models = family.load(family_spec(cfg))
    pred_type = models.scheduler_config.get("prediction_type", "epsilon")
    reflow = replace(cfg.reflow, teacher_prediction_type=pred_type)
    abar = alphas_cumprod_from_scheduler_config(models.scheduler_config)
    family.set_trainable(models.student, cfg.model.trainable)
    configure_attention([models.teacher, models.student], cfg.model.attention)
    for module in models.frozen_modules():
        module.eval()
    teacher = FrozenModel(models.teacher, torch.float32)
    dataset = build_dataset(cfg, family.data_kind)
    o = cfg.optim
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=o.train_batch_size, shuffle=True, num_workers=cfg.data.num_workers,
        drop_last=True, generator=torch.Generator().manual_seed(o.seed),
    )  # fmt: skip
    params = [p for p in models.student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2),
        weight_decay=o.adam_weight_decay, eps=o.adam_epsilon,
    )  # fmt: skip
    batches = endless_batches(loader, dataset)
    times: dict[str, list[float]] = {k: [] for k in PHASES}
    timed = TimedSolve(reflow_objective.solve_window)
    reflow_objective.solve_window = timed
    try:
        for step in range(warmup + steps):
            t0 = time.perf_counter()
            epoch, batch = next(batches)
            t1 = time.perf_counter()
            with torch.no_grad():
                z_0 = family.encode_pixels(models, batch["pixel_values"]).float()
                shape = tuple(z_0.shape[1:])
                drops, t, k, noise = per_sample_draws(
                    batch["index"], shape, o.seed, epoch, cfg.data.prompt_dropout, reflow, abar.numel()
                )
                prompts = ["" if d else p for d, p in zip(drops, batch["prompt"], strict=True)]
                cond = family.encode_prompts(models, prompts, "cpu")
                uncond = None
                if reflow.guidance_scale != 1.0:
                    uncond = family.encode_prompts(models, [""] * len(prompts), "cpu")
            t2 = time.perf_counter()
            result = reflow_objective.reflow_loss(
                models.student, teacher, z_0, abar, reflow, cond, uncond, noise=noise, times=(t, k)
            )
            result.loss.backward()
            if o.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            # One teacher evaluation on the window start z_s, as the solver's first step makes it.
            _, z_s, t_s, _, ac, c, u, w, _, ptype = timed.args
            idx = abar_index_of_time(t_s, ac.numel())
            with torch.no_grad():
                t4 = time.perf_counter()
                guided_eps(teacher, z_s, idx, ac[idx].to(z_s.dtype), c, u, w, ptype)
                t5 = time.perf_counter()
            if step >= warmup:
                sample = (t1 - t0, t2 - t1, timed.seconds, t3 - t2 - timed.seconds, t3 - t0, t5 - t4)
                for key, value in zip(PHASES, sample, strict=True):
                    times[key].append(value)
    finally:
        reflow_objective.solve_window = timed.solve
    med = {k: statistics.median(v) for k, v in times.items()}
    med["ratio"] = med["solve"] / (reflow.solver_steps * med["forward"])
    # Minima are robust to other processes on the same cores (contention only adds time).
    med["ratio_min"] = min(times["solve"]) / (reflow.solver_steps * min(times["forward"]))
    return {"family": name, "batch": o.train_batch_size, "shape": shape, "M": reflow.solver_steps,
            "yaml": from_yaml, **med}  # fmt: skip


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported
    from perflow_video.family_names import FAMILY_NAMES as FAMILIES

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--families", nargs="+", choices=FAMILIES, default=list(FAMILIES), help="model families to time"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per family (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, caches)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch.set_num_threads; 1 (default) stays steady when other processes share the cores",
    )  # fmt: skip
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="perflow-bench-") as tmp:
        os.environ.setdefault("PERFLOW_VIDEO_CACHE", tmp)  # tiny models are built there on first use
        rows = [bench_family(f, args.steps, args.warmup) for f in args.families]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.steps} steps\n")
    print("| family | batch | latent shape | data s | encode s | teacher solve s | student fwd+bwd s "
          "| total s | solve/(M·fwd) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [r["family"], r["batch"], "×".join(map(str, r["shape"]))]
        cells += [f"{r[k]:.4f}" for k in ("data", "encode", "solve", "student", "total")]
        cells.append(f"{r['ratio']:.2f}")
        print("| " + " | ".join(map(str, cells)) + " |")
    print()
    for r in rows:
        source = f"configs/tiny/{r['family']}.yaml" if r["yaml"] else "dataclass defaults"
        print(
            f"- {r['family']}: M={r['M']}, one teacher forward {r['forward']:.4f} s, "
            f"solve/(M·fwd) from per-phase minima {r['ratio_min']:.2f} ({source})"
        )


if __name__ == "__main__":
    main()
