"""The training recipe as dataclasses (the schema); YAML files in ``configs/`` hold only what differs.

Each field's annotation carries its one-line meaning (``Annotated[type, "meaning"]``; ``--help-config``
lists them), and every choice is a ``Literal`` named beside the code that owns it. ``load_train_config``
layers: defaults <- the family's defaults <- YAML file <- flags <- ``key=value`` overrides, and the
checks in the ``__post_init__`` methods run while the config is built (so ``--dry-run`` reports them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import with_config

from perflow_video.datasets.video_clips import ShortClipPolicy
from perflow_video.families import LoraTargets, ModelInit, Trainable, get_family
from perflow_video.families.attention import AttentionBackend, xformers_available
from perflow_video.families.loading import motion_adapter_architecture
from perflow_video.family_names import FAMILY_NAMES, FamilyName
from perflow_video.media.video_decode import DecoderBackend, decord_available
from perflow_video.media.video_export import ClipFormat
from perflow_video.method.reflow_objective import ReflowConfig
from perflow_video.training.config_io import (
    CONFIG_RULES,
    apply_overrides,
    from_dict,
    load_yaml_data,
    merge_dicts,
)
from perflow_video.training.optimizers import OptimizerName, bitsandbytes_available
from perflow_video.weights.delta_export import EXTRA_FORMATS, DeltaFormat

# The trainer's own choices (it hands them to accelerate / diffusers as they are).
# diffusers.optimization names the trainer can build from warm-up and total steps alone.
LRSchedule = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]
MixedPrecision = Literal["no", "fp16", "bf16"]  # accelerate's autocast dtype of the student step
FrozenDtype = Literal["auto", "fp32", "fp16", "bf16"]  # auto: the mixed precision dtype
ReportTo = Literal["tensorboard", "none"]  # where scalars go besides metrics.jsonl


@dataclass
class ModelConfig:
    family: Annotated[
        FamilyName, "model family (fills the defaults of resolution, trainable, parameterization)"
    ] = "animatediff"
    pretrained_model_name_or_path: Annotated[
        str,
        "hub id, local diffusers folder, single SD1.5 .safetensors/.ckpt file, or tiny (embedded CPU-sized model)",
    ] = "tiny"
    motion_adapter: Annotated[
        str | None,
        "animatediff: hub id, folder, original AnimateDiff .ckpt/.safetensors, or tiny (null: v1-5-2)",
    ] = None
    single_file_config: Annotated[
        str | None,
        "diffusers SD folder / hub id giving the component configs of a single-file SD1.5 checkpoint",
    ] = None
    motion_adapter_config: Annotated[
        str | None,
        "MotionAdapter folder / hub id whose config fits an original motion-module file (null: v1-5-2)",
    ] = None
    init: Annotated[
        ModelInit,
        "pretrained: load the weights; random: the family's real architecture (perflow_video/architectures) with random weights, offline",
    ] = "pretrained"
    revision: Annotated[str | None, "hub revision of the base model"] = None
    variant: Annotated[str | None, 'weight variant on the hub, e.g. "fp16"'] = None
    trainable: Annotated[
        Trainable,
        "which student weights train (motion / spatial: animatediff only; lora: adapters on the teacher network)",
    ] = "motion"
    lora_rank: Annotated[int, "trainable=lora: rank r of the adapters"] = 16
    lora_alpha: Annotated[
        float | None, "trainable=lora: alpha, the scale is alpha / r (null: = lora_rank)"
    ] = None
    lora_targets: Annotated[
        LoraTargets,
        "trainable=lora: attention projections adapted (motion modules / spatial to_q,to_k,to_v,to_out.0 / both)",
    ] = "motion"
    resolution: Annotated[int, "square training resolution in pixels (latents are resolution / 8)"] = 384
    num_frames: Annotated[int, "frames per clip (animatediff)"] = 16
    attention: Annotated[
        AttentionBackend, "attention kernels (auto: xformers if installed and CUDA, else SDPA)"
    ] = "auto"
    gradient_checkpointing: Annotated[bool, "trade compute for memory in the student"] = False

    def __post_init__(self):
        check_trainable(self.family, self.trainable)
        check_lora(self.family, self.trainable, self.lora_rank, self.lora_alpha, self.lora_targets)
        check_attention(self.attention)
        check_random_architecture(self.init, self.family, self.motion_adapter)
        check_at_least("num_frames", self.num_frames, 1)
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(
                f"resolution must be a positive multiple of 8 (the VAE's factor), got {self.resolution}"
            )


@dataclass
class DataConfig:
    train_data: Annotated[
        str, "CSV (WebVid layout / path,caption) or a folder with sidecar .txt captions"
    ] = "data/toy_clips/captions.csv"
    video_dir: Annotated[str | None, "where a CSV's videos/images live (null: the CSV's folder)"] = None
    video_column: Annotated[str, "CSV column naming the video file"] = "videoid"
    caption_column: Annotated[str, "CSV column holding the caption"] = "name"
    image_column: Annotated[str, "CSV column naming the image file (image models)"] = "path"
    sample_stride: Annotated[int, "source frames between sampled frames (animatediff)"] = 4
    short_clip_policy: Annotated[
        ShortClipPolicy, "what to do with a clip shorter than num_frames * stride"
    ] = "lower_stride"
    backend: Annotated[DecoderBackend, "video decoder (auto: decord if installed, PyAV where it fails)"] = (
        "auto"
    )
    random_flip: Annotated[bool, "horizontal flips (wrong for captions that say left/right)"] = False
    max_bad_fraction: Annotated[float, "stop when a larger fraction of the data is unreadable"] = 0.05
    num_workers: Annotated[int, "DataLoader workers per process"] = 0
    prompt_dropout: Annotated[float, "probability of training on the empty prompt (keeps CFG usable)"] = 0.1
    cache_latents: Annotated[
        bool, "encode latents + text once into <output_dir>/latent_cache (epoch 0's crops reused)"
    ] = False

    def __post_init__(self):
        check_at_least("sample_stride", self.sample_stride, 1)
        check_at_least("num_workers", self.num_workers, 0)
        for name in ("prompt_dropout", "max_bad_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.backend == "decord" and not decord_available():
            raise ValueError(
                "backend='decord' but decord is not installed (pip install decord2); use auto or pyav"
            )


@dataclass
class OptimConfig:
    optimizer: Annotated[
        OptimizerName, "adamw (torch) | adamw8bit (bitsandbytes, CUDA: pip install 'perflow-video[bnb]')"
    ] = "adamw"
    learning_rate: Annotated[
        float, "AdamW peak learning rate (per process batch; not scaled automatically)"
    ] = 1e-5
    adam_beta1: Annotated[float, "AdamW first-moment decay"] = 0.9
    adam_beta2: Annotated[float, "AdamW second-moment decay"] = 0.999
    adam_weight_decay: Annotated[float, "AdamW decoupled weight decay (as the reference recipe)"] = 1e-5
    adam_epsilon: Annotated[float, "AdamW denominator epsilon"] = 1e-8
    lr_scheduler: Annotated[LRSchedule, "learning-rate schedule (diffusers.optimization)"] = (
        "constant_with_warmup"
    )
    lr_warmup_steps: Annotated[int, "optimizer steps of linear warm-up"] = 100
    max_grad_norm: Annotated[float, "gradient clipping (0 disables)"] = 1.0
    train_batch_size: Annotated[int, "clips/images per process per micro-batch"] = 1
    gradient_accumulation_steps: Annotated[int, "micro-batches per optimizer step"] = 1
    max_train_steps: Annotated[int, "optimizer steps"] = 1000
    mixed_precision: Annotated[MixedPrecision, "autocast dtype (master weights of what trains stay fp32)"] = (
        "no"
    )
    frozen_dtype: Annotated[
        FrozenDtype, "dtype of teacher / VAE / text encoders (auto: the mixed precision)"
    ] = "auto"
    use_ema: Annotated[bool, "keep an EMA of the trained weights and export it"] = False
    ema_decay: Annotated[float, "EMA decay per optimizer step (with use_ema)"] = 0.999
    seed: Annotated[int, "everything random derives from it (data order, t, noise, dropout)"] = 0

    def __post_init__(self):
        check_at_least("max_train_steps", self.max_train_steps, 1)  # 0 steps would export a zero ΔW
        check_at_least("train_batch_size", self.train_batch_size, 1)
        check_at_least("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        check_frozen_dtype(self.frozen_dtype, self.mixed_precision)
        check_optimizer(self.optimizer)


@dataclass
class RunConfig:
    output_dir: Annotated[str, "run folder: checkpoints, logs, samples, final model, ΔW"] = (
        "outputs/perflow-animatediff"
    )
    checkpointing_steps: Annotated[
        int, "save a resumable checkpoint every N optimizer steps (0 = only at the end)"
    ] = 500
    checkpoints_total_limit: Annotated[int, "keep the newest N checkpoints"] = 3
    resume_from_checkpoint: Annotated[str | None, '"latest" or a checkpoint folder'] = None
    validation_steps: Annotated[int, "write 4-step samples every N steps (0 = only at the end)"] = 500
    eval_steps: Annotated[
        int, "log eval_loss, the objective on fixed draws at window starts, every N steps (0 = never)"
    ] = 100
    eval_samples: Annotated[int, "training items in that fixed set (teacher targets computed once)"] = 16
    validation_prompts: Annotated[list[str], "prompts of the sample clips / images ([] = no samples)"] = (
        field(default_factory=lambda: ["a red circle moving left"])
    )
    num_inference_steps: Annotated[int, "sampling steps for the samples"] = 4
    guidance_scale: Annotated[
        float, "CFG when sampling the student (CFG-sync students: ~4.5; CFG-fixed: 1-2.5)"
    ] = 1.0
    sample_format: Annotated[ClipFormat, "file format of the sample clips (video families)"] = "gif"
    log_every: Annotated[int, "optimizer steps between TensorBoard scalars"] = 10
    report_to: Annotated[ReportTo, "scalar logger besides metrics.jsonl"] = "tensorboard"
    max_consecutive_nonfinite: Annotated[int, "stop after this many NaN/inf losses in a row"] = 5
    export_formats: Annotated[
        list[DeltaFormat],
        "ΔW files written beside delta_weights.safetensors (those the ΔW has keys for; README 'Use ΔW elsewhere')",
    ] = field(default_factory=lambda: list(EXTRA_FORMATS))
    lora_rank: Annotated[int, "rank cap of the LoRA files among export_formats (truncated SVD of ΔW)"] = 64

    def __post_init__(self):
        check_at_least("lora_rank", self.lora_rank, 1)
        check_at_least("eval_steps", self.eval_steps, 0)
        check_at_least("eval_samples", self.eval_samples, 1)
        check_at_least("checkpointing_steps", self.checkpointing_steps, 0)
        check_at_least("validation_steps", self.validation_steps, 0)
        check_at_least("log_every", self.log_every, 1)
        check_at_least("num_inference_steps", self.num_inference_steps, 1)


@with_config(CONFIG_RULES)
@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reflow: ReflowConfig = field(default_factory=ReflowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ----------------------------------------------------------------------------------------------------
# Cross-field rules (raise ValueError; the loader prefixes the section)
# ----------------------------------------------------------------------------------------------------


def check_at_least(name: str, value: int, minimum: int) -> None:
    """A count the run cannot do without, e.g. ``max_train_steps`` >= 1."""
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_trainable(family: str, trainable: str) -> None:
    """``trainable`` is one the family offers (image families have no motion modules: only "all")."""
    choices = get_family(family).trainable_choices
    if trainable not in choices:
        listed = " | ".join(repr(c) for c in choices)
        raise ValueError(f"trainable={trainable!r} does not fit family {family!r}; choose {listed}")


def check_lora(family: str, trainable: str, rank: int, alpha: float | None, targets: str) -> None:
    """A LoRA run's rank and alpha are positive and its targets are parts the family has (images: spatial)."""
    if trainable != "lora":
        return
    check_at_least("lora_rank", rank, 1)
    if alpha is not None and alpha <= 0:
        raise ValueError(f"lora_alpha must be > 0 (or null: = lora_rank), got {alpha}")
    choices = get_family(family).lora_target_choices
    if targets not in choices:
        listed = " | ".join(repr(c) for c in choices)
        raise ValueError(f"lora_targets={targets!r} does not fit family {family!r}; choose {listed}")


def check_optimizer(optimizer: str) -> None:
    """The 8-bit AdamW needs bitsandbytes importable (whether CUDA is present is checked when the run starts)."""
    if optimizer == "adamw8bit" and not bitsandbytes_available():
        raise ValueError(
            "optimizer='adamw8bit' but bitsandbytes is not installed: pip install 'perflow-video[bnb]' "
            "(CUDA GPUs) or use optimizer=adamw"
        )


def check_random_architecture(init: str, family: str, motion_adapter: str | None) -> None:
    """``init=random`` on animatediff: ``motion_adapter`` names the adapter version to build (or is null)."""
    if init == "random" and get_family(family).data_kind == "clips":
        motion_adapter_architecture(motion_adapter)  # ValueError naming the versions


def check_attention(attention: str) -> None:
    """A forced xformers must be importable (whether CUDA is present is checked when the run starts)."""
    if attention == "xformers" and not xformers_available():
        raise ValueError(
            "attention='xformers' but xformers is not installed: pip install 'perflow-video[xformers]' "
            "or use attention=sdpa (or auto)"
        )


def check_frozen_dtype(frozen_dtype: str, mixed_precision: str) -> None:
    """Half-precision frozen models need a mixed-precision run (its autocast matches their dtype)."""
    if frozen_dtype in ("fp16", "bf16") and mixed_precision == "no":
        raise ValueError(
            f"frozen_dtype={frozen_dtype} needs mixed_precision=fp16 or bf16 (or frozen_dtype=fp32 / auto)"
        )


# ----------------------------------------------------------------------------------------------------
# Building a config
# ----------------------------------------------------------------------------------------------------


def family_defaults(name: str) -> dict:
    """What a config leaves unsaid, from the family adapter (docs/method.md §6): its parameterization,
    resolution and trainable weights, so that ``model.family=sd21`` alone trains ``velocity`` at 768."""
    family = get_family(name)
    return {
        "model": {
            "resolution": family.default_resolution,
            "trainable": family.default_trainable,
            "lora_targets": family.default_lora_targets,
        },
        "reflow": {"parameterization": family.default_parameterization},
    }


def with_family_defaults(data: dict) -> dict:
    """``data`` over its family's defaults; an unknown family is left for the schema to report."""
    model = data.get("model")
    name = model.get("family", ModelConfig.family) if isinstance(model, dict) else ModelConfig.family
    if name not in FAMILY_NAMES:
        return data
    return merge_dicts(family_defaults(name), data)


def build_train_config(data: dict) -> TrainConfig:
    """A TrainConfig from plain data over the family defaults; all checks run (ConfigError if one fails)."""
    return from_dict(TrainConfig, with_family_defaults(data))


def load_train_config(config_path: str | None, flag_values: dict, overrides: list[str]) -> TrainConfig:
    """defaults <- family <- YAML file <- flags (dotted keys, None = not given) <- ``key=value`` overrides."""
    data = load_yaml_data(config_path) if config_path else {}
    for key, value in flag_values.items():
        if value is not None:
            section, name = key.split(".")
            data = merge_dicts(data, {section: {name: value}})
    return build_train_config(apply_overrides(data, overrides))
