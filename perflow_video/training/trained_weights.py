"""What a run trains, and how it becomes the final student and its ΔW (docs/method.md §3, step 8).

Chosen once, when the models load (:func:`trained_weights_of`); the loop only sees the optimizer's
parameters and never asks which kind it trains:

* :class:`CopiedWeights` (``model.trainable`` = motion | spatial | all): the student holds its own copy of the
  weights that train; ΔW = student - those weights as loaded.
* :class:`LoraWeights` (``lora``): the student is the teacher network with PEFT LoRA adapters; ΔW = B·A·alpha/r
  per adapted projection, merged into the base weights for the final student, and the adapter itself is
  written as a diffusers LoRA file (:data:`LORA_ADAPTER_FILE`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from perflow_video.weights.delta_weights import compute_delta_weights
from perflow_video.weights.lora_adapter import has_lora, lora_delta, merge_lora, save_lora_adapter

#: The trained adapter of a LoRA run in its run folder (diffusers keys; ``pipe.load_lora_weights``).
LORA_ADAPTER_FILE = "perflow_lora_adapter.safetensors"


class FinalStudent(NamedTuple):
    """The student as the run's outputs write it."""

    student: torch.nn.Module  # a plain diffusers model (what ``ModelFamily.save_student`` writes)
    delta: dict[str, Tensor]  # ΔW, diffusers keys, float32 on the CPU
    files: dict[str, Path]  # files written on the way (the LoRA adapter)


@dataclass
class CopiedWeights:
    """The student's own copy of the weights that train; ``initial`` is them as loaded (fp32, CPU)."""

    initial: dict[str, Tensor]

    def finish(self, student: torch.nn.Module, out: Path) -> FinalStudent:
        """ΔW = student - initial, key by key."""
        state = {k: v.float().cpu() for k, v in student.state_dict().items()}
        return FinalStudent(student, compute_delta_weights(state, self.initial, list(self.initial)), {})


@dataclass
class LoraWeights:
    """LoRA adapters on the teacher network (nothing to remember: the base weights are the teacher's)."""

    def finish(self, student: torch.nn.Module, out: Path) -> FinalStudent:
        """Write the adapter, take ΔW from its factors, merge it into the base weights (in place)."""
        adapter = save_lora_adapter(student, out / LORA_ADAPTER_FILE)
        delta = lora_delta(student)
        return FinalStudent(merge_lora(student, delta), delta, {"lora_adapter": adapter})


TrainedWeights = CopiedWeights | LoraWeights


def trained_weights_of(student: torch.nn.Module) -> TrainedWeights:
    """The kind of ``student`` (its trainable parameters chosen): LoRA adapters, or its own copies (then
    taken now, before the frozen copy of the teacher goes to half precision)."""
    if has_lora(student):
        return LoraWeights()
    initial = {n: p.detach().float().cpu().clone() for n, p in student.named_parameters() if p.requires_grad}
    return CopiedWeights(initial)
