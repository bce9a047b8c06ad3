"""The frozen models of a run (teacher, VAE, text encoders) in half precision on accelerators."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from perflow_video.training.train_config import TrainConfig

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


def frozen_dtype(cfg: TrainConfig, accelerator: Accelerator) -> torch.dtype:
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
