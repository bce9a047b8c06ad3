"""What a training run holds while it runs: built once by the setup steps (``run_setup``), read and
updated by the loop (``trainer``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from perflow_video.families import FamilyModels, ModelFamily
from perflow_video.method.reflow_evaluation import FixedReflowDraws
from perflow_video.method.reflow_objective import ReflowConfig
from perflow_video.method.teacher_solver import Conditioning
from perflow_video.training.checkpointing import TrainerState
from perflow_video.training.metrics_log import METRICS_FILE
from perflow_video.training.train_config import TrainConfig
from perflow_video.training.trained_weights import TrainedWeights


@dataclass
class Models:
    """The family's models and what the objective needs of them."""

    loaded: FamilyModels  # teacher, student (unwrapped), VAE, text encoders as the family loaded them
    teacher: torch.nn.Module  # the frozen teacher as the window solver calls it (FrozenModel)
    reflow: ReflowConfig  # the recipe, with the teacher's own prediction type
    alphas_cumprod: Tensor  # (N,) the teacher's abar
    trained: TrainedWeights  # what trains, and how it becomes the final student and ΔW


@dataclass
class Data:
    """The training data and the fixed evaluation set."""

    dataset: Dataset  # items {"pixel_values" | "latents", "prompt", "index", ...}
    empty_text: Conditioning  # the empty prompt's per-prompt conditioning, 1 row (dropout, CFG)
    eval_draws: list[FixedReflowDraws]  # eval_loss batches; empty when run.eval_steps = 0


@dataclass
class Optimization:
    """What accelerate prepared (the student possibly DDP-wrapped) and the EMA."""

    student: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object  # a torch LR scheduler (accelerate-wrapped)
    loader: DataLoader
    params: list[torch.nn.Parameter]  # the trained parameters of the unwrapped student
    ema: object | None  # diffusers EMAModel with optim.use_ema


@dataclass
class Run:
    """One training run."""

    cfg: TrainConfig
    accelerator: Accelerator
    out: Path  # the run folder
    report_to: str  # tensorboard | none (what is installed)
    family: ModelFamily
    models: Models
    data: Data
    opt: Optimization | None  # None once released at the end
    state: TrainerState = field(default_factory=lambda: TrainerState(global_step=0, batches_seen=0))
    nonfinite_in_a_row: int = 0  # NaN/inf losses skipped since the last finite one
    nonfinite_total: int = 0
    last_eval: dict[str, str] = field(default_factory=dict)  # shown in the progress bar

    @property
    def metrics_path(self) -> Path:
        return self.out / METRICS_FILE
