"""The PeRFlow trainer (docs/method.md §3): one accelerate loop for every model family.

The loop only talks to a :class:`~perflow_video.families.ModelFamily`; it does not know whether it
trains an image UNet, the SDXL UNet or an AnimateDiff motion UNet. Read :func:`train` top to bottom:
setup (``run_setup``) -> loop (:func:`run_loop`, one :func:`train_on_batch` per micro-batch, the paper's
step being ``step.perflow_step``) -> :func:`finish`.
"""

from __future__ import annotations

import gc
import json
import logging
from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from perflow_video.atomic_files import atomic_destination
from perflow_video.errors import UserError
from perflow_video.families import get_family
from perflow_video.method.reflow_evaluation import evaluate_student
from perflow_video.scheduler import perflow_scheduler_for
from perflow_video.training import checkpointing
from perflow_video.training.final_outputs import write_final_outputs
from perflow_video.training.metrics_log import append_metrics, metric_history
from perflow_video.training.run_setup import (
    available_tracker,
    build_optimization,
    load_data,
    load_models,
    make_accelerator,
    resume,
    scalar_config,
    start_run_folder,
)
from perflow_video.training.run_state import Run
from perflow_video.training.samples import write_samples
from perflow_video.training.step import per_sample_draws, perflow_step
from perflow_video.training.train_config import TrainConfig
from perflow_video.training.training_data import build_dataset, encode_batch

logger = logging.getLogger("perflow_video")


class NonFiniteLossError(UserError, RuntimeError):
    """Raised after too many NaN/inf losses in a row (the CLI prints its advice without a traceback)."""


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) a PeRFlow training; returns the output folder. See README "Training"."""
    out = Path(cfg.run.output_dir)
    report_to = available_tracker(cfg.run.report_to)
    accelerator = make_accelerator(cfg, out, report_to)
    start_run_folder(cfg, accelerator, out)

    family = get_family(cfg.model.family)
    dataset = build_dataset(cfg, family.data_kind)  # data errors before any model loads
    models = load_models(cfg, family, accelerator)
    data = load_data(cfg, family, models, dataset, accelerator, out)
    run = Run(
        cfg, accelerator, out, report_to, family, models, data,
        opt=build_optimization(cfg, models, data.dataset, accelerator),
    )  # fmt: skip
    resume(run)
    if report_to != "none":
        accelerator.init_trackers("perflow", config=scalar_config(cfg))

    run_loop(run)
    finish(run)
    return out


def run_loop(run: Run) -> None:
    """Optimizer steps up to ``optim.max_train_steps``, epoch by epoch; a resumed run skips the batches
    its checkpoint had already seen, so it continues with the same data order."""
    state, max_steps = run.state, run.cfg.optim.max_train_steps
    if run.data.eval_draws and state.global_step == 0:
        run_eval(run)  # the teacher's own score: what the student starts from
    progress = tqdm(
        total=max_steps,
        initial=state.global_step,
        disable=not run.accelerator.is_local_main_process,
        desc="steps",
    )
    while state.global_step < max_steps:
        epoch, skip = divmod(state.batches_seen, len(run.opt.loader))
        for batch in epoch_batches(run, epoch, skip):
            state.batches_seen += 1
            stepped = train_on_batch(run, batch, epoch)
            if stepped is None or not run.accelerator.sync_gradients:
                continue  # a skipped non-finite loss, or the middle of a gradient accumulation
            after_optimizer_step(run, *stepped, progress)
            if state.global_step >= max_steps:
                break
    progress.close()


def epoch_batches(run: Run, epoch: int, skip: int):
    """The loader of ``epoch`` without its first ``skip`` batches (already seen before a resume)."""
    loader = run.opt.loader
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    if hasattr(run.data.dataset, "dataset"):  # live data: new frame starts / crops each epoch
        run.data.dataset.dataset.set_epoch(epoch)
    return run.accelerator.skip_first_batches(loader, skip) if skip else loader


def train_on_batch(run: Run, batch: dict, epoch: int) -> tuple[Tensor, dict[str, Tensor]] | None:
    """The PeRFlow step on one micro-batch, its backward and (at the end of an accumulation) the optimizer
    step. Returns the step's (loss, per-window losses), or None when the loss was not finite on some
    process: then nothing is updated, and too many in a row raise :class:`NonFiniteLossError`."""
    acc, opt, m, cfg = run.accelerator, run.opt, run.models, run.cfg
    with acc.accumulate(opt.student):
        z_0, text = encode_batch(run.family, m.loaded, batch, acc.device, cfg.data.cache_latents)
        draws = per_sample_draws(
            batch["index"], tuple(z_0.shape[1:]), cfg.optim.seed, epoch, cfg.data.prompt_dropout, m.reflow,
            m.alphas_cumprod.numel(),
        )  # fmt: skip
        with acc.autocast():
            loss, window_logs = perflow_step(
                opt.student, m.teacher, z_0, text, run.data.empty_text, draws, m.alphas_cumprod, m.reflow,
                expand=partial(run.family.expand_conditioning, m.loaded),
            )  # fmt: skip
        finite = bool(acc.gather(torch.isfinite(loss.detach()).reshape(1)).all())
        if finite:
            acc.backward(loss)
            if acc.sync_gradients and cfg.optim.max_grad_norm > 0:
                acc.clip_grad_norm_(opt.params, cfg.optim.max_grad_norm)
            opt.optimizer.step()
            opt.lr_scheduler.step()
        opt.optimizer.zero_grad(set_to_none=True)
    if not finite:
        count_nonfinite(run)
        return None
    run.nonfinite_in_a_row = 0
    return loss, window_logs


def count_nonfinite(run: Run) -> None:
    """Record a skipped non-finite loss; raise after ``run.max_consecutive_nonfinite`` in a row."""
    run.nonfinite_in_a_row += 1
    run.nonfinite_total += 1
    step = run.state.global_step
    logger.warning("non-finite loss at step %d: skipped (%d in a row)", step, run.nonfinite_in_a_row)
    if run.nonfinite_in_a_row >= run.cfg.run.max_consecutive_nonfinite:
        raise NonFiniteLossError(
            f"{run.nonfinite_in_a_row} non-finite losses in a row at step {step}: lower "
            "optim.learning_rate, use mixed_precision=bf16 instead of fp16, or check the data"
        )


def after_optimizer_step(run: Run, loss: Tensor, window_logs: dict[str, Tensor], progress) -> None:
    """Count the step, update the EMA, then what is due: eval_loss, metrics, checkpoint, samples."""
    cfg, state = run.cfg.run, run.state
    state.global_step += 1
    step = state.global_step
    if run.opt.ema is not None:
        run.opt.ema.step(run.opt.params)
    mean_loss = run.accelerator.gather(loss.detach().reshape(1)).mean().item()
    if run.data.eval_draws and (step % cfg.eval_steps == 0 or step == run.cfg.optim.max_train_steps):
        run_eval(run)
    lr = run.opt.lr_scheduler.get_last_lr()[0]
    progress.update(1)
    progress.set_postfix(loss=f"{mean_loss:.4g}", lr=f"{lr:.2e}", **run.last_eval)
    if step % cfg.log_every == 0:
        per_window = {k: v.item() for k, v in window_logs.items()}  # this process's samples
        logs = {"loss": mean_loss, "lr": lr, "skipped_nonfinite": run.nonfinite_total, **per_window}
        log_metrics(run, logs)
    if cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0:
        save_checkpoint(run)
    if cfg.validation_steps and step % cfg.validation_steps == 0:
        write_validation_samples(run, run.opt.student, run.out / "samples" / f"step-{step}")


def run_eval(run: Run) -> None:
    """eval_loss on the fixed draws (and per window), logged at the current step."""
    with run.accelerator.autocast():
        result = evaluate_student(run.opt.student, run.data.eval_draws, run.models.reflow.num_time_windows)
    run.last_eval["eval"] = f"{result['eval_loss']:.4g}"
    logger.info("step %d: eval_loss %.5g", run.state.global_step, result["eval_loss"])
    log_metrics(run, result)


def log_metrics(run: Run, values: dict) -> None:
    """To the tracker (if any) and, on the main process, a plain-text copy in metrics.jsonl."""
    if run.report_to != "none":
        run.accelerator.log(values, step=run.state.global_step)
    if run.accelerator.is_main_process:  # for scripts and tests
        append_metrics(run.metrics_path, run.state.global_step, values)


def save_checkpoint(run: Run) -> None:
    """Every process saves its state into a temporary folder; the main process then makes it complete."""
    acc, state = run.accelerator, run.state
    tmp = checkpointing.temporary_dir(run.out, state.global_step)
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        path = checkpointing.finalize(
            run.out,
            checkpointing.TrainerState(state.global_step, state.batches_seen),
            run.cfg.run.checkpoints_total_limit,
        )
        logger.info("saved %s", path)
    acc.wait_for_everyone()


def write_validation_samples(run: Run, student: torch.nn.Module, folder: Path) -> None:
    """4-step samples of ``run.validation_prompts`` with the student (main process)."""
    cfg, models = run.cfg, run.models
    if not run.accelerator.is_main_process or not cfg.run.validation_prompts:
        return
    scheduler = perflow_scheduler_for(
        models.loaded.scheduler_config, models.reflow.parameterization, models.reflow.num_time_windows
    )
    write_samples(
        run.family, models.loaded, run.accelerator.unwrap_model(student), scheduler,
        cfg.run.validation_prompts, folder, cfg.model.resolution, cfg.run.num_inference_steps,
        cfg.run.guidance_scale, cfg.run.sample_format, cfg.optim.seed,
    )  # fmt: skip


def finish(run: Run) -> None:
    """Last checkpoint, final outputs and train_summary.json (main process), then release every process."""
    acc, state = run.accelerator, run.state
    every = run.cfg.run.checkpointing_steps
    if every == 0 or state.global_step % every != 0:  # 0 = only at the end
        save_checkpoint(run)
    acc.wait_for_everyone()
    # One number per process: data-parallel ranks must hold identical weights (checked by the tests).
    params = run.opt.params
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1).to(acc.device)
    checksums = acc.gather(checksum).tolist()
    if acc.is_main_process:
        write_outputs(run, checksums)
    # Release the DDP-wrapped student on every rank while the process group is alive: end_training
    # destroys the group, after which a DDP reducer's destructor can hang forever in gloo.
    run.opt = None
    acc.free_memory()
    gc.collect()
    acc.wait_for_everyone()
    acc.end_training()


def write_outputs(run: Run, param_checksums: list[float]) -> None:
    """The student, scheduler and ΔW files, the final samples, and last the summary."""
    if run.opt.ema is not None:
        run.opt.ema.copy_to(run.opt.params)  # export the averaged weights
    m = run.models
    final = m.trained.finish(run.accelerator.unwrap_model(run.opt.student), run.out)
    write_final_outputs(run.family, m.loaded, final.student, final.delta, m.reflow, run.cfg, run.out)
    write_validation_samples(run, final.student, run.out / "samples" / "final")
    summary = {
        "global_step": run.state.global_step,
        "skipped_nonfinite": run.nonfinite_total,
        "eval_loss": metric_history(run.metrics_path, "eval_loss"),  # this run's, resumes included
        "num_processes": run.accelerator.num_processes,
        "param_checksums": param_checksums,
    }
    # Written last and atomically: its presence means the run finished and every output is complete.
    with atomic_destination(run.out / "train_summary.json") as tmp:
        Path(tmp).write_text(json.dumps(summary))


__all__ = ["NonFiniteLossError", "train"]
