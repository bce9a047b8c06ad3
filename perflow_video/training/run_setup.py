"""The setup steps of a training run, in order: accelerator and run folder -> models -> data ->
optimizer -> resume. Each returns one part of the :class:`~perflow_video.training.run_state.Run`."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedType, ProjectConfiguration
from diffusers.optimization import get_scheduler
from torch.utils.data import Dataset

from perflow_video.errors import ConfigError
from perflow_video.families import FamilyModels, FamilySpec, LoraSpec, ModelFamily
from perflow_video.families.attention import configure_attention
from perflow_video.families.base import shared_with_teacher
from perflow_video.method.noise_schedule import (
    alphas_cumprod_from_scheduler_config,
    unsupported_schedule_reason,
)
from perflow_video.method.reflow_evaluation import FixedReflowDraws, fixed_draws
from perflow_video.method.teacher_solver import Conditioning
from perflow_video.training import checkpointing
from perflow_video.training.config_io import save_yaml_config, to_dict
from perflow_video.training.frozen_models import FrozenModel, frozen_dtype, place_frozen_models
from perflow_video.training.latent_cache import CachedLatentDataset, build_latent_cache, mark_complete
from perflow_video.training.metrics_log import METRICS_FILE, truncate_metrics
from perflow_video.training.optimizers import make_optimizer
from perflow_video.training.run_state import Data, Models, Optimization, Run
from perflow_video.training.step import teacher_uncond
from perflow_video.training.train_config import TrainConfig
from perflow_video.training.trained_weights import trained_weights_of
from perflow_video.training.training_data import encode_batch

logger = logging.getLogger("perflow_video")


def available_tracker(report_to: str) -> str:
    """``run.report_to``, or ``none`` (with a warning) when tensorboard is asked for but not installed."""
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            logger.warning(
                "tensorboard is not installed (pip install tensorboard); logging to the console only"
            )
            return "none"
    return report_to


def make_accelerator(cfg: TrainConfig, out: Path, report_to: str) -> Accelerator:
    """The run's Accelerator (mixed precision, gradient accumulation, tracker, seedable data order)."""
    # Without a GPU, accelerate only joins a torchrun/mpirun process group (gloo) when told cpu=True.
    cpu_distributed = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=cpu_distributed,
        mixed_precision=cfg.optim.mixed_precision,
        gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps,
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def start_run_folder(cfg: TrainConfig, accelerator: Accelerator, out: Path) -> None:
    """Logging, the global seed, and (main process) the run folder with the resolved config."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    torch.manual_seed(cfg.optim.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml_config(cfg, out / "config.yaml")
        checkpointing.clean_temporaries(out)


def family_spec(cfg: TrainConfig, share_frozen: bool = True) -> FamilySpec:
    """What the family loads, from the model config. ``share_frozen``: the student shares the teacher's frozen
    weights (not under FSDP, which flattens the student's parameters into its own sharded buffers)."""
    m = cfg.model
    if m.trainable == "lora" and not share_frozen:
        raise ConfigError(
            "model.trainable=lora does not run under FSDP (the LoRA student is the teacher network itself, "
            "which FSDP would shard into the student's buffers): launch it with DDP, e.g. "
            "configs/accelerate/multi_gpu.yaml, where one network + adapters fits each GPU"
        )
    lora = LoraSpec(m.lora_rank, float(m.lora_alpha or m.lora_rank), m.lora_targets)
    return FamilySpec(
        m.pretrained_model_name_or_path, m.motion_adapter, m.single_file_config, m.revision, m.variant,
        m.resolution, m.num_frames, m.motion_adapter_config, m.init, m.trainable if share_frozen else None,
        lora,
    )  # fmt: skip


def shares_frozen_weights(accelerator: Accelerator) -> bool:
    """Whether this run's student may share the teacher's frozen weights (every setup but FSDP)."""
    return accelerator.distributed_type != DistributedType.FSDP


def load_models(cfg: TrainConfig, family: ModelFamily, accelerator: Accelerator) -> Models:
    """Teacher and student (trainable weights chosen, attention set), frozen models moved to the device."""
    with accelerator.main_process_first():  # one process builds/downloads, the others then read it
        models = family.load(family_spec(cfg, shares_frozen_weights(accelerator)))
    teacher_prediction = models.scheduler_config.get("prediction_type", "epsilon")
    if cfg.reflow.teacher_prediction_type != teacher_prediction:
        logger.info(
            "reflow.teacher_prediction_type=%s replaced by %s, what the teacher's scheduler config says",
            cfg.reflow.teacher_prediction_type,
            teacher_prediction,
        )
    reflow = replace(cfg.reflow, teacher_prediction_type=teacher_prediction)
    trainable_names = family.set_trainable(models.student, cfg.model.trainable)
    # ΔW is taken against the teacher's weights as loaded (fp32), before the frozen copy goes to half precision.
    trained = trained_weights_of(models.student)
    attention = configure_attention([models.teacher, models.student], cfg.model.attention)
    if cfg.model.gradient_checkpointing:
        models.student.enable_gradient_checkpointing()
    dtype = frozen_dtype(cfg, accelerator)
    place_frozen_models(models, accelerator.device, dtype)
    models.student.train()  # after the teacher's eval(): a LoRA student is the same module
    logger.info(
        "family=%s teacher=%s (%s) parameterization=%s K=%d M=%d w=%.2f attention=%s trainable=%s (%d tensors, %.2fM params)",
        family.name, models.base_model, teacher_prediction, reflow.parameterization, reflow.num_time_windows,
        reflow.solver_steps, reflow.guidance_scale, attention, cfg.model.trainable, len(trainable_names),
        sum(p.numel() for p in models.student.parameters() if p.requires_grad) / 1e6,
    )  # fmt: skip
    log_sharing(models)
    reason = unsupported_schedule_reason(models.scheduler_config)
    if reason:  # the user's choice of teacher: an error naming it, not a traceback
        raise ConfigError(f"model.base_model={models.base_model}: {reason}")
    abar = alphas_cumprod_from_scheduler_config(models.scheduler_config)
    return Models(models, FrozenModel(models.teacher, dtype), reflow, abar, trained)


def log_sharing(models: FamilyModels) -> None:
    """How much of the student is the teacher's own tensors (one copy in memory)."""
    shared = shared_with_teacher(models.student)
    params = dict(models.student.named_parameters())
    numel = sum(params[n].numel() for n in shared)
    logger.info("student shares %d frozen tensors (%.2fM params) with the teacher", len(shared), numel / 1e6)


def load_data(
    cfg: TrainConfig,
    family: ModelFamily,
    models: Models,
    dataset: Dataset,
    accelerator: Accelerator,
    out: Path,
) -> Data:
    """The training data (live or from the latent cache), the empty prompt and the fixed evaluation set."""
    with torch.no_grad():
        empty_text = family.encode_text(models.loaded, [""], accelerator.device)  # the dropped prompt
    if cfg.data.cache_latents:
        dataset = cached_latents(dataset, family, models.loaded, cfg, accelerator, out)
    eval_draws = fixed_eval_set(cfg, family, models, dataset, empty_text, accelerator)
    return Data(dataset, empty_text, eval_draws)


def cached_latents(
    dataset: Dataset, family: ModelFamily, models: FamilyModels, cfg: TrainConfig, accelerator: Accelerator,
    out: Path,
) -> CachedLatentDataset:  # fmt: skip
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


def fixed_eval_set(
    cfg: TrainConfig, family: ModelFamily, models: Models, dataset: Dataset, empty_text: Conditioning,
    accelerator: Accelerator,
) -> list[FixedReflowDraws]:  # fmt: skip
    """The teacher targets of the first ``run.eval_samples`` items at window starts (none if eval_steps = 0).

    Every process holds the same set and evaluates it (a sharded student needs every rank). Decoded by
    DataLoader workers as in training (decoders must not run in the parent before a fork).
    """
    if cfg.run.eval_steps <= 0:
        return []
    n_eval = min(cfg.run.eval_samples, len(dataset))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, range(n_eval)), batch_size=cfg.optim.train_batch_size,
        shuffle=False, num_workers=min(cfg.data.num_workers, n_eval),
    )  # fmt: skip
    expand = partial(family.expand_conditioning, models.loaded)
    draws = []
    for batch in loader:
        z_0, text = encode_batch(family, models.loaded, batch, accelerator.device, cfg.data.cache_latents)
        uncond = teacher_uncond(empty_text, len(z_0), models.reflow, expand)
        with accelerator.autocast():
            draws.append(
                fixed_draws(
                    models.teacher, z_0, expand(text), uncond, models.alphas_cumprod, models.reflow,
                    batch["index"], cfg.optim.seed,
                )
            )  # fmt: skip
    logger.info("eval_loss: %d fixed draws at window starts, every %d steps", n_eval, cfg.run.eval_steps)
    return draws


def build_optimization(
    cfg: TrainConfig, models: Models, dataset: Dataset, accelerator: Accelerator
) -> Optimization:
    """Shuffled loader, AdamW (``optim.optimizer``) on the trained weights, LR schedule, all prepared by
    accelerate; the EMA."""
    o = cfg.optim
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=o.train_batch_size, shuffle=True, num_workers=cfg.data.num_workers,
        drop_last=True, generator=torch.Generator().manual_seed(o.seed),
    )  # fmt: skip
    params = [p for p in models.loaded.student.parameters() if p.requires_grad]
    optimizer = make_optimizer(
        o.optimizer,
        params,
        o.learning_rate,
        (o.adam_beta1, o.adam_beta2),
        o.adam_weight_decay,
        o.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        o.lr_scheduler, optimizer, num_warmup_steps=o.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=o.max_train_steps * accelerator.num_processes,
    )  # fmt: skip
    student, optimizer, loader, lr_scheduler = accelerator.prepare(
        models.loaded.student, optimizer, loader, lr_scheduler
    )
    ema = None
    if o.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=o.ema_decay)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    if len(loader) == 0:
        raise ConfigError(
            f"{cfg.data.train_data}: {len(dataset)} items is fewer than one batch of {o.train_batch_size} per process"
        )
    return Optimization(student, optimizer, lr_scheduler, loader, params, ema)


def resume(run: Run) -> None:
    """Continue from ``run.resume_from_checkpoint`` if it names a complete checkpoint (weights, optimizer,
    data position); the metrics log keeps only the steps before it (later ones run again)."""
    out, accelerator = run.out, run.accelerator
    checkpoint = checkpointing.resolve_resume(out, run.cfg.run.resume_from_checkpoint)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        run.state = checkpointing.read_state(checkpoint)
        logger.info("resumed from %s at step %d", checkpoint, run.state.global_step)
    elif run.cfg.run.resume_from_checkpoint == "latest":
        logger.info("no complete checkpoint in %s: starting from step 0", checkpointing.checkpoint_root(out))
    if accelerator.is_main_process:  # the log describes this run: steps after the checkpoint run again
        truncate_metrics(out / METRICS_FILE, run.state.global_step if checkpoint is not None else None)


def scalar_config(cfg: TrainConfig) -> dict:
    """Flattened scalar config values for TensorBoard hparams."""
    flat = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            if isinstance(value, (int, float, str, bool)):
                flat[f"{section}.{key}"] = value
    return flat
