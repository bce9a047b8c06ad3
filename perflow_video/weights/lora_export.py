"""The spatial part of a ΔW as a LoRA (diffusers PEFT or kohya format) or as exact full-weight patches.

Three files users load:

* :func:`export_lora_peft`: ``unet.<module>.lora_A.weight`` / ``lora_B.weight``, the format diffusers'
  ``pipe.load_lora_weights(file)`` reads natively (SD1.5, SD2.1, SDXL, AnimateDiff pipelines), with the
  LoRA adapter metadata diffusers stores in the safetensors header (``lora_adapter_metadata``).
* :func:`export_lora_kohya`: ``lora_unet_<module with . -> _>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``, read by ComfyUI's LoraLoader, A1111's Lora extension and diffusers' ``load_lora_weights``
  (kohya conversion). Module names are diffusers' (what kohya's sd-scripts writes for SD 1.x / 2.x).
* :func:`export_diff_patches`: ``lora_unet_<module>.diff`` (weights) and ``.diff_b`` (biases), which
  ComfyUI's LoRA loader and A1111's ``network_full`` add to the weights exactly. diffusers does not read it.

A ΔW is keyed by diffusers ``UNet2DConditionModel`` parameter names; motion-module keys (AnimateDiff) are
left out of every file here (ship them with :func:`perflow_video.weights.delta_weights.delta_to_layout`).

LoRA factors come from a truncated SVD of each weight ΔW: ``ΔW ≈ U_r S_r V_rᵀ``, with ``sqrt(S_r)`` given
to each side (``up = U_r sqrt(S_r)``, ``down = sqrt(S_r) V_rᵀ``), which keeps both factors at the same
magnitude and so loses least in float16. Conv kernels (out, in, k, k) are flattened to (out, in·k·k);
``down`` is (r, in, k, k) and ``up`` is (out, r, 1, 1), as kohya / LoCon and PEFT store them.
1-D tensors (biases, norm scales) have no low-rank form: the LoRA files drop them and the report says
what share of ‖ΔW‖ that was; the ``.diff`` file keeps them exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from perflow_video.atomic_files import write_safetensors_atomic
from perflow_video.errors import ConfigError
from perflow_video.weights.delta_weights import is_motion_key

__all__ = [
    "DiffExportReport",
    "LayerFit",
    "LoraExportReport",
    "LoraFactors",
    "RankFidelity",
    "export_diff_patches",
    "export_lora_kohya",
    "export_lora_peft",
    "factorize",
    "kohya_name",
    "lora_fidelity",
    "lora_target_keys",
]

logger = logging.getLogger(__name__)

#: Top-level submodules of diffusers' ``UNet2DConditionModel`` that hold parameters.
UNET_TOP_LEVEL = (
    "conv_in",
    "time_embedding",
    "encoder_hid_proj",
    "class_embedding",
    "add_embedding",
    "down_blocks",
    "mid_block",
    "up_blocks",
    "conv_norm_out",
    "conv_out",
    "position_net",
)
# A 2-D weight that belongs to an nn.Embedding (class_embed_type None with num_class_embeds), not a Linear:
# PEFT would need lora_embedding_A/B for it, so it is treated like a 1-D tensor (no LoRA; kept in .diff).
_EMBEDDING_KEYS = ("class_embedding.weight",)
_KOHYA_PREFIX = "lora_unet_"
_MARKER = {"format": "pt", "perflow_video_export": "1"}


# --------------------------------------------------------------------------------------------------
# one tensor
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraFactors:
    """A truncated SVD of one weight ΔW, split into LoRA factors.

    Attributes:
        up: (out, r) for a linear weight, (out, r, 1, 1) for a conv kernel; ``U_r sqrt(S_r)``.
        down: (r, in) or (r, in, k, k); ``sqrt(S_r) V_rᵀ``. ``up @ down`` (flattened) approximates ΔW.
        rank: r (0 for an all-zero ΔW: nothing to add).
        relative_error: ‖ΔW − up·down‖_F / ‖ΔW‖_F, measured on the reconstruction (0 for a zero ΔW).
        singular_values: All singular values of the flattened ΔW, largest first.
    """

    up: torch.Tensor
    down: torch.Tensor
    rank: int
    relative_error: float
    singular_values: torch.Tensor


def _check_rank_choice(rank: int | None, energy: float | None) -> None:
    if rank is None and energy is None:
        raise ConfigError("Give a LoRA `rank`, an `energy` fraction, or both (the smaller rank wins).")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"LoRA `rank` must be an int >= 1, got {rank!r}.")
    if energy is not None and (
        isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < energy <= 1.0
    ):
        raise ConfigError(f"LoRA `energy` must be a fraction in (0, 1], got {energy!r}.")


def _numerical_rank(singular_values: torch.Tensor, longest_side: int) -> int:
    """How many singular values stand above float32 round-off (``torch.linalg.matrix_rank``'s tolerance)."""
    if singular_values.numel() == 0:
        return 0
    tol = float(singular_values[0]) * longest_side * torch.finfo(torch.float32).eps
    return int((singular_values > tol).sum())


def _choose_rank(
    singular_values: torch.Tensor, longest_side: int, rank: int | None, energy: float | None
) -> int:
    """The rank to keep: ``rank`` and/or the smallest keeping ``energy`` of ΣS², capped at the numerical rank."""
    full = _numerical_rank(singular_values, longest_side)
    if full == 0:
        return 0
    chosen = full if rank is None else min(rank, full)
    if energy is not None:
        power = singular_values[:full].double().square().cumsum(0)
        kept = power / power[-1]  # kept[-1] == 1 exactly
        needed = int(torch.searchsorted(kept, torch.tensor([float(energy)], dtype=kept.dtype))[0]) + 1
        chosen = min(chosen, needed, full)
    return chosen


def factorize(delta_w: torch.Tensor, rank: int | None = None, energy: float | None = None) -> LoraFactors:
    """Truncated-SVD LoRA factors of one linear (out, in) or conv (out, in, k, k) weight ΔW.

    The SVD runs in float32 on the tensor's device.

    Args:
        delta_w: The weight change.
        rank: Keep at most this many singular values.
        energy: Keep the smallest rank whose singular values hold this fraction of ΣS² (in (0, 1]).
            With both, the smaller rank wins. Either way the rank is capped at the numerical rank
            (singular values above float32 round-off, at most min(out, in·k·k)).

    Returns:
        :class:`LoraFactors` (float32).

    Raises:
        ConfigError: For a bad ``rank`` / ``energy``, or a tensor that is neither 2-D nor 4-D.
    """
    _check_rank_choice(rank, energy)
    if delta_w.ndim not in (2, 4):
        raise ConfigError(
            f"Only 2-D (linear) and 4-D (conv) weights have LoRA factors, got shape {tuple(delta_w.shape)}."
        )
    matrix = delta_w.detach().float().reshape(delta_w.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = _choose_rank(s, max(matrix.shape), rank, energy)
    root = s[:r].sqrt()
    up, down = u[:, :r] * root, root[:, None] * vh[:r]
    norm = float(torch.linalg.matrix_norm(matrix))
    error = float(torch.linalg.matrix_norm(matrix - up @ down)) / norm if norm > 0 else 0.0
    if delta_w.ndim == 4:
        up, down = up.reshape(up.shape[0], r, 1, 1), down.reshape(r, *delta_w.shape[1:])
    return LoraFactors(up=up, down=down, rank=r, relative_error=error, singular_values=s)


# --------------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------------


def _module_and_suffix(key: str) -> tuple[str, str]:
    module, _, suffix = key.rpartition(".")
    return module, suffix


def kohya_name(module: str) -> str:
    """The kohya / ComfyUI / A1111 name of a diffusers UNet module: ``lora_unet_`` + path with ``.`` -> ``_``.

    Example: ``down_blocks.0.attentions.0.proj_in`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in``.
    """
    return _KOHYA_PREFIX + module.replace(".", "_")


def _spatial_delta(delta: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """The spatial UNet entries of a ΔW and the number of motion keys left out, after checking every key."""
    spatial = {k: v for k, v in delta.items() if not is_motion_key(k)}
    for key in spatial:
        module, suffix = _module_and_suffix(key)
        if key.split(".", 1)[0] not in UNET_TOP_LEVEL or not module or suffix not in ("weight", "bias"):
            raise ConfigError(
                f"ΔW key {key!r} is not a diffusers UNet2DConditionModel parameter "
                f"(expected '<{'|'.join(UNET_TOP_LEVEL)}>....weight' or '.bias')."
            )
    if not spatial:
        raise ConfigError(f"The ΔW has no spatial UNet keys ({len(delta)} keys, all motion-module or none).")
    _check_kohya_names_unique(spatial)
    return spatial, len(delta) - len(spatial)


def _check_kohya_names_unique(spatial: Mapping[str, torch.Tensor]) -> None:
    seen: dict[str, str] = {}
    for key in spatial:
        module, suffix = _module_and_suffix(key)
        name = f"{kohya_name(module)}.{suffix}"
        if name in seen:
            raise ConfigError(f"ΔW keys {seen[name]!r} and {key!r} have the same kohya name {name!r}.")
        seen[name] = key


def _is_lora_target(key: str, value: torch.Tensor) -> bool:
    return key.endswith(".weight") and value.ndim in (2, 4) and key not in _EMBEDDING_KEYS


def lora_target_keys(delta: Mapping[str, torch.Tensor]) -> list[str]:
    """The ΔW keys that get LoRA factors: every spatial linear or conv weight (2-D or 4-D ``.weight``).

    That is every linear and conv layer of the UNet — attention to_q/k/v/out.0, proj_in/out, ff, resnet
    conv1/conv2/conv_shortcut/time_emb_proj, down/upsamplers, time (and added) embeddings, conv_in/out —
    which is what diffusers' ``load_lora_weights`` (PEFT injects into any nn.Linear / nn.Conv2d), ComfyUI
    and A1111 accept. Biases, norms and nn.Embedding tables are not targets.

    Raises:
        ConfigError: If a key is not a UNet parameter, or the ΔW has no spatial key.
    """
    spatial, _ = _spatial_delta(delta)
    return [k for k, v in spatial.items() if _is_lora_target(k, v)]


# --------------------------------------------------------------------------------------------------
# LoRA export
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerFit:
    """How well one layer's LoRA reproduces its ΔW.

    Attributes:
        key: The ΔW key (``<module>.weight``).
        shape: The weight's shape.
        rank: Rank kept (0: the ΔW is zero and nothing was written).
        relative_error: ‖ΔW − LoRA‖_F / ‖ΔW‖_F (before the cast to the file's dtype).
        norm: ‖ΔW‖_F.
    """

    key: str
    shape: tuple[int, ...]
    rank: int
    relative_error: float
    norm: float


@dataclass(frozen=True)
class LoraExportReport:
    """What a LoRA export wrote and what it lost.

    Attributes:
        path: The file written.
        layers: One :class:`LayerFit` per LoRA'd weight, in ΔW order.
        dropped: Spatial keys with no LoRA form (biases, norms, embeddings), not in the file.
        dropped_share: ‖dropped part‖_F / ‖spatial ΔW‖_F.
        relative_error: ‖spatial ΔW − what the LoRA adds‖_F / ‖spatial ΔW‖_F, dropped part included.
        motion_keys_skipped: Motion-module keys of the ΔW left out.
        alpha: The kohya ``.alpha`` (one value for every module); None for the PEFT format (scale 1).
        file_bytes: Size of the file.
    """

    path: str
    layers: tuple[LayerFit, ...]
    dropped: tuple[str, ...]
    dropped_share: float
    relative_error: float
    motion_keys_skipped: int
    alpha: float | None
    file_bytes: int


def _factorize_all(
    spatial: Mapping[str, torch.Tensor], rank: int | None, energy: float | None
) -> tuple[dict[str, LoraFactors], list[str]]:
    factors = {k: factorize(v, rank, energy) for k, v in spatial.items() if _is_lora_target(k, v)}
    return factors, [k for k in spatial if k not in factors]


def _report(
    path: str,
    spatial: Mapping[str, torch.Tensor],
    factors: Mapping[str, LoraFactors],
    dropped: list[str],
    motion_skipped: int,
    alpha: float | None,
) -> LoraExportReport:
    norms = {k: float(torch.linalg.vector_norm(v.detach().float())) for k, v in spatial.items()}
    total_sq = sum(n * n for n in norms.values())
    dropped_sq = sum(norms[k] ** 2 for k in dropped)
    lost_sq = dropped_sq + sum((f.relative_error * norms[k]) ** 2 for k, f in factors.items())
    layers = tuple(
        LayerFit(k, tuple(spatial[k].shape), f.rank, f.relative_error, norms[k]) for k, f in factors.items()
    )
    return LoraExportReport(
        path=path,
        layers=layers,
        dropped=tuple(dropped),
        dropped_share=math.sqrt(dropped_sq / total_sq) if total_sq > 0 else 0.0,
        relative_error=math.sqrt(lost_sq / total_sq) if total_sq > 0 else 0.0,
        motion_keys_skipped=motion_skipped,
        alpha=alpha,
        file_bytes=os.path.getsize(path),
    )


def _log_dropped(dropped: list[str], motion_skipped: int, fmt: str) -> None:
    if dropped:
        logger.info(
            "%s LoRA: %d keys with no low-rank form (biases, norms) are not in the file.", fmt, len(dropped)
        )
    if motion_skipped:
        logger.info("%s LoRA: %d motion-module keys are left out (spatial UNet only).", fmt, motion_skipped)


def _peft_metadata(ranks: Mapping[str, int]) -> dict[str, str]:
    """diffusers' ``lora_adapter_metadata``: the LoraConfig of the ``unet`` adapter, alpha = rank everywhere."""
    common = Counter(ranks.values()).most_common(1)[0][0]
    # peft matches pattern keys as regexes against module names; anchor and escape them (diffusers uses "^").
    pattern = {f"^{re.escape(m)}": r for m, r in ranks.items() if r != common}
    config = {
        "r": common,
        "lora_alpha": common,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
    }
    packed = {f"unet.{k}": v for k, v in config.items()}
    return {**_MARKER, "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}


def export_lora_peft(
    delta: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    rank: int | None = None,
    energy: float | None = None,
    dtype: torch.dtype = torch.float16,
) -> LoraExportReport:
    """Write the spatial ΔW as a diffusers (PEFT-format) LoRA: ``pipe.load_lora_weights(path)`` reads it.

    Keys are ``unet.<module>.lora_A.weight`` (= down) and ``unet.<module>.lora_B.weight`` (= up). Every
    module's alpha equals its rank, so the LoRA scale is 1 and ``lora_B @ lora_A`` is the truncated ΔW;
    the header carries diffusers' ``lora_adapter_metadata`` (r, lora_alpha, rank_pattern, alpha_pattern,
    target_modules), which diffusers uses instead of guessing the config from the shapes. ComfyUI reads
    this format only partly (not the attention projections): give ComfyUI / A1111 the kohya file.

    Args:
        delta: The ΔW (diffusers UNet keys; motion keys are left out).
        path: Destination ``.safetensors`` file (written atomically).
        rank: Keep at most this rank per layer.
        energy: Keep the smallest rank holding this fraction of each layer's ΣS²; with ``rank``, the
            smaller rank wins.
        dtype: Dtype of the factors in the file.

    Returns:
        A :class:`LoraExportReport`.

    Raises:
        ConfigError: For a bad ``rank`` / ``energy``, a non-UNet key, no spatial key, or a ΔW whose
            LoRA'able weights are all zero.
    """
    _check_rank_choice(rank, energy)
    spatial, motion_skipped = _spatial_delta(delta)
    factors, dropped = _factorize_all(spatial, rank, energy)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for key, f in factors.items():
        if f.rank == 0:
            continue
        module = _module_and_suffix(key)[0]
        tensors[f"unet.{module}.lora_A.weight"] = f.down.to(dtype)
        tensors[f"unet.{module}.lora_B.weight"] = f.up.to(dtype)
        ranks[module] = f.rank
    _require_nonzero(ranks)
    write_safetensors_atomic(tensors, path, _peft_metadata(ranks))
    _log_dropped(dropped, motion_skipped, "PEFT")
    return _report(os.fspath(path), spatial, factors, dropped, motion_skipped, None)


def _require_nonzero(ranks: Mapping[str, int]) -> None:
    if not ranks:
        raise ConfigError("Every linear / conv weight of the ΔW is zero: the LoRA would be empty.")


def export_lora_kohya(
    delta: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    rank: int | None = None,
    energy: float | None = None,
    dtype: torch.dtype = torch.float16,
) -> LoraExportReport:
    """Write the spatial ΔW as a kohya LoRA, for ComfyUI's LoraLoader, A1111 and diffusers.

    Keys are ``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight`` and ``.alpha`` (a 0-d float32
    tensor); the loaders add ``alpha / rank · up @ down``. One alpha serves every module (the largest rank
    kept), and each module's factors are multiplied by ``sqrt(rank / alpha)`` so that the product is the
    truncated ΔW whatever the module's rank. (A single alpha also avoids diffusers' per-module alpha
    patterns, which its kohya converter names wrongly for attention layers, so they would be ignored.)

    The names are diffusers module names, as kohya's sd-scripts writes them for SD 1.x / 2.x. ComfyUI maps
    them for any UNet; A1111 and diffusers' kohya reader assume the SD 1.x layout, and diffusers drops
    SDXL's ``add_embedding`` layers from such a file (a warning is logged): for SDXL in diffusers use
    :func:`export_lora_peft`.

    Args:
        delta: The ΔW (diffusers UNet keys; motion keys are left out).
        path: Destination ``.safetensors`` file (written atomically).
        rank: Keep at most this rank per layer.
        energy: Keep the smallest rank holding this fraction of each layer's ΣS²; with ``rank``, the
            smaller rank wins.
        dtype: Dtype of the factors in the file.

    Returns:
        A :class:`LoraExportReport` (``alpha`` set).

    Raises:
        ConfigError: As :func:`export_lora_peft`.
    """
    _check_rank_choice(rank, energy)
    spatial, motion_skipped = _spatial_delta(delta)
    factors, dropped = _factorize_all(spatial, rank, energy)
    kept = {k: f for k, f in factors.items() if f.rank > 0}
    _require_nonzero(kept)
    alpha = float(max(f.rank for f in kept.values()))
    tensors: dict[str, torch.Tensor] = {}
    for key, f in kept.items():
        name = kohya_name(_module_and_suffix(key)[0])
        gain = math.sqrt(f.rank / alpha)
        tensors[f"{name}.lora_down.weight"] = (f.down * gain).to(dtype)
        tensors[f"{name}.lora_up.weight"] = (f.up * gain).to(dtype)
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    if any(k.startswith("add_embedding.") for k in kept):
        logger.warning(
            "kohya LoRA: diffusers' kohya reader drops the add_embedding layers (SDXL); use PEFT there."
        )
    dims = {f.rank for f in kept.values()}
    metadata = {
        **_MARKER,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dims.pop()) if len(dims) == 1 else "Dynamic",
        "ss_network_alpha": repr(alpha),
    }
    write_safetensors_atomic(tensors, path, metadata)
    _log_dropped(dropped, motion_skipped, "kohya")
    return _report(os.fspath(path), spatial, factors, dropped, motion_skipped, alpha)


# --------------------------------------------------------------------------------------------------
# exact patches
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiffExportReport:
    """What :func:`export_diff_patches` wrote.

    Attributes:
        path: The file written.
        num_weight_patches: ``.diff`` entries (weights, norm scales included).
        num_bias_patches: ``.diff_b`` entries.
        bias_without_weight: Modules with a ``.diff_b`` but no ``.diff``: ComfyUI applies those biases,
            A1111's ``network_full`` does not (it needs a ``.diff``).
        motion_keys_skipped: Motion-module keys of the ΔW left out.
        file_bytes: Size of the file.
    """

    path: str
    num_weight_patches: int
    num_bias_patches: int
    bias_without_weight: tuple[str, ...]
    motion_keys_skipped: int
    file_bytes: int


def export_diff_patches(
    delta: Mapping[str, torch.Tensor], path: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> DiffExportReport:
    """Write the spatial ΔW as exact full-weight patches: ``<kohya name>.diff`` and ``.diff_b``.

    ``<module>.weight`` becomes ``lora_unet_<module>.diff`` and ``<module>.bias`` becomes
    ``lora_unet_<module>.diff_b``, each with the parameter's own shape. ComfyUI (``comfy/lora.py``) and
    A1111 (``network_full.py``) add them to the weights unscaled (times the LoRA strength), norms
    included; in float32 (the default) the patch is the ΔW bit for bit.

    Args:
        delta: The ΔW (diffusers UNet keys; motion keys are left out).
        path: Destination ``.safetensors`` file (written atomically).
        dtype: Dtype of the patches in the file.

    Returns:
        A :class:`DiffExportReport`.

    Raises:
        ConfigError: For a non-UNet key or a ΔW with no spatial key.
    """
    spatial, motion_skipped = _spatial_delta(delta)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in spatial.items():
        module, suffix = _module_and_suffix(key)
        tensors[f"{kohya_name(module)}.{'diff' if suffix == 'weight' else 'diff_b'}"] = value.detach().to(
            dtype
        )
    modules_with_weight = {_module_and_suffix(k)[0] for k in spatial if k.endswith(".weight")}
    orphans = tuple(_module_and_suffix(k)[0] for k in spatial if k.endswith(".bias"))
    orphans = tuple(m for m in orphans if m not in modules_with_weight)
    if orphans:
        logger.warning(
            "%d bias patches have no weight patch; A1111 ignores them: %s", len(orphans), orphans[:3]
        )
    write_safetensors_atomic(tensors, path, _MARKER)
    num_weights = sum(1 for k in spatial if k.endswith(".weight"))
    return DiffExportReport(
        path=os.fspath(path),
        num_weight_patches=num_weights,
        num_bias_patches=len(spatial) - num_weights,
        bias_without_weight=orphans,
        motion_keys_skipped=motion_skipped,
        file_bytes=os.path.getsize(path),
    )


# --------------------------------------------------------------------------------------------------
# fidelity table
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankFidelity:
    """How a fixed-rank LoRA of a ΔW would do, without writing it.

    Attributes:
        rank: The rank asked for (each layer keeps min(rank, its own rank)).
        layer_ranks: Rank kept per LoRA'd key.
        layer_errors: ‖ΔW − LoRA‖_F / ‖ΔW‖_F per LoRA'd key (from the discarded singular values).
        lora_relative_error: The same over all LoRA'd weights together.
        relative_error: Over the whole spatial ΔW, the dropped 1-D part included.
        dropped_share: ‖dropped 1-D part‖_F / ‖spatial ΔW‖_F (the same for every rank).
        payload_bytes: Bytes of the factor tensors in ``dtype`` (the kohya file adds 4 bytes of alpha
            per layer, and either file a header of a few tens of kB).
    """

    rank: int
    layer_ranks: dict[str, int]
    layer_errors: dict[str, float]
    lora_relative_error: float
    relative_error: float
    dropped_share: float
    payload_bytes: int


def _tail_error(singular_values: torch.Tensor, rank: int) -> float:
    power = singular_values.double().square()
    total = float(power.sum())
    return math.sqrt(float(power[rank:].sum()) / total) if total > 0 else 0.0


def lora_fidelity(
    delta: Mapping[str, torch.Tensor], ranks: Sequence[int], dtype: torch.dtype = torch.float16
) -> dict[int, RankFidelity]:
    """Per-layer error and size of a LoRA of the spatial ΔW at several ranks (one SVD per layer).

    Args:
        delta: The ΔW (diffusers UNet keys; motion keys are left out).
        ranks: The ranks to evaluate (each >= 1).
        dtype: Dtype the size is counted in.

    Returns:
        ``{rank: RankFidelity}`` in the order given.

    Raises:
        ConfigError: For a rank < 1, a non-UNet key, or no spatial key.
    """
    for r in ranks:
        _check_rank_choice(r, None)
    spatial, _ = _spatial_delta(delta)
    targets = {
        k: v.detach().float().reshape(v.shape[0], -1) for k, v in spatial.items() if _is_lora_target(k, v)
    }
    values = {k: torch.linalg.svdvals(m) for k, m in targets.items()}
    sq = {k: float(torch.linalg.vector_norm(v.detach().float())) ** 2 for k, v in spatial.items()}
    element = torch.tensor([], dtype=dtype).element_size()
    return {r: _fidelity_at(r, targets, values, sq, element) for r in ranks}


def _fidelity_at(
    rank: int,
    targets: Mapping[str, torch.Tensor],
    values: Mapping[str, torch.Tensor],
    sq: Mapping[str, float],
    element: int,
) -> RankFidelity:
    """One row of :func:`lora_fidelity`: ``targets`` are the flattened weights, ``sq`` every key's ‖ΔW‖²."""
    kept = {k: _choose_rank(values[k], max(m.shape), rank, None) for k, m in targets.items()}
    errors = {k: _tail_error(values[k], kept[k]) for k in targets}
    total = sum(sq.values())
    lora_total = sum(sq[k] for k in targets)
    lost = sum((errors[k] ** 2) * sq[k] for k in targets)
    dropped = total - lora_total
    return RankFidelity(
        rank=rank,
        layer_ranks=kept,
        layer_errors=errors,
        lora_relative_error=math.sqrt(lost / lora_total) if lora_total > 0 else 0.0,
        relative_error=math.sqrt((lost + dropped) / total) if total > 0 else 0.0,
        dropped_share=math.sqrt(max(dropped, 0.0) / total) if total > 0 else 0.0,
        payload_bytes=sum(kept[k] * sum(m.shape) for k, m in targets.items()) * element,
    )
