"""LoRA adapters on a diffusers UNet through PEFT (``model.trainable=lora``).

The student of a LoRA run is the teacher network itself with low-rank adapters on some attention
projections; with the adapters disabled it *is* the teacher, so one network is in memory. Here:

* :func:`attention_projections`: the ``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0`` linears a LoRA adapts.
* :func:`add_lora`: inject rank-r adapters (alpha, dropout 0, B = 0: the student starts as the teacher).
* :func:`adapters_disabled`: a context in which the network computes its base weights only (the teacher).
* :func:`lora_delta`: ΔW = B·A·alpha/r per adapted weight, keyed ``<module>.weight`` as the plain model is.
* :func:`merge_lora`: add that ΔW to the base weights and remove the adapters: a plain diffusers model.
* :func:`save_lora_adapter`: the adapter as a diffusers LoRA file (``pipe.load_lora_weights`` reads it).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor

from perflow_video.atomic_files import write_safetensors_atomic
from perflow_video.errors import ConfigError

__all__ = [
    "ADAPTER_NAME",
    "PROJECTIONS",
    "adapters_disabled",
    "add_lora",
    "attention_projections",
    "has_lora",
    "is_adapter_parameter",
    "lora_delta",
    "lora_layers",
    "merge_lora",
    "save_lora_adapter",
]

#: The PEFT adapter name of the trained LoRA (peft's default).
ADAPTER_NAME = "default"
#: The attention projections a LoRA adapts (diffusers ``Attention`` submodule names).
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def attention_projections(model: torch.nn.Module, include: Callable[[str], bool]) -> list[str]:
    """Names of the ``Attention`` projection linears of ``model`` (:data:`PROJECTIONS`) that ``include``
    accepts, e.g. ``down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q``."""
    suffixes = tuple(f".{p}" for p in PROJECTIONS)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith(suffixes) and include(name)
    ]


def add_lora(model: torch.nn.Module, modules: list[str], rank: int, alpha: float) -> None:
    """Inject LoRA adapters of rank ``rank`` and scale ``alpha / rank`` into ``modules`` of ``model`` (a
    diffusers model: ``add_adapter``). Dropout 0; B starts at zero, so the model computes what it did."""
    if not modules:
        raise ConfigError("model.lora_targets: the model has no attention projections there to adapt")
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=True, target_modules=list(modules)
    )
    model.add_adapter(config, ADAPTER_NAME)


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter name is a LoRA factor (``...to_q.lora_A.default.weight``), not a base weight."""
    return ".lora_A." in name or ".lora_B." in name


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """The LoRA-wrapped layers of ``model`` by module name (the name the plain layer has)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def has_lora(model: torch.nn.Module) -> bool:
    """Whether ``model`` carries LoRA adapters."""
    return any(isinstance(m, LoraLayer) for m in model.modules())


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` without its adapters (PEFT's ``enable_adapters(False)`` on every adapted layer); a
    model without adapters runs as it is. Each layer's previous state and the adapters' ``requires_grad``
    (PEFT clears it on disable and sets it on enable) are restored on exit."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    states = [m.disable_adapters for m in layers]
    grads = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, was_disabled in zip(layers, states, strict=True):
            m.enable_adapters(not was_disabled)
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)


def layer_delta(layer: LoraLayer) -> Tensor:
    """ΔW of one adapted linear: ``B @ A * alpha / r`` (out, in), computed in float64 on the CPU, float32."""
    a = layer.lora_A[ADAPTER_NAME].weight.detach().double().cpu()
    b = layer.lora_B[ADAPTER_NAME].weight.detach().double().cpu()
    return (b @ a * layer.scaling[ADAPTER_NAME]).float()


def lora_delta(model: torch.nn.Module) -> dict[str, Tensor]:
    """ΔW of every adapted weight, ``{<module>.weight: B·A·alpha/r}`` (float32, CPU): the keys of the model
    without its adapters, the layout of ``compute_delta_weights``."""
    return {f"{name}.weight": layer_delta(layer) for name, layer in lora_layers(model).items()}


def merge_lora(model: torch.nn.Module, delta: dict[str, Tensor]) -> torch.nn.Module:
    """Add ``delta`` (:func:`lora_delta`) to the adapted base weights and remove the adapters, in place:
    the plain diffusers model of the student (``W = W_base + ΔW``, one float32 addition per weight)."""
    for name, layer in lora_layers(model).items():
        weight = layer.get_base_layer().weight
        weight.data = weight.data + delta[f"{name}.weight"].to(device=weight.device, dtype=weight.dtype)
    model.unload_lora()  # diffusers: each LoRA layer is replaced by its (now merged) base layer
    return model


def adapter_metadata(model: torch.nn.Module, modules: list[str]) -> dict[str, str]:
    """diffusers' ``lora_adapter_metadata`` header: the adapter's LoraConfig, packed under ``unet.``."""
    config = model.peft_config[ADAPTER_NAME]
    values = {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": 0.0,
        "rank_pattern": {},
        "alpha_pattern": {},
        "target_modules": sorted(modules),
    }
    packed = {f"unet.{k}": v for k, v in values.items()}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}


def save_lora_adapter(model: torch.nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write the adapters as a diffusers LoRA file: ``unet.<module>.lora_A.weight`` (r, in) and
    ``.lora_B.weight`` (out, r) in float32, the LoraConfig (r, lora_alpha, target_modules) in the header.
    ``pipe.load_lora_weights(path)`` on the base pipeline adds ``alpha / r · B @ A`` to each module."""
    layers = lora_layers(model)
    tensors = {}
    for name, layer in layers.items():
        tensors[f"unet.{name}.lora_A.weight"] = layer.lora_A[ADAPTER_NAME].weight.detach().float()
        tensors[f"unet.{name}.lora_B.weight"] = layer.lora_B[ADAPTER_NAME].weight.detach().float()
    write_safetensors_atomic(tensors, path, adapter_metadata(model, list(layers)))
    return Path(path)
