"""Seconds and peak memory of one PeRFlow training step of AnimateDiff, by training set-up.

A step is the trainer's: under autocast, the frozen teacher's window solve (:func:`reflow_targets`: M no-grad
DDIM steps) and the student's loss (:func:`student_loss`), then backward, gradient clipping and an AdamW
step. It is timed in two parts, with the device synchronised at each boundary:

* ``solve``: ``reflow_targets`` (the teacher's M evaluations and the segment / target arithmetic);
* ``student``: ``student_loss`` + backward + clipping + optimizer step + zero_grad.

Set-ups (:data:`TRAINING_CASES`): the motion modules trained in full (student fp32 = the master copy; the
teacher a separate frozen copy in the teacher dtype, as ``optim.frozen_dtype`` makes it), or LoRA on the
motion modules' attention projections (one network in the teacher dtype with fp32 LoRA weights; the
teacher is the same network with its adapters disabled), each with and without gradient checkpointing,
and with PyTorch SDPA or xformers attention. Every case builds its own networks and frees them after, so its
peak memory is its own: weights, optimizer state and activations.
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from peft import LoraConfig

from perflow_video.evaluation.benchmark_models import (
    ModelSize,
    build_text_encoder,
    build_unet_motion,
    tokenizer_for,
)
from perflow_video.evaluation.benchmark_timing import MemoryGauge, stopwatch
from perflow_video.families.attention import configure_attention
from perflow_video.families.base import encode_clip_prompts, make_student
from perflow_video.method.noise_schedule import alphas_cumprod_from_scheduler_config
from perflow_video.method.reflow_objective import ReflowConfig, reflow_targets, student_loss
from perflow_video.method.teacher_solver import Conditioning

Trainable = Literal["motion", "motion_lora"]
#: The motion modules' attention projections (diffusers names inside ``UNetMotionModel``).
MOTION_LORA_TARGETS = r".*motion_modules.*\.(to_q|to_k|to_v|to_out\.0)$"


@dataclass(frozen=True)
class TrainingCase:
    """One training set-up."""

    name: str
    trainable: Trainable
    gradient_checkpointing: bool
    attention: Literal["sdpa", "xformers"]


TRAINING_CASES: tuple[TrainingCase, ...] = (
    TrainingCase("motion, sdpa", "motion", False, "sdpa"),
    TrainingCase("motion, sdpa, checkpointing", "motion", True, "sdpa"),
    TrainingCase("motion, xformers", "motion", False, "xformers"),
    TrainingCase("motion, xformers, checkpointing", "motion", True, "xformers"),
    TrainingCase("motion LoRA, sdpa", "motion_lora", False, "sdpa"),
    TrainingCase("motion LoRA, sdpa, checkpointing", "motion_lora", True, "sdpa"),
)


@dataclass(frozen=True)
class TrainingSetup:
    """Sizes and precision shared by every case. ``autocast`` None = no autocast (full precision)."""

    size: ModelSize
    num_frames: int
    resolution: int
    batch_size: int
    device: str
    autocast: torch.dtype | None = torch.bfloat16
    teacher_dtype: torch.dtype = torch.bfloat16
    steps: int = 3
    warmup: int = 1
    lora_rank: int = 32
    learning_rate: float = 1e-5
    reflow: ReflowConfig = field(default_factory=ReflowConfig)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["autocast"] = str(self.autocast).removeprefix("torch.") if self.autocast else None
        d["teacher_dtype"] = str(self.teacher_dtype).removeprefix("torch.")
        return d


@dataclass
class CaseNetworks:
    """What one case trains: the student, the teacher to solve with, and the trainable parameters."""

    student: torch.nn.Module
    teacher: torch.nn.Module
    params: list[torch.nn.Parameter]
    lora: bool


def build_case_networks(case: TrainingCase, setup: TrainingSetup) -> CaseNetworks:
    """The student / teacher pair of one case, on the setup's device, with its attention and checkpointing."""
    network = build_unet_motion(setup.size, setup.device)
    configure_attention([network], case.attention)  # a ValueError says why xformers cannot run here
    if case.trainable == "motion":
        teacher = network.to(dtype=setup.teacher_dtype).requires_grad_(False)
        student = make_student(network).to(dtype=torch.float32)  # the fp32 master copy
        for name, p in student.named_parameters():
            p.requires_grad_("motion_modules" in name)
        lora = False
    else:
        student = teacher = network.to(dtype=setup.teacher_dtype).requires_grad_(False)
        student.add_adapter(
            LoraConfig(r=setup.lora_rank, lora_alpha=setup.lora_rank, target_modules=MOTION_LORA_TARGETS)
        )
        for p in student.parameters():
            if p.requires_grad:
                p.data = (
                    p.data.float()
                )  # trainable LoRA weights in fp32, the frozen base in the teacher dtype
        lora = True
    if case.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    return CaseNetworks(student, teacher, params, lora)


@contextmanager
def adapters_disabled(networks: CaseNetworks) -> Iterator[None]:
    """The LoRA student with its adapters off is the teacher; a separate teacher needs nothing."""
    if not networks.lora:
        yield
        return
    networks.teacher.disable_adapters()
    try:
        yield
    finally:
        networks.teacher.enable_adapters()


@dataclass
class StepInputs:
    """A batch: clean latents, the prompt's per-frame conditioning, the teacher's abar."""

    z_0: torch.Tensor
    cond: Conditioning
    alphas_cumprod: torch.Tensor


def step_inputs(setup: TrainingSetup, teacher_scheduler_config: dict) -> StepInputs:
    """Random clip latents (B, 4, F, H/8, W/8) and the text encoder's embedding of a prompt, per frame."""
    latent = setup.resolution // 8
    g = torch.Generator().manual_seed(0)
    z_0 = torch.randn(setup.batch_size, 4, setup.num_frames, latent, latent, generator=g).to(setup.device)
    encoder = build_text_encoder(setup.size, setup.device)
    with torch.no_grad():
        text = encode_clip_prompts(
            encoder,
            tokenizer_for(setup.size),
            ["a dog running on the beach"] * setup.batch_size,
            setup.device,
        )
    del encoder
    cond = Conditioning(text.repeat_interleave(setup.num_frames, dim=0))
    return StepInputs(z_0, cond, alphas_cumprod_from_scheduler_config(teacher_scheduler_config))


@dataclass
class StepTiming:
    solve_seconds: float
    student_seconds: float
    loss: float

    @property
    def total_seconds(self) -> float:
        return self.solve_seconds + self.student_seconds


def _autocast(setup: TrainingSetup):
    if setup.autocast is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(setup.device).type, dtype=setup.autocast)


def train_step(
    networks: CaseNetworks, optimizer, inputs: StepInputs, setup: TrainingSetup, seed: int
) -> StepTiming:
    """One step (teacher solve, then student loss + backward + clip + AdamW), timed in its two parts."""
    generator = torch.Generator().manual_seed(seed)
    with stopwatch(setup.device) as solve, _autocast(setup), adapters_disabled(networks):
        targets = reflow_targets(
            networks.teacher,
            inputs.z_0,
            inputs.alphas_cumprod,
            setup.reflow,
            inputs.cond,
            generator=generator,
        )
    with stopwatch(setup.device) as student:
        with _autocast(setup):
            loss = student_loss(networks.student, targets, inputs.cond).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(networks.params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return StepTiming(solve[0], student[0], float(loss.detach()))


def measure_training_case(case: TrainingCase, setup: TrainingSetup, inputs: StepInputs) -> dict:
    """Warm-up steps, then timed steps: the split of the median step, the peak memory over the timed steps."""
    networks = build_case_networks(case, setup)
    optimizer = torch.optim.AdamW(networks.params, lr=setup.learning_rate)
    try:
        for i in range(setup.warmup):
            train_step(networks, optimizer, inputs, setup, seed=i)
        with MemoryGauge(setup.device).measure() as memory:
            steps = [
                train_step(networks, optimizer, inputs, setup, seed=setup.warmup + i)
                for i in range(setup.steps)
            ]
        trainable = sum(p.numel() for p in networks.params)
    finally:
        networks = optimizer = None  # the caller frees the memory (free_memory) once nothing refers to it
    totals = [s.total_seconds for s in steps]
    median = steps[totals.index(statistics.median_low(totals))]  # its split adds up to its total
    return {
        **asdict(case), "status": "ok", "trainable_parameters": trainable,
        "solve_seconds": median.solve_seconds, "student_seconds": median.student_seconds,
        "total_seconds": median.total_seconds, "total_seconds_all": totals, "loss": median.loss,
        "peak_memory_mib": memory[0].peak_mib, "peak_memory_delta_mib": memory[0].delta_mib,
        "memory_method": memory[0].method,
    }  # fmt: skip


def free_memory(device: str) -> None:
    """Return freed blocks to the allocator (and the GPU) so the next case starts clean."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


__all__ = [
    "MOTION_LORA_TARGETS",
    "TRAINING_CASES",
    "CaseNetworks",
    "StepInputs",
    "StepTiming",
    "TrainingCase",
    "TrainingSetup",
    "build_case_networks",
    "free_memory",
    "measure_training_case",
    "step_inputs",
    "train_step",
]
