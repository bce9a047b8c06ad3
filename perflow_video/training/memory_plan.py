"""The memory plan of a resolved config (``--dry-run``): what one training process holds on its device.

Nothing is loaded. The run's models are built on the meta device (``accelerate.init_empty_weights``) by the
code a run uses (``ModelFamily.random_models``, the student sharing the teacher's frozen weights,
``place_frozen_models``) from their configs: the shipped architecture with ``model.init=random``, else the
configs of the weight source (a local folder or the Hugging Face cache, offline; the shipped architecture
where they cannot be read, which the plan says). So the weight lines are exact: sum(numel * element_size)
over the unique tensors (shared weights once), in the dtype the run gives each.

The rest is a model, stated with the plan (:data:`ASSUMPTIONS`):

* gradients: one fp32 tensor per trained weight; AdamW: two fp32 moments (``optim.optimizer=adamw8bit``: two
  int8 moments for tensors of >= 4096 elements); EMA: one fp32 copy. A LoRA run (``model.trainable=lora``)
  trains the adapters only, and its student is the teacher network itself: one UNet in the lines above.
* activations: the bytes autograd saves in one student forward at the clip shape (each storage once,
  weights excluded), measured on the meta device in the autocast dtype, with attention as the memory-efficient
  kernels run it on GPUs (q, k, v, output and logsumexp saved; no N x N scores). With gradient checkpointing:
  what is saved outside the checkpointed blocks, their inputs, and the largest block's own saves (backward
  recomputes one block at a time). Plus backward working memory: twice the largest saved tensor.
* VAE encode, before the step (a transient, so the total takes the larger): four feature maps of the VAE's
  first block at full resolution for one chunk of 16 images.
* FSDP (``configs/accelerate/fsdp.yaml``, SHARD_GRAD_OP): the student's fp32 weights, gradients, AdamW and EMA
  are split over the processes; each holds the unsharded student in the autocast dtype from forward to the
  end of backward and a full teacher in the frozen dtype (FSDP flattens the student: no shared weights).
  LoRA runs do not use FSDP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from diffusers.utils import logging as diffusers_logging
from torch.overrides import TorchFunctionMode

from perflow_video.architectures import component_config
from perflow_video.families import FamilyModels, ModelFamily, get_family
from perflow_video.families.animatediff import DEFAULT_MOTION_ADAPTER
from perflow_video.families.base import encode_pixels_to_latents, is_single_file
from perflow_video.families.loading import (
    FAMILY_ARCHITECTURES,
    TINY_PREFIX,
    ComponentConfigs,
    motion_adapter_architecture,
    read_component_config,
    resolve_model_path,
    shipped_configs,
)
from perflow_video.training.frozen_models import DTYPES, place_frozen_models
from perflow_video.training.optimizers import optimizer_state_bytes
from perflow_video.training.run_setup import family_spec
from perflow_video.training.train_config import ModelConfig, TrainConfig

GB = 1e9
#: Bytes per element of the autocast dtype of each optim.mixed_precision (what activations are stored in).
AUTOCAST_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VAE_ENCODE_CHUNK = inspect.signature(encode_pixels_to_latents).parameters["chunk"].default  # images per call
ASSUMPTIONS = (
    "gradients 1 x fp32 and AdamW 2 x fp32 per trained weight (adamw8bit: 2 x int8), EMA 1 x fp32",
    "activations: what autograd saves in one student forward (meta device, autocast dtype, memory-efficient "
    "attention), with gradient checkpointing the blocks' inputs + the largest block; + 2 x largest saved tensor",
    "not counted: CUDA context and allocator slack (~1-2 GB), the teacher's no-grad forwards (smaller than the "
    "student's step)",
)


@dataclass
class Line:
    """One entry of the plan."""

    name: str
    bytes: int
    detail: str = ""  # e.g. "859.52M params fp32"


@dataclass
class Activations:
    """Student activations of one step (bytes)."""

    saved: int  # kept for backward after the forward (checkpointing: outside saves + block inputs)
    recompute: int  # the largest checkpointed block's own saves (0 without checkpointing)
    working: int  # backward working memory (2 x the largest saved tensor)

    @property
    def total(self) -> int:
        return self.saved + self.recompute + self.working


@dataclass
class MemoryPlan:
    """Per-process memory of one GPU (``single``) and of one of ``fsdp_processes`` under FSDP."""

    weights: list[Line]
    training: list[Line]  # gradients, AdamW, EMA
    activations: Activations
    vae_encode: int
    fsdp: list[Line]
    fsdp_processes: int
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def delta_reference(self) -> int:
        """The fp32 CPU copy of the trained weights ΔW is taken against (``trained_weights.CopiedWeights``;
        a LoRA run keeps none, and this is then the adapters' size, an upper bound)."""
        return next(x.bytes for x in self.training if x.name == "gradients")

    @property
    def single(self) -> int:
        static = sum(x.bytes for x in self.weights) + sum(
            x.bytes for x in self.training if x.name != "gradients"
        )
        grads = next((x.bytes for x in self.training if x.name == "gradients"), 0)
        return static + max(grads + self.activations.total, self.vae_encode)

    @property
    def per_fsdp_process(self) -> int:
        return sum(x.bytes for x in self.fsdp) + max(self.activations.total, self.vae_encode)


# ----------------------------------------------------------------------------------------------------
# The run's models on the meta device
# ----------------------------------------------------------------------------------------------------


def planned_frozen_dtype(cfg: TrainConfig) -> torch.dtype:
    """What ``frozen_models.frozen_dtype`` gives a run of ``cfg`` (accelerate takes its mixed precision)."""
    if cfg.optim.frozen_dtype != "auto":
        return DTYPES[cfg.optim.frozen_dtype]
    return DTYPES.get(cfg.optim.mixed_precision, torch.float32)


def weight_sources(model: ModelConfig) -> tuple[str, str | None]:
    """(where the base model's component configs are, where the motion adapter's config is) for a
    pretrained run (single files: their config keys; tiny: the tiny model's folder)."""
    base = model.pretrained_model_name_or_path
    if is_single_file(base):
        base = model.single_file_config or base
    base = resolve_model_path(base, model.family) if base == TINY_PREFIX else base
    adapter = model.motion_adapter or DEFAULT_MOTION_ADAPTER
    if adapter == TINY_PREFIX:
        adapter = f"{base}/motion_adapter"
    elif is_single_file(adapter):
        adapter = model.motion_adapter_config or DEFAULT_MOTION_ADAPTER
    return base, adapter


def shipped_fallback(model: ModelConfig, component: str) -> tuple[str, dict]:
    """The shipped architecture's config of ``component`` (the real vocabulary), and its name."""
    if component == "motion_adapter":
        try:
            name = motion_adapter_architecture(model.motion_adapter)
        except ValueError:
            name = motion_adapter_architecture(None)
        return name, component_config(name)
    name = FAMILY_ARCHITECTURES[model.family]
    return name, component_config(name, component)


def source_configs(model: ModelConfig, notes: list[str]) -> ComponentConfigs:
    """The configs a pretrained run's weights come with, read offline; a component whose config cannot be
    read is counted with the shipped architecture, and ``notes`` says so."""
    base, adapter = weight_sources(model)

    def read(component: str) -> dict:
        if component == "scheduler":  # no weights: any config of the family will do
            return shipped_fallback(model, component)[1]
        source, sub = (adapter, None) if component == "motion_adapter" else (base, component)
        try:
            return read_component_config(source, sub, model.revision)
        except (OSError, ValueError):
            name, config = shipped_fallback(model, component)
            notes.append(f"{component}: no config at {source!r} offline; counted the shipped {name}")
            return config

    return ComponentConfigs(read, base, adapter)


def meta_models(cfg: TrainConfig, share_frozen: bool, notes: list[str]) -> tuple[ModelFamily, FamilyModels]:
    """The run's models on the meta device, trainable weights chosen and frozen models in their dtype."""
    family = get_family(cfg.model.family)
    m = cfg.model
    configs = shipped_configs(m.family, m.motion_adapter) if m.init == "random" else source_configs(m, notes)
    with init_empty_weights(include_buffers=True):
        models = family.random_models(family_spec(cfg, share_frozen), configs)
    family.set_trainable(models.student, m.trainable)
    place_frozen_models(models, "meta", planned_frozen_dtype(cfg))
    return family, models


# ----------------------------------------------------------------------------------------------------
# Weights, gradients, optimizer
# ----------------------------------------------------------------------------------------------------


def tensors_of(module: torch.nn.Module) -> dict[int, torch.Tensor]:
    """Parameters and buffers by object identity."""
    return {id(t): t for t in [*module.parameters(), *module.buffers()]}


def line(name: str, tensors: list[torch.Tensor]) -> Line:
    numel = sum(t.numel() for t in tensors)
    dtypes = "+".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors})) or "-"
    return Line(name, sum(t.numel() * t.element_size() for t in tensors), f"{numel / 1e6:.2f}M {dtypes}")


def weight_lines(models: FamilyModels) -> list[Line]:
    """Teacher, student, VAE, text encoders: every tensor once (the student's shared ones in its lines)."""
    student, teacher = tensors_of(models.student), tensors_of(models.teacher)
    trained = [t for t in student.values() if isinstance(t, torch.nn.Parameter) and t.requires_grad]
    trained_ids = {id(t) for t in trained}  # a LoRA student's adapters are in the teacher module too
    shared = [t for k, t in student.items() if k in teacher and k not in trained_ids]
    own = [t for k, t in student.items() if k not in teacher and not t.requires_grad]
    lines = [
        line("student: trained weights", trained),
        line("student = teacher: shared frozen weights", shared),
        line("student: frozen weights of its own", own),
        line("teacher: weights of its own", [t for k, t in teacher.items() if k not in student]),
        line("VAE", list(tensors_of(models.vae).values())),
        line("text encoders", [t for e in models.text_encoders for t in tensors_of(e).values()]),
    ]
    return [x for x in lines if x.bytes]


def training_lines(trained: list[int], use_ema: bool, optimizer: str) -> list[Line]:
    """Gradients, AdamW moments and the EMA copy of the trained tensors (of ``trained`` elements each)."""
    numel = sum(trained)
    moments = "2 x int8 (tensors >= 4096)" if optimizer == "adamw8bit" else "2 x fp32"
    lines = [
        Line("gradients", 4 * numel, "fp32"),
        Line("AdamW moments", optimizer_state_bytes(optimizer, trained), moments),
    ]
    if use_ema:
        lines.append(Line("EMA copy", 4 * numel, "fp32"))
    return lines


# ----------------------------------------------------------------------------------------------------
# Activations: what autograd saves in one student forward, on the meta device
# ----------------------------------------------------------------------------------------------------


class EfficientAttention(TorchFunctionMode):
    """Runs SDPA as a memory-efficient kernel does (saving q, k, v, output and logsumexp): on the meta
    device ``F.scaled_dot_product_attention`` would take the math path and save the N x N scores."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and len(args) == 3 and kwargs.get("attn_mask") is None:
            flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
            return flash(*args, is_causal=kwargs.get("is_causal", False), scale=kwargs.get("scale"))[0]
        return func(*args, **kwargs)


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class SavedTensors:
    """Bytes autograd saves for backward, each storage once, weights excluded; the student's gradient
    checkpointing function is :meth:`checkpoint`, which counts each block on its own."""

    def __init__(self, weights: list[torch.Tensor]):
        self.weights = {storage_key(t) for t in weights}
        self.outside: dict[int, int] = {}
        self.current = self.outside
        self.inputs: dict[int, int] = {}
        self.blocks: list[int] = []
        self.largest = 0
        self.alive: list = []

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.alive.append(t)  # a freed storage's address could be reused by a later one: keep them all
        key = storage_key(t)
        if key not in self.weights:
            self.current[key] = t.untyped_storage().nbytes()
            self.largest = max(self.largest, self.current[key])
        return t

    def checkpoint(self, block, *args):
        """Run ``block`` as gradient checkpointing would keep it: its inputs stay, its saves are one block's."""
        self.alive.extend(args)
        for a in args:
            if isinstance(a, torch.Tensor) and storage_key(a) not in self.weights:
                self.inputs[storage_key(a)] = a.untyped_storage().nbytes()
        outer, self.current = self.current, {}
        try:
            return block(*args)
        finally:
            self.blocks.append(sum(self.current.values()))
            self.current = outer

    def activations(self) -> Activations:
        kept = {**self.outside, **self.inputs}
        return Activations(sum(kept.values()), max(self.blocks, default=0), 2 * self.largest)


def student_inputs(family: ModelFamily, models: FamilyModels, cfg: TrainConfig, dtype: torch.dtype):
    """(z_t, timesteps, conditioning) of one micro-batch, on the meta device."""
    vae_factor = 2 ** (len(models.vae.config.block_out_channels) - 1)  # SD: 8; the tiny teacher: 4
    b, h = cfg.optim.train_batch_size, cfg.model.resolution // vae_factor
    channels = models.student.config.in_channels
    shape = (b, channels, cfg.model.num_frames, h, h) if family.data_kind == "clips" else (b, channels, h, h)
    cond = family.encode_prompts(models, [""] * b, "meta").map(lambda x: x.to(dtype))
    return torch.zeros(shape, device="meta", dtype=dtype), torch.full((b,), 500.0, device="meta"), cond


def student_activations(family: ModelFamily, models: FamilyModels, cfg: TrainConfig) -> Activations:
    """Measure :class:`Activations` of one forward of the (meta) student at the config's clip shape."""
    dtype = AUTOCAST_DTYPES[cfg.optim.mixed_precision]
    student = models.student.to(dtype)  # after the weight lines: the shared tensors change dtype here
    z_t, timestep, cond = student_inputs(family, models, cfg, dtype)
    saved = SavedTensors([*student.parameters(), *student.buffers()])
    if cfg.model.gradient_checkpointing:
        student.enable_gradient_checkpointing(saved.checkpoint)
    hooks = torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t)
    with EfficientAttention(), hooks:
        student(z_t, timestep, **cond.unet_kwargs())
    return saved.activations()


def vae_encode_bytes(models: FamilyModels, cfg: TrainConfig) -> int:
    """Four feature maps of the VAE encoder's first block at full resolution, for one encode chunk."""
    images = cfg.optim.train_batch_size * (cfg.model.num_frames if models.num_frames else 1)
    chunk = min(images, VAE_ENCODE_CHUNK)
    width = models.vae.config.block_out_channels[0]
    element = torch.empty((), dtype=planned_frozen_dtype(cfg)).element_size()
    return 4 * chunk * width * cfg.model.resolution**2 * element


# ----------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------


def fsdp_lines(weights: list[Line], models: FamilyModels, cfg: TrainConfig, processes: int) -> list[Line]:
    """One FSDP SHARD_GRAD_OP process: see the module docstring. None for a LoRA run (no FSDP there)."""
    if cfg.model.trainable == "lora":
        return []
    student = sum(p.numel() for p in models.student.parameters())
    trained = sum(p.numel() for p in models.student.parameters() if p.requires_grad)
    compute = AUTOCAST_DTYPES[cfg.optim.mixed_precision]
    frozen = torch.empty((), dtype=planned_frozen_dtype(cfg)).element_size()
    n = processes
    lines = [
        Line("student fp32 weights, sharded", 4 * student // n, f"{student / 1e6:.2f}M / {n}"),
        Line(
            "student unsharded for compute",
            student * torch.empty((), dtype=compute).element_size(),
            str(compute).removeprefix("torch."),
        ),  # fmt: skip
        Line("teacher, full copy", student * frozen, str(planned_frozen_dtype(cfg)).removeprefix("torch.")),
        *[x for x in weights if x.name in ("VAE", "text encoders")],
        Line("gradients, sharded", 4 * trained // n, f"fp32 / {n}"),
        Line("AdamW moments, sharded", optimizer_state_bytes(cfg.optim.optimizer, [trained]) // n, f"/ {n}"),
    ]
    if cfg.optim.use_ema:
        lines.append(Line("EMA copy, sharded", 4 * trained // n, f"fp32 / {n}"))
    return lines


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """diffusers' warnings off (errors still show) for the duration."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def memory_plan(cfg: TrainConfig, fsdp_processes: int = 8) -> MemoryPlan:
    """The plan of ``cfg`` on one GPU (the student sharing the teacher's frozen weights) and per process
    under FSDP with ``fsdp_processes`` processes. Builds nothing but meta tensors."""
    notes: list[str] = []
    with quiet_diffusers():  # casting meta models warns about modules kept in fp32 (there are none)
        return plan_of(cfg, fsdp_processes, notes)


def plan_of(cfg: TrainConfig, fsdp_processes: int, notes: list[str]) -> MemoryPlan:
    """:func:`memory_plan`'s work; ``notes`` collects what was counted with the shipped architecture."""
    family, models = meta_models(cfg, share_frozen=True, notes=notes)
    weights = weight_lines(models)
    trained = [p.numel() for p in models.student.parameters() if p.requires_grad]
    training = training_lines(trained, cfg.optim.use_ema, cfg.optim.optimizer)
    fsdp = fsdp_lines(weights, models, cfg, fsdp_processes)
    vae = vae_encode_bytes(models, cfg)
    activations = student_activations(family, models, cfg)
    return MemoryPlan(weights, training, activations, vae, fsdp, fsdp_processes, notes)


def size(n: int) -> str:
    """Bytes as GB (1e9) down to 0.1 GB, else MB."""
    return f"{n / GB:8.2f} GB" if n >= GB / 10 else f"{n / 1e6:8.2f} MB"


def fsdp_rows(plan: MemoryPlan) -> list[str]:
    """The FSDP part of :func:`format_plan` (a LoRA run has none: it runs under DDP)."""
    if not plan.fsdp:
        return ["  FSDP: not for model.trainable=lora (DDP: every GPU holds the one-GPU total above)"]
    return [
        f"  FSDP SHARD_GRAD_OP, {plan.fsdp_processes} processes (no shared weights):",
        *[f"    {x.name:<40} {size(x.bytes)}  {x.detail}" for x in plan.fsdp],
        f"  {'total per FSDP process':<42} {size(plan.per_fsdp_process)}",
    ]


def format_plan(plan: MemoryPlan, cfg: TrainConfig) -> str:
    """The plan as ``# ``-comment lines (the dry run's stdout stays a YAML file)."""
    m, o = cfg.model, cfg.optim
    shape = f"{o.train_batch_size} x {m.num_frames} x {m.resolution} x {m.resolution}"
    a = plan.activations
    rows = [
        f"memory plan (GB = 1e9 bytes): batch x frames x pixels = {shape}, mixed_precision={o.mixed_precision}, "
        f"gradient_checkpointing={m.gradient_checkpointing}, trainable={m.trainable}, init={m.init}",
        *[f"  {x.name:<42} {size(x.bytes)}  {x.detail}" for x in [*plan.weights, *plan.training]],
        f"  {'activations (student forward + backward)':<42} {size(a.total)}  saved {size(a.saved).strip()}"
        f" + recomputed block {size(a.recompute).strip()} + backward working {size(a.working).strip()}",
        f"  {'VAE encode (transient, before the step)':<42} {size(plan.vae_encode)}",
        f"  {'total, one GPU':<42} {size(plan.single)}",
        *fsdp_rows(plan),
        f"  host RAM besides: the trained weights as loaded (ΔW reference, fp32) {size(plan.delta_reference).strip()}"
        " (on a CPU run, in the same memory)",
        *[f"  assumes: {x}" for x in ASSUMPTIONS],
        *[f"  note: {x}" for x in plan.notes],
    ]
    return "\n".join(f"# {row}" for row in rows)
