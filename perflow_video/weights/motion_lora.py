"""A motion ΔW as a motion LoRA: truncated SVD of the motion attention projections, in two file layouts.

Only the eight attention projections of every motion transformer block are factored (``to_q``, ``to_k``,
``to_v``, ``to_out.0`` weight of ``attn1`` and ``attn2``), because those are all the published
AnimateDiff motion LoRAs carry and all either loader applies. Each ΔW matrix ``W`` (out × in) with SVD
``U S Vᵀ`` becomes ``up = U_k √S_k`` (out × k) and ``down = √S_k V_kᵀ`` (k × in), so ``up @ down`` is the
best rank-``k`` approximation of ``W`` in Frobenius norm (Eckart-Young). Everything else in the motion
ΔW (feed-forward, ``proj_in``/``proj_out``, norms, the ``to_out.0`` bias) is left out; the
:class:`MotionLoRAReport` says how much of the motion ΔW that and the truncation lose.

File layouts (both are plain safetensors; the readers were checked against their code):

* diffusers (``AnimateDiffPipeline.load_lora_weights``, the way it reads the published
  ``guoyww/animatediff-motion-lora-*``): ``key_style="diffusers_old"`` writes
  ``unet.<block>.motion_modules.<M>.transformer_blocks.<j>.attn<1|2>.processor.<to_q|to_k|to_v|to_out>_lora.<down|up>.weight``;
  the loader (``load_lora_adapter`` in ``diffusers/loaders/peft.py``) sees no ``lora_A`` in the first
  key and converts with ``convert_unet_state_dict_to_peft`` (``.processor.`` → ``.``,
  ``.to_out_lora.down`` → ``.to_out.0.lora_A`` …). ``key_style="peft"`` writes what that conversion
  produces, ``unet.<module>.<to_q|to_k|to_v|to_out.0>.lora_A.weight`` / ``.lora_B.weight``, which the
  loader takes as is. The file has no ``alpha`` entries, so the loader infers one ``r = lora_alpha``
  (scale 1) from the ranks; the installed diffusers (0.42.1) also keeps scale 1 for per-module ranks
  (its ``get_peft_kwargs`` mirrors the rank pattern into the alpha pattern), but older copies of
  ``get_peft_kwargs`` give every module ``lora_alpha`` = the first rank they see, which mis-scales
  the others — so by default every factor is zero-padded to the largest rank
  (``uniform_width=True``), which changes nothing in ``up @ down`` and loads at scale 1 everywhere.
* ComfyUI-AnimateDiff-Evolved (``load_motion_lora_as_patches`` in ``animatediff/model_injection.py``):
  ``<block>.motion_modules.<M>.temporal_transformer.transformer_blocks.<j>.attention_blocks.<0|1>.processor.<to_q|to_k|to_v|to_out>_lora.<down|up>.weight``
  — it keeps keys containing ``temporal``, drops ``processor.``, ``_lora``, ``down.``/``up.``, turns
  ``to_out.`` into ``to_out.0.``, and adds ``strength · (up @ down)`` to that motion-module weight
  (``mid_block`` entries are skipped for a motion module without a mid block).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from perflow_video.atomic_files import write_safetensors_atomic
from perflow_video.errors import ConfigError
from perflow_video.weights.animatediff_keys import diffusers_to_original, is_diffusers_motion_key
from perflow_video.weights.delta_weights import to_diffusers_layout

__all__ = [
    "DIFFUSERS_LORA_KEY_STYLES",
    "MOTION_LORA_PROJECTIONS",
    "LoRAFactors",
    "MotionLoRA",
    "MotionLoRAReport",
    "captured_share_by_rank",
    "export_motion_lora",
    "motion_delta_to_lora",
    "motion_lora_comfyui_state_dict",
    "motion_lora_diffusers_state_dict",
    "save_motion_lora_comfyui",
    "save_motion_lora_diffusers",
]

#: The projections of a motion attention block a motion LoRA covers (diffusers names).
MOTION_LORA_PROJECTIONS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
#: ``key_style`` values of the diffusers layout: the attention-processor names the published motion
#: LoRAs use, or the PEFT names diffusers converts them to.
DIFFUSERS_LORA_KEY_STYLES: tuple[str, ...] = ("diffusers_old", "peft")

# A diffusers motion attention projection weight: <...>.motion_modules.<M>.transformer_blocks.<j>.attn<1|2>.<proj>.weight
_PROJECTION_WEIGHT = re.compile(
    r"^(?P<attn>.+\.motion_modules\.\d+\.transformer_blocks\.\d+\.attn[12])\.(?P<proj>to_q|to_k|to_v|to_out\.0)\.weight$"
)
# Position tables are buffers, never trained; a ΔW entry for one is not part of the change.
_BUFFER_SUFFIXES = (".pos_embed.pe", ".pos_encoder.pe")
_DIFFUSERS_PREFIX = "unet"


def _lora_projection_name(proj: str) -> str:
    """``to_out.0`` -> ``to_out``: the name the attention-processor LoRA layouts use."""
    return "to_out" if proj == "to_out.0" else proj


@dataclass(frozen=True)
class LoRAFactors:
    """The truncated SVD of one ΔW matrix, split evenly between the two factors.

    Attributes:
        up: ``U_k √S_k`` (out × width).
        down: ``√S_k V_kᵀ`` (width × in). ``up @ down`` is the kept part of the ΔW.
        rank: Singular values kept (``k``); ``width`` may be larger, the extra columns/rows are zero.
        singular_values: The full spectrum of the ΔW matrix (float64, descending).
    """

    up: torch.Tensor
    down: torch.Tensor
    rank: int
    singular_values: torch.Tensor

    @property
    def width(self) -> int:
        """The LoRA rank as stored (the inner dimension of ``up @ down``)."""
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """``up @ down`` in float64: the part of the ΔW matrix this LoRA applies."""
        return self.up.double() @ self.down.double()


@dataclass(frozen=True)
class MotionLoRAReport:
    """How much of a motion ΔW a motion LoRA carries (Frobenius norms over all trainable motion keys).

    The kept part of each projection is orthogonal to what its truncation drops, and the projections
    are disjoint from the other motion keys, so
    ``motion_norm² = captured_norm² + truncation_norm² + uncovered_norm²``.

    Attributes:
        rank: The requested uniform rank (or rank cap with ``energy``), or None.
        energy: The requested per-matrix energy threshold, or None.
        ranks: Singular values kept per projection (diffusers module name); zero matrices are absent.
        motion_norm: ``‖ΔW‖_F`` over every motion key of the ΔW (position-table buffers excluded).
        attention_norm: ``‖ΔW‖_F`` over the covered projection weights (the most any rank can capture).
        captured_norm: ``‖LoRA‖_F``, the norm of what the LoRA applies.
        uncovered_keys: Motion keys the LoRA does not carry (ff, proj_in/proj_out, norms, biases).
    """

    rank: int | None
    energy: float | None
    ranks: Mapping[str, int]
    motion_norm: float
    attention_norm: float
    captured_norm: float
    uncovered_keys: tuple[str, ...] = field(default=())

    @property
    def captured_share(self) -> float:
        """``‖LoRA‖_F / ‖motion ΔW‖_F`` (1.0 when the LoRA is the whole motion ΔW)."""
        return self.captured_norm / self.motion_norm if self.motion_norm > 0 else 1.0

    @property
    def captured_energy_share(self) -> float:
        """``‖LoRA‖_F² / ‖motion ΔW‖_F²``: the share of the squared norm."""
        return self.captured_share**2

    @property
    def attention_share(self) -> float:
        """``‖attention projections of ΔW‖_F / ‖motion ΔW‖_F``: the ceiling of ``captured_share``."""
        return self.attention_norm / self.motion_norm if self.motion_norm > 0 else 1.0

    @property
    def truncation_norm(self) -> float:
        """``‖ΔW_attn − LoRA‖_F``: what the rank truncation drops from the covered projections."""
        return math.sqrt(max(self.attention_norm**2 - self.captured_norm**2, 0.0))

    @property
    def residual_norm(self) -> float:
        """``‖motion ΔW − LoRA‖_F``: everything of the motion ΔW the LoRA does not apply."""
        return math.sqrt(max(self.motion_norm**2 - self.captured_norm**2, 0.0))

    def summary(self) -> str:
        """One line for logs."""
        what = f"rank {self.rank}" if self.energy is None else f"energy {self.energy}"
        if self.energy is not None and self.rank is not None:
            what += f" (rank <= {self.rank})"
        kept = sorted(self.ranks.values())
        span = f"{kept[0]}..{kept[-1]}" if kept else "-"
        return (
            f"motion LoRA ({what}): {len(self.ranks)} projections, ranks {span}; captures "
            f"{self.captured_share:.1%} of ‖motion ΔW‖_F (attention projections hold "
            f"{self.attention_share:.1%}; {len(self.uncovered_keys)} other motion keys not carried)"
        )


@dataclass(frozen=True)
class MotionLoRA:
    """The factored motion attention projections of a motion ΔW.

    Attributes:
        factors: Per projection, keyed by its diffusers module name
            (``down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q``).
        report: What share of the motion ΔW the factors carry.
    """

    factors: Mapping[str, LoRAFactors]
    report: MotionLoRAReport

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """The ΔW the LoRA applies, keyed like the ΔW (``<module>.weight``), float32."""
        return {f"{module}.weight": f.delta().float() for module, f in self.factors.items()}


# --------------------------------------------------------------------------------------------------
# factoring
# --------------------------------------------------------------------------------------------------


def _check_rank_energy(rank: int | None, energy: float | None) -> None:
    if rank is None and energy is None:
        raise ConfigError("Give a LoRA 'rank' (an integer >= 1) or an 'energy' threshold in (0, 1].")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"'rank' must be an integer >= 1, got {rank!r}.")
    if energy is not None:
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not (0.0 < energy <= 1.0):
            raise ConfigError(f"'energy' must be a number in (0, 1], got {energy!r}.")


def _split_motion_delta(
    delta: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(projection weights keyed by module name, all other trainable motion entries) of a ΔW."""
    if not isinstance(delta, Mapping):
        raise ConfigError(f"'delta' must be a mapping of key -> tensor, got {type(delta).__name__}.")
    try:
        canonical = to_diffusers_layout(delta)
    except ValueError as err:
        raise ConfigError(f"'delta': {err}") from err
    motion = {
        k: v for k, v in canonical.items() if is_diffusers_motion_key(k) and not k.endswith(_BUFFER_SUFFIXES)
    }
    if not motion:
        raise ConfigError(
            f"'delta' has no motion-module keys (keys with 'motion_modules'; it has {len(delta)} keys, e.g. "
            f"{sorted(delta)[:3]}); a motion LoRA needs a ΔW that covers the motion modules."
        )
    projections: dict[str, torch.Tensor] = {}
    others: dict[str, torch.Tensor] = {}
    for key, value in motion.items():
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"'delta' entry {key!r} is a {type(value).__name__}, not a tensor.")
        if not bool(torch.isfinite(value).all()):
            raise ConfigError(f"'delta' entry {key!r} has non-finite values.")
        found = _PROJECTION_WEIGHT.match(key)
        if found is None:
            others[key] = value
            continue
        if value.ndim != 2:
            raise ConfigError(
                f"'delta' entry {key!r} should be a 2-D linear weight, has shape {tuple(value.shape)}."
            )
        projections[key[: -len(".weight")]] = value
    if not projections:
        raise ConfigError(
            "'delta' has motion keys but no motion attention projection weights "
            f"(…attn1/attn2.{{{','.join(MOTION_LORA_PROJECTIONS)}}}.weight); nothing to factor."
        )
    return projections, others


def _sq_norm(tensors: Iterable[torch.Tensor]) -> float:
    return float(sum(float(t.double().pow(2).sum()) for t in tensors))


def _energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest k with Σ_{i<k} s_i² >= energy · Σ s_i² (s descending, not all zero)."""
    cumulative = torch.cumsum(s.pow(2), 0)
    index = int(torch.searchsorted(cumulative, energy * cumulative[-1]).item())
    return min(index + 1, s.numel())


def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(matrix.detach().to("cpu", torch.float64), full_matrices=False)


def _factor(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, keep: int, width: int, dtype: torch.dtype
) -> LoRAFactors:
    root = s[:keep].sqrt()
    up = torch.zeros(u.shape[0], width, dtype=torch.float64)
    down = torch.zeros(width, vh.shape[1], dtype=torch.float64)
    up[:, :keep] = u[:, :keep] * root
    down[:keep] = root[:, None] * vh[:keep]
    return LoRAFactors(
        up=up.to(dtype).contiguous(), down=down.to(dtype).contiguous(), rank=keep, singular_values=s
    )


def motion_delta_to_lora(
    delta: Mapping[str, torch.Tensor],
    rank: int | None = None,
    energy: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> MotionLoRA:
    """Factor the motion attention projections of a ΔW by truncated SVD.

    Args:
        delta: A ΔW keyed like ``UNetMotionModel`` / ``MotionAdapter`` state dicts (original AnimateDiff
            motion keys are converted; spatial keys are ignored).
        rank: With ``energy`` None, every projection gets exactly this LoRA rank (its best rank-``rank``
            approximation; a matrix with fewer singular values is stored exactly, zero-padded to the same
            width so loaders that infer one rank for the file see one). With ``energy``, a cap.
        energy: Keep, per matrix, the fewest singular values whose squares reach this share of the
            matrix's squared Frobenius norm (ranks then differ between projections).
        dtype: Storage dtype of the factors (the SVD itself runs in float64).

    Returns:
        The factors and a :class:`MotionLoRAReport`. All-zero projections are left out.

    Raises:
        ConfigError: Neither or an invalid ``rank`` / ``energy``; a ΔW without motion keys, without motion
            attention projections, with only zero projections, or with a malformed entry (the message names
            the argument or key).
    """
    _check_rank_energy(rank, energy)
    projections, others = _split_motion_delta(delta)
    factors: dict[str, LoRAFactors] = {}
    for module in sorted(projections):
        u, s, vh = _svd(projections[module])
        if not bool((s > 0).any()):
            continue
        if energy is None:
            assert rank is not None
            keep, width = min(rank, s.numel()), rank
        else:
            keep = _energy_rank(s, energy)
            keep = min(keep, rank) if rank is not None else keep
            width = keep
        factors[module] = _factor(u, s, vh, keep, width, dtype)
    if not factors:
        raise ConfigError(
            "'delta': every motion attention projection of the ΔW is zero; there is no motion LoRA."
        )
    report = MotionLoRAReport(
        rank=rank,
        energy=energy,
        ranks={m: f.rank for m, f in factors.items()},
        motion_norm=math.sqrt(_sq_norm(projections.values()) + _sq_norm(others.values())),
        attention_norm=math.sqrt(_sq_norm(projections.values())),
        captured_norm=math.sqrt(
            sum(float(f.singular_values[: f.rank].pow(2).sum()) for f in factors.values())
        ),
        uncovered_keys=tuple(sorted(others)),
    )
    return MotionLoRA(factors=factors, report=report)


def captured_share_by_rank(
    delta: Mapping[str, torch.Tensor], ranks: Iterable[int]
) -> dict[int, MotionLoRAReport]:
    """The report of a uniform-rank motion LoRA for several ranks, from one SVD per projection.

    Args:
        delta: As for :func:`motion_delta_to_lora`.
        ranks: LoRA ranks to evaluate (each an integer >= 1).

    Returns:
        ``{rank: MotionLoRAReport}`` in the order given; ``report.captured_share`` is the measured share of
        ``‖motion ΔW‖_F`` a rank-``rank`` motion LoRA applies.

    Raises:
        ConfigError: As :func:`motion_delta_to_lora`, for the ΔW and for each rank.
    """
    ranks = list(ranks)
    if not ranks:
        raise ConfigError("'ranks' is empty; give at least one LoRA rank.")
    for r in ranks:
        _check_rank_energy(r, None)
    projections, others = _split_motion_delta(delta)
    spectra = {m: torch.linalg.svdvals(w.detach().to("cpu", torch.float64)) for m, w in projections.items()}
    spectra = {m: s for m, s in spectra.items() if bool((s > 0).any())}
    if not spectra:
        raise ConfigError(
            "'delta': every motion attention projection of the ΔW is zero; there is no motion LoRA."
        )
    attention_sq = _sq_norm(projections.values())
    motion_norm = math.sqrt(attention_sq + _sq_norm(others.values()))
    out: dict[int, MotionLoRAReport] = {}
    for r in ranks:
        kept = {m: min(r, s.numel()) for m, s in spectra.items()}
        out[r] = MotionLoRAReport(
            rank=r,
            energy=None,
            ranks=kept,
            motion_norm=motion_norm,
            attention_norm=math.sqrt(attention_sq),
            captured_norm=math.sqrt(sum(float(s[: kept[m]].pow(2).sum()) for m, s in spectra.items())),
            uncovered_keys=tuple(sorted(others)),
        )
    return out


# --------------------------------------------------------------------------------------------------
# file layouts
# --------------------------------------------------------------------------------------------------


def _split_module(module: str) -> tuple[str, str]:
    """``<attn path>.<proj>`` -> (attn path, proj) for a diffusers projection module name."""
    found = _PROJECTION_WEIGHT.match(f"{module}.weight")
    if found is None:  # factors built here always match; a hand-made MotionLoRA may not
        raise ConfigError(
            f"{module!r} is not a motion attention projection (…attn1/attn2.<to_q|to_k|to_v|to_out.0>)."
        )
    return found["attn"], found["proj"]


def _pad(f: LoRAFactors, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) zero-padded to ``width`` columns / rows (``up @ down`` unchanged)."""
    extra = width - f.width
    if extra <= 0:
        return f.up, f.down
    up = torch.cat([f.up, f.up.new_zeros(f.up.shape[0], extra)], dim=1)
    down = torch.cat([f.down, f.down.new_zeros(extra, f.down.shape[1])], dim=0)
    return up, down


def motion_lora_diffusers_state_dict(
    lora: MotionLoRA, key_style: str = "diffusers_old", uniform_width: bool = True
) -> dict[str, torch.Tensor]:
    """The motion LoRA keyed for ``AnimateDiffPipeline.load_lora_weights`` (diffusers + PEFT).

    Args:
        lora: From :func:`motion_delta_to_lora`.
        key_style: ``"diffusers_old"`` —
            ``unet.<attn>.processor.<to_q|to_k|to_v|to_out>_lora.<down|up>.weight``, the layout of the
            published ``guoyww/animatediff-motion-lora-*`` files; or ``"peft"`` —
            ``unet.<attn>.<to_q|to_k|to_v|to_out.0>.lora_<A|B>.weight``, what diffusers converts them to.
        uniform_width: Zero-pad every factor to the largest LoRA rank of the file, so loaders that infer a
            single alpha per file (older diffusers ``get_peft_kwargs``) apply each at scale 1. False stores
            each projection at its own rank (smaller; exact with the installed diffusers 0.42.1).

    Returns:
        Tensors keyed in that layout (down/A = ``√S Vᵀ``, up/B = ``U √S``); no alphas (scale 1).

    Raises:
        ConfigError: For an unknown ``key_style``.
    """
    if key_style not in DIFFUSERS_LORA_KEY_STYLES:
        raise ConfigError(f"'key_style' must be one of {DIFFUSERS_LORA_KEY_STYLES}, got {key_style!r}.")
    width = max(f.width for f in lora.factors.values()) if uniform_width else 0
    out: dict[str, torch.Tensor] = {}
    for module, f in lora.factors.items():
        attn, proj = _split_module(module)
        up, down = _pad(f, width)
        if key_style == "peft":
            stem = f"{_DIFFUSERS_PREFIX}.{attn}.{proj}"
            out[f"{stem}.lora_A.weight"] = down
            out[f"{stem}.lora_B.weight"] = up
        else:
            stem = f"{_DIFFUSERS_PREFIX}.{attn}.processor.{_lora_projection_name(proj)}_lora"
            out[f"{stem}.down.weight"] = down
            out[f"{stem}.up.weight"] = up
    return out


def motion_lora_comfyui_state_dict(lora: MotionLoRA) -> dict[str, torch.Tensor]:
    """The motion LoRA keyed for ComfyUI-AnimateDiff-Evolved's motion-LoRA loader.

    Args:
        lora: From :func:`motion_delta_to_lora`.

    Returns:
        Tensors keyed
        ``<block>.motion_modules.<M>.temporal_transformer.transformer_blocks.<j>.attention_blocks.<0|1>.processor.<to_q|to_k|to_v|to_out>_lora.<down|up>.weight``;
        the loader adds ``up @ down`` to ``….attention_blocks.<0|1>.<to_q|to_k|to_v|to_out.0>.weight``.
    """
    out: dict[str, torch.Tensor] = {}
    for module, f in lora.factors.items():
        attn, proj = _split_module(module)
        (original_weight,) = diffusers_to_original({f"{module}.weight": f.down})
        original_attn = original_weight[: -len(f".{proj}.weight")]
        stem = f"{original_attn}.processor.{_lora_projection_name(proj)}_lora"
        out[f"{stem}.down.weight"] = f.down
        out[f"{stem}.up.weight"] = f.up
    return out


def _file_metadata(lora: MotionLoRA, layout: str, metadata: Mapping[str, str] | None) -> dict[str, str]:
    report = lora.report
    out = {
        "format": "pt",
        "perflow_video_motion_lora": layout,
        "captured_share": f"{report.captured_share:.6f}",
    }
    if report.rank is not None:
        out["rank"] = str(report.rank)
    if report.energy is not None:
        out["energy"] = repr(report.energy)
    out.update(metadata or {})
    return out


def save_motion_lora_diffusers(
    lora: MotionLoRA,
    path: str | os.PathLike[str],
    key_style: str = "diffusers_old",
    metadata: Mapping[str, str] | None = None,
    uniform_width: bool = True,
) -> dict[str, torch.Tensor]:
    """Write :func:`motion_lora_diffusers_state_dict` atomically as a safetensors file.

    ``pipe.load_lora_weights(path)`` (an ``AnimateDiffPipeline``) then applies it; ``pipe.fuse_lora()``
    folds it into the motion attention projections.

    Args:
        lora: From :func:`motion_delta_to_lora`.
        path: Destination ``.safetensors`` file.
        key_style: See :func:`motion_lora_diffusers_state_dict`.
        metadata: Extra safetensors string metadata.
        uniform_width: See :func:`motion_lora_diffusers_state_dict`.

    Returns:
        The tensors written.
    """
    state = motion_lora_diffusers_state_dict(lora, key_style, uniform_width)
    write_safetensors_atomic(state, path, _file_metadata(lora, f"diffusers:{key_style}", metadata))
    return state


def save_motion_lora_comfyui(
    lora: MotionLoRA, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Write :func:`motion_lora_comfyui_state_dict` atomically as a safetensors file (for
    ``ComfyUI/models/animatediff_motion_lora/``).

    Args:
        lora: From :func:`motion_delta_to_lora`.
        path: Destination ``.safetensors`` file.
        metadata: Extra safetensors string metadata.

    Returns:
        The tensors written.
    """
    state = motion_lora_comfyui_state_dict(lora)
    write_safetensors_atomic(state, path, _file_metadata(lora, "comfyui_animatediff_evolved", metadata))
    return state


def export_motion_lora(
    delta: Mapping[str, torch.Tensor],
    *,
    diffusers_path: str | os.PathLike[str] | None = None,
    comfyui_path: str | os.PathLike[str] | None = None,
    rank: int | None = None,
    energy: float | None = None,
    key_style: str = "diffusers_old",
    uniform_width: bool = True,
    dtype: torch.dtype = torch.float32,
) -> MotionLoRAReport:
    """Factor a motion ΔW and write it in the diffusers and/or the ComfyUI layout.

    Args:
        delta: As for :func:`motion_delta_to_lora`.
        diffusers_path: Where to write the diffusers-layout file, or None.
        comfyui_path: Where to write the ComfyUI-AnimateDiff-Evolved-layout file, or None.
        rank: See :func:`motion_delta_to_lora`.
        energy: See :func:`motion_delta_to_lora`.
        key_style: See :func:`motion_lora_diffusers_state_dict`.
        uniform_width: See :func:`motion_lora_diffusers_state_dict`.
        dtype: Storage dtype of the factors.

    Returns:
        The report of what the LoRA captures.

    Raises:
        ConfigError: No destination given, or as :func:`motion_delta_to_lora`.
    """
    if diffusers_path is None and comfyui_path is None:
        raise ConfigError("Give 'diffusers_path' and/or 'comfyui_path' to write the motion LoRA to.")
    if key_style not in DIFFUSERS_LORA_KEY_STYLES:
        raise ConfigError(f"'key_style' must be one of {DIFFUSERS_LORA_KEY_STYLES}, got {key_style!r}.")
    lora = motion_delta_to_lora(delta, rank=rank, energy=energy, dtype=dtype)
    if diffusers_path is not None:
        save_motion_lora_diffusers(lora, diffusers_path, key_style, uniform_width=uniform_width)
    if comfyui_path is not None:
        save_motion_lora_comfyui(lora, comfyui_path)
    return lora.report
