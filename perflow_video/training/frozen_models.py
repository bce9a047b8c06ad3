"""The frozen models of a run (teacher, VAE, text encoders) in half precision on accelerators."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from perflow_video.families import FamilyModels
from perflow_video.training.train_config import TrainConfig
from perflow_video.weights.lora_adapter import adapters_disabled

# The torch dtype of every FrozenDtype value but "auto" (a test checks the two lists agree).
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class FrozenModel(torch.nn.Module):
    """Runs a frozen half-precision UNet on float32 inputs: casts sample and conditioning in, output out.

    The UNet runs with its LoRA adapters disabled (``weights.lora_adapter.adapters_disabled``; a UNet
    without adapters is unaffected): a LoRA run's teacher is its student network without them.
    """

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
        with adapters_disabled(self.model):
            return self.model(cast(sample), timestep, return_dict=False, **kwargs)[0].float()


def frozen_dtype(cfg: TrainConfig, accelerator: Accelerator) -> torch.dtype:
    """The dtype of the frozen models: ``optim.frozen_dtype``, or with ``auto`` the mixed precision's
    (half precision on accelerators when training in mixed precision). The config has already checked
    that a half-precision choice comes with mixed precision (``train_config.check_frozen_dtype``)."""
    if cfg.optim.frozen_dtype != "auto":
        return DTYPES[cfg.optim.frozen_dtype]
    return DTYPES.get(accelerator.mixed_precision, torch.float32)


def place_frozen_models(models: FamilyModels, device: torch.device | str, dtype: torch.dtype) -> None:
    """Move the frozen models (teacher, VAE, text encoders) to ``device`` in ``dtype``, in eval mode.

    The teacher tensors the student shares (its frozen weights: the very same Parameter objects; all of them
    for a LoRA student, which is the teacher module) move with the teacher but keep their dtype: they are
    the student's weights too, and the student stays in full precision (autocast runs them in the
    mixed-precision dtype). Everything else is cast, as before.
    """
    teacher = models.teacher
    for module in models.frozen_modules():
        if module is not teacher:
            module.to(device=device, dtype=dtype).eval()
    teacher.to(device=device).eval()  # moving buffers replaces them: the student's are known after it
    shared = {id(t) for t in [*models.student.parameters(), *models.student.buffers()]}
    for param in teacher.parameters():
        if id(param) not in shared and param.is_floating_point():
            param.data = param.data.to(dtype)
    for module in teacher.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.is_floating_point() and id(buffer) not in shared:
                setattr(module, name, buffer.to(dtype))
