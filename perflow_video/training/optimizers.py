"""The optimizer of the trained weights (``optim.optimizer``): torch's AdamW, or bitsandbytes' 8-bit AdamW
(moments stored in 8 bits, block-wise quantized: a quarter of AdamW's state; CUDA only)."""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch

from perflow_video.errors import ConfigError

#: ``optim.optimizer``.
OptimizerName = Literal["adamw", "adamw8bit"]
#: bitsandbytes keeps tensors smaller than this in 32-bit state (its ``min_8bit_size`` default).
MIN_8BIT_SIZE = 4096


def bitsandbytes_available() -> bool:
    """Whether bitsandbytes can be imported (checked without importing it: that is slow and loud)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def check_optimizer_device(optimizer: str, cuda: bool) -> None:
    """At start-up: the 8-bit AdamW runs on CUDA GPUs only."""
    if optimizer == "adamw8bit" and not cuda:
        raise ConfigError(
            "optim.optimizer=adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit AdamW) and there is none: "
            "use optim.optimizer=adamw"
        )


def make_optimizer(
    name: str,
    params: list[torch.nn.Parameter],
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float,
) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) on ``params``, 32-bit or 8-bit state."""
    if name == "adamw8bit":
        import bitsandbytes as bnb  # optional extra [bnb]; the config checked it is installed

        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)


def optimizer_state_bytes(name: str, numels: list[int]) -> int:
    """Bytes of the two Adam moments of tensors of ``numels`` elements: fp32 each, or 8 bits each for
    tensors of at least :data:`MIN_8BIT_SIZE` elements under ``adamw8bit`` (block statistics not counted)."""
    if name == "adamw8bit":
        return sum(2 * n if n >= MIN_8BIT_SIZE else 8 * n for n in numels)
    return 8 * sum(numels)
