"""The training recipe as dataclasses (the schema); YAML files in ``configs/`` hold only what differs.

Every field has a one-line meaning. ``load_train_config`` layers: defaults <- YAML file <- flags
<- ``key=value`` overrides; unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from perflow_video.method.reflow_objective import ReflowConfig
from perflow_video.training.config_io import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_yaml_data,
    merge_dicts,
)


@dataclass
class ModelConfig:
    family: str = "animatediff"  # animatediff | sd15 | sd21 | sdxl
    # hub id, local diffusers folder, single SD1.5 .safetensors/.ckpt file, or "tiny" (embedded CPU-sized model)
    pretrained_model_name_or_path: str = "tiny"
    motion_adapter: str | None = (
        None  # animatediff: hub id, folder, original AnimateDiff .ckpt/.safetensors, or "tiny"
    )
    single_file_config: str | None = (
        None  # diffusers SD folder / hub id giving the component configs of a single-file SD1.5 checkpoint
    )
    motion_adapter_config: str | None = (
        None  # MotionAdapter folder / hub id whose config fits an original motion-module file (default v1-5-2)
    )
    revision: str | None = None  # hub revision of the base model
    variant: str | None = None  # weight variant on the hub, e.g. "fp16"
    trainable: str = "motion"  # animatediff: motion | spatial | all; image models: all
    resolution: int = 384  # square training resolution in pixels (latents are resolution / 8)
    num_frames: int = 16  # frames per clip (animatediff)
    attention: str = "auto"  # auto (xformers if installed and CUDA, else SDPA) | xformers | sdpa
    gradient_checkpointing: bool = False  # trade compute for memory in the student


@dataclass
class DataConfig:
    train_data: str = (
        "data/toy_clips/captions.csv"  # CSV (WebVid layout / path,caption) or a folder with sidecar .txt
    )
    video_dir: str | None = None  # where a CSV's videos/images live (default: the CSV's folder)
    video_column: str = "videoid"  # CSV column naming the video file
    caption_column: str = "name"  # CSV column holding the caption
    image_column: str = "path"  # CSV column naming the image file (image models)
    sample_stride: int = 4  # source frames between sampled frames (animatediff)
    short_clip_policy: str = (
        "lower_stride"  # clip too short for num_frames*stride: lower_stride | loop | skip
    )
    backend: str = "auto"  # video decoder: auto | decord | pyav
    random_flip: bool = False  # horizontal flips (wrong for captions that say left/right)
    max_bad_fraction: float = 0.05  # stop when a larger fraction of the data is unreadable
    num_workers: int = 0  # DataLoader workers per process
    prompt_dropout: float = 0.1  # probability of training on the empty prompt (keeps CFG usable)
    cache_latents: bool = (
        False  # encode latents + text once into <output_dir>/latent_cache (epoch 0's crops reused)
    )


@dataclass
class OptimConfig:
    learning_rate: float = 1e-5  # AdamW peak learning rate (per process batch; not scaled automatically)
    adam_beta1: float = 0.9  # AdamW first-moment decay
    adam_beta2: float = 0.999  # AdamW second-moment decay
    adam_weight_decay: float = 1e-5  # as the reference recipe
    adam_epsilon: float = 1e-8  # AdamW denominator epsilon
    lr_scheduler: str = "constant_with_warmup"  # any diffusers scheduler name: constant, cosine, linear, ...
    lr_warmup_steps: int = 100  # optimizer steps of linear warm-up
    max_grad_norm: float = 1.0  # gradient clipping (0 disables)
    train_batch_size: int = 1  # clips/images per process per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_train_steps: int = 1000  # optimizer steps
    mixed_precision: str = "no"  # no | fp16 | bf16 (master weights of what trains stay fp32)
    frozen_dtype: str = (
        "auto"  # dtype of teacher/VAE/text encoders: auto (= mixed precision dtype) | fp32 | fp16 | bf16
    )
    use_ema: bool = False  # keep an EMA of the trained weights and export it
    ema_decay: float = 0.999  # EMA decay per optimizer step (with use_ema)
    seed: int = 0  # everything random derives from it (data order, t, noise, dropout)


@dataclass
class RunConfig:
    output_dir: str = "outputs/perflow-animatediff"  # run folder: checkpoints, logs, samples, final model, ΔW
    checkpointing_steps: int = (
        500  # save a resumable checkpoint every N optimizer steps (0 = only at the end)
    )
    checkpoints_total_limit: int = 3  # keep the newest N checkpoints
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint folder
    validation_steps: int = 500  # write 4-step samples every N steps (0 = only at the end)
    eval_steps: int = (
        100  # log eval_loss, the objective on fixed draws at window starts, every N steps (0 = never)
    )
    eval_samples: int = 16  # training items in that fixed set (teacher targets computed once)
    validation_prompts: list[str] = field(
        default_factory=lambda: ["a red circle moving left"]
    )  # prompts of the sample clips / images ([] = no samples)
    num_inference_steps: int = 4  # sampling steps for the samples
    guidance_scale: float = 1.0  # CFG when sampling the student (CFG-sync students: ~4.5; CFG-fixed: 1-2.5)
    sample_format: str = "gif"  # gif | mp4 (video families)
    log_every: int = 10  # optimizer steps between TensorBoard scalars
    report_to: str = "tensorboard"  # tensorboard | none
    max_consecutive_nonfinite: int = 5  # stop after this many NaN/inf losses in a row

    def __post_init__(self):
        if self.eval_steps < 0 or self.eval_samples < 1:
            raise ValueError(
                f"eval_steps must be >= 0 and eval_samples >= 1, got {self.eval_steps} and {self.eval_samples}"
            )


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reflow: ReflowConfig = field(default_factory=ReflowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


def load_train_config(config_path: str | None, flag_values: dict, overrides: list[str]) -> TrainConfig:
    """defaults <- YAML file <- flags (dotted keys, None = not given) <- ``key=value`` overrides."""
    data = load_yaml_data(config_path) if config_path else {}
    for key, value in flag_values.items():
        if value is not None:
            section, name = key.split(".")
            data = merge_dicts(data, {section: {name: value}})
    data = apply_overrides(data, overrides)
    return from_dict(TrainConfig, with_family_defaults(data))


def with_family_defaults(data: dict) -> dict:
    """Fill what the config leaves unsaid from the family (docs/method.md §6): its parameterization and
    resolution, so that ``model.family=sd21`` alone trains ``velocity`` at 768."""
    from perflow_video.families import get_family  # imports diffusers; only needed once a config is resolved

    model = data.get("model") or {}
    name = model.get("family", ModelConfig.family)
    try:
        family = get_family(name)
    except ValueError as err:
        raise ConfigError(f"model.family: {err}") from err
    defaults = {
        "model": {"resolution": family.default_resolution},
        "reflow": {"parameterization": family.default_parameterization},
    }
    if name != "animatediff":
        defaults["model"]["trainable"] = "all"  # image models have no motion modules
    return merge_dicts(defaults, data)
