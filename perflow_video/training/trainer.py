"""The PeRFlow trainer (docs/method.md §3): one accelerate loop for every model family.

The loop only talks to a :class:`~perflow_video.families.ModelFamily`; it does not know whether it
trains an image UNet, the SDXL UNet or an AnimateDiff motion UNet.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from perflow_video.atomic_files import atomic_destination
from perflow_video.families import FamilySpec, get_family
from perflow_video.families.attention import configure_attention
from perflow_video.method.noise_schedule import alphas_cumprod_from_scheduler_config
from perflow_video.method.reflow_evaluation import FixedReflowDraws, evaluate_student, fixed_draws
from perflow_video.method.reflow_objective import ReflowConfig, reflow_loss, sample_times
from perflow_video.training import checkpointing
from perflow_video.training.config_io import save_yaml_config, to_dict
from perflow_video.training.final_outputs import write_final_outputs
from perflow_video.training.latent_cache import (
    CachedLatentDataset,
    build_latent_cache,
    conditioning_from_batch,
    mark_complete,
)
from perflow_video.training.metrics_log import METRICS_FILE, append_metrics, metric_history, truncate_metrics
from perflow_video.training.samples import perflow_scheduler_for, write_samples
from perflow_video.training.train_config import TrainConfig
from perflow_video.training.training_data import build_dataset

logger = logging.getLogger("perflow_video")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteLossError(RuntimeError):
    """Raised after too many NaN/inf losses in a row."""


class FrozenModel(torch.nn.Module):
    """Runs a frozen half-precision UNet on float32 inputs: casts sample and conditioning in, output out."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None):
        cast = (lambda x: x.to(self.dtype)) if self.dtype != torch.float32 else (lambda x: x)
        kwargs = {
            "encoder_hidden_states": None if encoder_hidden_states is None else cast(encoder_hidden_states)
        }
        if added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = {k: cast(v) for k, v in added_cond_kwargs.items()}
        return self.model(cast(sample), timestep, return_dict=False, **kwargs)[0].float()


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """Per-sample randomness from (seed, epoch, dataset index): independent of how batches are split."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + index) % (2**63 - 1))


def per_sample_draws(
    batch_index: torch.Tensor, latent_shape: tuple, cfg: TrainConfig, epoch: int, n_train: int
):
    """(drop mask, times, window, noise) for a batch, drawn per sample."""
    drops, ts, ks, noises = [], [], [], []
    for idx in batch_index.tolist():
        g = sample_generator(cfg.optim.seed, epoch, idx)
        drops.append(bool(torch.rand(1, generator=g) < cfg.data.prompt_dropout))
        t, k = sample_times(1, cfg.reflow.num_time_windows, n_train, cfg.reflow.discrete_time, g)
        ts.append(t)
        ks.append(k)
        noises.append(torch.randn(latent_shape, generator=g))
    return drops, torch.cat(ts), torch.cat(ks), torch.stack(noises)


def family_spec(cfg: TrainConfig) -> FamilySpec:
    m = cfg.model
    return FamilySpec(
        m.pretrained_model_name_or_path, m.motion_adapter, m.single_file_config, m.revision, m.variant,
        m.resolution, m.num_frames, m.motion_adapter_config,
    )  # fmt: skip


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) a PeRFlow training; returns the output folder. See README "Training"."""
    out = Path(cfg.run.output_dir)
    report_to = cfg.run.report_to
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            logger.warning(
                "tensorboard is not installed (pip install tensorboard); logging to the console only"
            )
            report_to = "none"
    # Without a GPU, accelerate only joins a torchrun/mpirun process group (gloo) when told cpu=True.
    cpu_distributed = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=cpu_distributed,
        mixed_precision=cfg.optim.mixed_precision,
        gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps,
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    torch.manual_seed(cfg.optim.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml_config(cfg, out / "config.yaml")
        checkpointing.clean_temporaries(out)

    family = get_family(cfg.model.family)
    with accelerator.main_process_first():  # one process builds/downloads, the others then read it
        models = family.load(family_spec(cfg))
    teacher_prediction = models.scheduler_config.get("prediction_type", "epsilon")
    if cfg.reflow.teacher_prediction_type != teacher_prediction:
        logger.info(
            "reflow.teacher_prediction_type=%s replaced by %s, what the teacher's scheduler config says",
            cfg.reflow.teacher_prediction_type,
            teacher_prediction,
        )
    reflow: ReflowConfig = replace(cfg.reflow, teacher_prediction_type=teacher_prediction)
    alphas_cumprod = alphas_cumprod_from_scheduler_config(models.scheduler_config)
    trainable_names = family.set_trainable(models.student, cfg.model.trainable)
    # ΔW is taken against the teacher's weights as loaded (fp32), before the frozen copy goes to half precision.
    initial_weights = {
        n: p.detach().float().cpu().clone() for n, p in models.student.named_parameters() if p.requires_grad
    }
    models.student.train()
    attention = configure_attention([models.teacher, models.student], cfg.model.attention)
    if cfg.model.gradient_checkpointing:
        models.student.enable_gradient_checkpointing()
    frozen_dtype = _frozen_dtype(cfg, accelerator)
    device = accelerator.device
    for module in models.frozen_modules():
        module.to(device=device, dtype=frozen_dtype).eval()
    teacher = FrozenModel(models.teacher, frozen_dtype)
    logger.info(
        "family=%s teacher=%s (%s) parameterization=%s K=%d M=%d w=%.2f attention=%s trainable=%s (%d tensors, %.2fM params)",
        family.name, models.base_model, teacher_prediction, reflow.parameterization, reflow.num_time_windows,
        reflow.solver_steps, reflow.guidance_scale, attention, cfg.model.trainable, len(trainable_names),
        sum(p.numel() for p in models.student.parameters() if p.requires_grad) / 1e6,
    )  # fmt: skip

    dataset = build_dataset(cfg, family.is_video)
    with torch.no_grad():
        empty_text = family.encode_text(models, [""], device)  # the dropped / unconditional prompt
    if cfg.data.cache_latents:
        dataset = _cached(dataset, family, models, cfg, accelerator, out)

    @torch.no_grad()
    def encode_batch(batch: dict):
        """(clean latents z_0, per-prompt text conditioning) of a data batch."""
        if cfg.data.cache_latents:
            return batch["latents"].to(device).float(), conditioning_from_batch(batch, device)
        z_0 = family.encode_pixels(models, batch["pixel_values"].to(device)).float()
        return z_0, family.encode_text(models, list(batch["prompt"]), device)

    def uncond_for(n: int):
        """The teacher's unconditional input for CFG-fixed (None for CFG-sync)."""
        if reflow.guidance_scale == 1.0:
            return None
        return family.expand_conditioning(empty_text.map(lambda x: x.expand(n, *x.shape[1:])))

    eval_draws: list[FixedReflowDraws] = []
    if cfg.run.eval_steps > 0:
        # Every process holds the same set and evaluates it (a sharded student needs every rank).
        # Decoded by DataLoader workers as in training (decoders must not run in the parent before a fork).
        n_eval = min(cfg.run.eval_samples, len(dataset))
        eval_loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, range(n_eval)), batch_size=cfg.optim.train_batch_size,
            shuffle=False, num_workers=min(cfg.data.num_workers, n_eval),
        )  # fmt: skip
        for batch in eval_loader:
            z_0, text = encode_batch(batch)
            with accelerator.autocast():
                eval_draws.append(
                    fixed_draws(
                        teacher, z_0, family.expand_conditioning(text), uncond_for(len(z_0)),
                        alphas_cumprod, reflow, batch["index"], cfg.optim.seed,
                    )
                )  # fmt: skip
        del eval_loader
        logger.info("eval_loss: %d fixed draws at window starts, every %d steps", n_eval, cfg.run.eval_steps)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.optim.train_batch_size, shuffle=True, num_workers=cfg.data.num_workers,
        drop_last=True, generator=torch.Generator().manual_seed(cfg.optim.seed),
    )  # fmt: skip
    params = [p for p in models.student.parameters() if p.requires_grad]
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        params,
        lr=o.learning_rate,
        betas=(o.adam_beta1, o.adam_beta2),
        weight_decay=o.adam_weight_decay,
        eps=o.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        o.lr_scheduler, optimizer, num_warmup_steps=o.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=o.max_train_steps * accelerator.num_processes,
    )  # fmt: skip
    student, optimizer, loader, lr_scheduler = accelerator.prepare(
        models.student, optimizer, loader, lr_scheduler
    )
    ema = None
    if o.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=o.ema_decay)
        ema.to(device)
        accelerator.register_for_checkpointing(ema)

    state = checkpointing.TrainerState(global_step=0, batches_seen=0)
    resume = checkpointing.resolve_resume(out, cfg.run.resume_from_checkpoint)
    if resume is not None:
        accelerator.load_state(str(resume))
        state = checkpointing.read_state(resume)
        logger.info("resumed from %s at step %d", resume, state.global_step)
    elif cfg.run.resume_from_checkpoint == "latest":
        logger.info("no complete checkpoint in %s: starting from step 0", checkpointing.checkpoint_root(out))
    metrics_path = out / METRICS_FILE
    if accelerator.is_main_process:  # the log describes this run: steps after the checkpoint run again
        truncate_metrics(metrics_path, state.global_step if resume is not None else None)
    if report_to != "none":
        accelerator.init_trackers("perflow", config=_scalar_config(cfg))

    batches_per_epoch = len(loader)
    if batches_per_epoch == 0:
        raise ValueError(
            f"{cfg.data.train_data}: {len(dataset)} items is fewer than one batch of {o.train_batch_size} per process"
        )

    last_eval: dict[str, str] = {}  # shown in the progress bar

    def run_eval() -> None:
        with accelerator.autocast():
            result = evaluate_student(student, eval_draws, reflow.num_time_windows)
        last_eval["eval"] = f"{result['eval_loss']:.4g}"
        logger.info("step %d: eval_loss %.5g", state.global_step, result["eval_loss"])
        if report_to != "none":
            accelerator.log(result, step=state.global_step)
        if accelerator.is_main_process:
            append_metrics(metrics_path, state.global_step, result)

    if eval_draws and state.global_step == 0:
        run_eval()  # the teacher's own score: what the student starts from
    nonfinite_in_a_row, nonfinite_total = 0, 0
    progress = tqdm(
        total=o.max_train_steps,
        initial=state.global_step,
        disable=not accelerator.is_local_main_process,
        desc="steps",
    )
    while state.global_step < o.max_train_steps:
        epoch, skip = divmod(state.batches_seen, batches_per_epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        if hasattr(dataset, "dataset"):  # live data: new frame starts / crops each epoch
            dataset.dataset.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in epoch_loader:
            state.batches_seen += 1
            with accelerator.accumulate(student):
                z_0, text = encode_batch(batch)
                drops, t, k, noise = per_sample_draws(
                    batch["index"], tuple(z_0.shape[1:]), cfg, epoch, alphas_cumprod.numel()
                )
                bsz = len(drops)
                empty = empty_text.map(lambda x, n=bsz: x.expand(n, *x.shape[1:]))
                cond = family.expand_conditioning(text.where(torch.tensor(drops), empty))
                uncond = uncond_for(bsz)  # CFG-fixed: the teacher also sees the empty prompt
                with accelerator.autocast():
                    result = reflow_loss(
                        student, teacher, z_0, alphas_cumprod, reflow, cond, uncond,
                        noise=noise.to(device), times=(t, k),
                    )  # fmt: skip
                finite = bool(accelerator.gather(torch.isfinite(result.loss.detach()).reshape(1)).all())
                if finite:
                    accelerator.backward(result.loss)
                    if accelerator.sync_gradients and o.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, o.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not finite:
                nonfinite_in_a_row += 1
                nonfinite_total += 1
                logger.warning(
                    "non-finite loss at step %d: skipped (%d in a row)", state.global_step, nonfinite_in_a_row
                )
                if nonfinite_in_a_row >= cfg.run.max_consecutive_nonfinite:
                    raise NonFiniteLossError(
                        f"{nonfinite_in_a_row} non-finite losses in a row at step {state.global_step}: lower "
                        "optim.learning_rate, use mixed_precision=bf16 instead of fp16, or check the data"
                    )
                continue
            nonfinite_in_a_row = 0
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            if ema is not None:
                ema.step(params)
            loss = accelerator.gather(result.loss.detach().reshape(1)).mean().item()
            if eval_draws and (
                state.global_step % cfg.run.eval_steps == 0 or state.global_step == o.max_train_steps
            ):
                run_eval()
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4g}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}", **last_eval)
            if state.global_step % cfg.run.log_every == 0:
                logs = {
                    "loss": loss,
                    "lr": lr_scheduler.get_last_lr()[0],
                    "skipped_nonfinite": nonfinite_total,
                }
                for w in range(reflow.num_time_windows):
                    sel = result.window == w
                    if sel.any():
                        logs[f"loss_window_{w}"] = (
                            result.loss_per_sample[sel.to(result.loss_per_sample.device)].mean().item()
                        )
                if report_to != "none":
                    accelerator.log(logs, step=state.global_step)
                if accelerator.is_main_process:  # a plain-text copy for scripts and tests
                    append_metrics(metrics_path, state.global_step, logs)
            if cfg.run.checkpointing_steps and state.global_step % cfg.run.checkpointing_steps == 0:
                _save_checkpoint(accelerator, out, state, cfg.run.checkpoints_total_limit)
            if cfg.run.validation_steps and state.global_step % cfg.run.validation_steps == 0:
                _validate(
                    accelerator,
                    family,
                    models,
                    student,
                    reflow,
                    cfg,
                    out / "samples" / f"step-{state.global_step}",
                )
            if state.global_step >= o.max_train_steps:
                break
    progress.close()

    if cfg.run.checkpointing_steps and state.global_step % cfg.run.checkpointing_steps != 0:
        _save_checkpoint(accelerator, out, state, cfg.run.checkpoints_total_limit)
    accelerator.wait_for_everyone()
    # One number per process: data-parallel ranks must hold identical weights (checked by the tests).
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1).to(device)
    checksums = accelerator.gather(checksum).tolist()
    if accelerator.is_main_process:
        final_student = accelerator.unwrap_model(student)
        if ema is not None:
            ema.copy_to(params)  # export the averaged weights
        write_final_outputs(family, models, final_student, initial_weights, reflow, cfg, out)
        _validate(accelerator, family, models, final_student, reflow, cfg, out / "samples" / "final")
        summary = {
            "global_step": state.global_step,
            "skipped_nonfinite": nonfinite_total,
            "eval_loss": metric_history(metrics_path, "eval_loss"),  # this run's, resumes included
            "num_processes": accelerator.num_processes,
            "param_checksums": checksums,
        }
        # Written last and atomically: its presence means the run finished and every output is complete.
        with atomic_destination(out / "train_summary.json") as tmp:
            Path(tmp).write_text(json.dumps(summary))
    # Release the DDP-wrapped student on every rank while the process group is alive: end_training
    # destroys the group, after which a DDP reducer's destructor can hang forever in gloo.
    student = optimizer = loader = epoch_loader = lr_scheduler = None  # noqa: F841
    accelerator.free_memory()
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def _cached(dataset, family, models, cfg: TrainConfig, accelerator: Accelerator, out: Path):
    """Build (or reuse) the latent / text-embedding cache and return the dataset reading it."""
    cache_dir = out / "latent_cache"
    fingerprint = {
        "version": 1,
        "model": to_dict(cfg.model),
        "data": {k: v for k, v in to_dict(cfg.data).items() if k not in ("num_workers", "prompt_dropout")},
        "seed": cfg.optim.seed,
        "items": len(dataset),
    }
    built = build_latent_cache(
        dataset, family, models, cache_dir, fingerprint, accelerator.process_index, accelerator.num_processes,
        accelerator.device,
    )  # fmt: skip
    accelerator.wait_for_everyone()
    if built and accelerator.is_main_process:
        mark_complete(cache_dir, fingerprint)
    accelerator.wait_for_everyone()
    logger.info("latent cache %s: %s", "built" if built else "reused", cache_dir)
    return CachedLatentDataset(cache_dir, len(dataset))


def _frozen_dtype(cfg: TrainConfig, accelerator: Accelerator) -> torch.dtype:
    """Half precision for frozen models on accelerators when training in mixed precision."""
    if cfg.optim.frozen_dtype != "auto":
        if cfg.optim.frozen_dtype not in DTYPES:
            raise ValueError(
                f"optim.frozen_dtype={cfg.optim.frozen_dtype!r}; choose auto or one of {list(DTYPES)}"
            )
        if cfg.optim.frozen_dtype != "fp32" and accelerator.mixed_precision == "no":
            # Half-precision text embeddings would meet the fp32 student without autocast.
            raise ValueError(
                f"optim.frozen_dtype={cfg.optim.frozen_dtype} needs optim.mixed_precision=fp16 or bf16 "
                "(or optim.frozen_dtype=fp32)"
            )
        return DTYPES[cfg.optim.frozen_dtype]
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def _save_checkpoint(accelerator: Accelerator, out: Path, state, total_limit: int) -> None:
    tmp = checkpointing.temporary_dir(out, state.global_step)
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        path = checkpointing.finalize(
            out, checkpointing.TrainerState(state.global_step, state.batches_seen), total_limit
        )
        logger.info("saved %s", path)
    accelerator.wait_for_everyone()


def _validate(accelerator, family, models, student, reflow, cfg: TrainConfig, folder: Path) -> None:
    if not accelerator.is_main_process or not cfg.run.validation_prompts:
        return
    scheduler = perflow_scheduler_for(
        models.scheduler_config, reflow.parameterization, reflow.num_time_windows
    )
    write_samples(
        family, models, accelerator.unwrap_model(student), scheduler, cfg.run.validation_prompts, folder,
        cfg.model.resolution, cfg.model.num_frames, cfg.run.num_inference_steps, cfg.run.guidance_scale,
        cfg.run.sample_format, cfg.optim.seed,
    )  # fmt: skip


def _scalar_config(cfg: TrainConfig) -> dict:
    """Flattened scalar config values for TensorBoard hparams."""
    flat = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            if isinstance(value, (int, float, str, bool)):
                flat[f"{section}.{key}"] = value
    return flat


__all__ = ["NonFiniteLossError", "train"]
