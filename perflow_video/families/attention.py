"""Memory-efficient attention: xformers where installed (and CUDA present), PyTorch SDPA otherwise."""

from __future__ import annotations

import importlib.util
import logging
from typing import Literal, get_args

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

logger = logging.getLogger(__name__)

AttentionBackend = Literal["auto", "xformers", "sdpa"]  # auto: xformers if installed and CUDA, else SDPA
ATTENTION_BACKENDS: tuple[str, ...] = get_args(AttentionBackend)


def xformers_available() -> bool:
    """True when the ``xformers`` package can be imported."""
    return importlib.util.find_spec("xformers") is not None


def resolve_attention_backend(requested: str) -> str:
    """``auto`` -> ``xformers`` when xformers and CUDA are both present, else ``sdpa``.

    Raises:
        ValueError: unknown name, or ``xformers`` forced where it cannot run (the message says why).
    """
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose one of {ATTENTION_BACKENDS}")
    if requested == "auto":
        return "xformers" if xformers_available() and torch.cuda.is_available() else "sdpa"
    if requested == "xformers":
        if not xformers_available():
            raise ValueError(
                "attention=xformers but xformers is not installed: pip install 'perflow-video[xformers]'"
            )
        if not torch.cuda.is_available():
            raise ValueError(
                "attention=xformers needs a CUDA GPU; use attention=sdpa (or auto) on this machine"
            )
    return requested


def configure_attention(modules: list[torch.nn.Module], requested: str = "auto") -> str:
    """Set every attention layer of the given diffusers models to one backend; returns the backend used."""
    backend = resolve_attention_backend(requested)
    for module in modules:
        if backend == "xformers":
            module.enable_xformers_memory_efficient_attention()
        else:
            module.set_attn_processor(AttnProcessor2_0())
    logger.info("attention backend: %s", backend)
    return backend
