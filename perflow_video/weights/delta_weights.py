"""The PeRFlow weight change ΔW = W_student − W_teacher: compute, save, load, apply, convert.

A ΔW is a plain ``dict[str, Tensor]``. Its canonical layout is diffusers' ``UNetMotionModel`` (for
SD families: ``UNet2DConditionModel``, a subset): spatial UNet keys as in ``UNet2DConditionModel``,
motion keys containing ``motion_modules`` exactly as in ``MotionAdapter`` (diffusers uses the same
motion key names in both). :func:`delta_to_layout` splits or renames it for the files users load;
:func:`apply_delta_weights` also takes a ΔW in the original AnimateDiff motion-module layout.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from perflow_video._version import __version__
from perflow_video.atomic_files import write_safetensors_atomic
from perflow_video.family_names import FAMILY_NAMES
from perflow_video.method.parameterization import PREDICTION_TYPES
from perflow_video.weights.animatediff_keys import (
    diffusers_to_original,
    is_diffusers_motion_key,
    is_original_motion_key,
    original_to_diffusers,
)

__all__ = [
    "FAMILIES",
    "LAYOUTS",
    "ApplyReport",
    "DeltaMetadata",
    "apply_delta_weights",
    "compute_delta_weights",
    "delta_to_layout",
    "is_motion_key",
    "load_delta_weights",
    "save_delta_weights",
    "to_diffusers_layout",
    "trainable_parameter_names",
]

logger = logging.getLogger(__name__)

FAMILIES = FAMILY_NAMES  # the names ΔW metadata may carry (perflow_video.family_names)
PARAMETERIZATIONS = PREDICTION_TYPES  # perflow_video.method.parameterization
CFG_MODES = ("sync", "fixed")
LAYOUTS = ("diffusers_unet", "diffusers_unet_motion", "motion_adapter", "animatediff_original")

# Buffers that are state-dict entries but never trained: the motion modules' sinusoidal position
# tables. A ΔW entry for them would be zero at best and would break loading into a module built
# with another max sequence length.
_NON_TRAINABLE_SUFFIXES = (".pos_embed.pe", ".pos_encoder.pe")

# Marks a safetensors file as written by save_delta_weights; the value is the metadata schema version.
_MARKER_KEY = "perflow_video_delta"
_MARKER_VERSION = "1"


def is_motion_key(key: str) -> bool:
    """Whether ``key`` belongs to a motion module (diffusers or original AnimateDiff layout).

    Args:
        key: A state-dict key.

    Returns:
        True if the key names a motion-module tensor.
    """
    return is_diffusers_motion_key(key) or is_original_motion_key(key)


def _is_non_trainable(key: str) -> bool:
    return key.endswith(_NON_TRAINABLE_SUFFIXES)


# --------------------------------------------------------------------------------------------------
# compute
# --------------------------------------------------------------------------------------------------


def trainable_parameter_names(module: torch.nn.Module) -> list[str]:
    """Names of the parameters of ``module`` that require grad, for ``compute_delta_weights``.

    Args:
        module: The student model as configured for training (frozen parts have requires_grad=False).

    Returns:
        Parameter names in ``named_parameters`` order.
    """
    return [name for name, param in module.named_parameters() if param.requires_grad]


def compute_delta_weights(
    student: Mapping[str, torch.Tensor],
    teacher: Mapping[str, torch.Tensor],
    trainable_keys: Iterable[str] | None,
) -> dict[str, torch.Tensor]:
    """ΔW = W_student − W_teacher, key by key, in float32 on the CPU.

    Args:
        student: Student state dict.
        teacher: Teacher state dict (the weights the student was initialised from).
        trainable_keys: Keys that trained (e.g. :func:`trainable_parameter_names` of the student);
            only these are included. None means every key of ``student``, in which case both dicts
            must have the same keys. Non-trainable buffers (``pos_embed.pe``) are always left out.

    Returns:
        The differences as contiguous float32 CPU tensors.

    Raises:
        KeyError: If a key is missing from the student or the teacher; the message names it.
        ValueError: If a key has different shapes in the two dicts, or nothing is left to diff.
    """
    if trainable_keys is None:
        missing_in_teacher = sorted(set(student) - set(teacher))
        missing_in_student = sorted(set(teacher) - set(student))
        if missing_in_teacher:
            raise KeyError(
                f"Teacher has no {missing_in_teacher[0]!r} ({len(missing_in_teacher)} keys missing)."
            )
        if missing_in_student:
            raise KeyError(
                f"Student has no {missing_in_student[0]!r} ({len(missing_in_student)} keys missing)."
            )
        keys = list(student)
    else:
        keys = list(dict.fromkeys(trainable_keys))  # de-duplicate, keep order
    delta: dict[str, torch.Tensor] = {}
    for key in keys:
        if _is_non_trainable(key):
            continue
        if key not in student:
            raise KeyError(f"Trainable key {key!r} is not in the student state dict.")
        if key not in teacher:
            raise KeyError(f"Trainable key {key!r} is not in the teacher state dict.")
        s, t = student[key], teacher[key]
        if s.shape != t.shape:
            raise ValueError(
                f"Shape mismatch for {key!r}: student {tuple(s.shape)} vs teacher {tuple(t.shape)}."
            )
        # Difference in float32 so a bf16/fp16 student does not lose the (small) update to rounding.
        delta[key] = (s.detach().to("cpu", torch.float32) - t.detach().to("cpu", torch.float32)).contiguous()
    if not delta:
        raise ValueError("No trainable weights to diff: the ΔW would be empty.")
    return delta


# --------------------------------------------------------------------------------------------------
# metadata, save, load
# --------------------------------------------------------------------------------------------------


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"DeltaMetadata.{name} must be one of {choices}, got {value!r}.")


@dataclass(frozen=True)
class DeltaMetadata:
    """What a ΔW file says about itself, stored as safetensors string metadata.

    Attributes:
        family: Model family: "animatediff", "sd15", "sd21" or "sdxl".
        base_model: The teacher the ΔW applies to (hub id or path).
        parameterization: "ddim_eps", "diff_eps" or "velocity" — what the scheduler must be told.
        num_time_windows: K, the number of PeRFlow time windows.
        cfg_mode: "sync" or "fixed" (how the teacher was guided during training).
        cfg_scale: The teacher's guidance scale in "fixed" mode (1.0 for "sync").
        layout: Key layout of the file: one of :data:`LAYOUTS`.
        resolved_config: The full training config as a JSON string.
        version: perflow_video version that wrote the file.
    """

    family: str
    base_model: str
    parameterization: str
    num_time_windows: int
    cfg_mode: str
    cfg_scale: float
    layout: str
    resolved_config: str = "{}"
    version: str = field(default=__version__)

    def __post_init__(self) -> None:
        _check_choice("family", self.family, FAMILIES)
        _check_choice("parameterization", self.parameterization, PARAMETERIZATIONS)
        _check_choice("cfg_mode", self.cfg_mode, CFG_MODES)
        _check_choice("layout", self.layout, LAYOUTS)
        if isinstance(self.num_time_windows, bool) or not isinstance(self.num_time_windows, int):
            raise TypeError(f"DeltaMetadata.num_time_windows must be an int, got {self.num_time_windows!r}.")
        if not isinstance(self.cfg_scale, (int, float)) or isinstance(self.cfg_scale, bool):
            raise TypeError(f"DeltaMetadata.cfg_scale must be a float, got {self.cfg_scale!r}.")
        if self.num_time_windows < 1:
            raise ValueError(f"DeltaMetadata.num_time_windows must be >= 1, got {self.num_time_windows}.")
        try:
            json.loads(self.resolved_config)
        except (TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"DeltaMetadata.resolved_config must be a JSON string: {err}") from err

    def to_safetensors_metadata(self) -> dict[str, str]:
        """The string dict stored in the file header (with the format marker)."""
        out = {k: str(v) for k, v in asdict(self).items()}
        out["cfg_scale"] = repr(float(self.cfg_scale))  # repr keeps every digit of the float
        out[_MARKER_KEY] = _MARKER_VERSION
        out["format"] = "pt"  # what transformers/diffusers tooling expects in a torch safetensors file
        return out

    @classmethod
    def from_safetensors_metadata(cls, metadata: Mapping[str, str] | None) -> DeltaMetadata | None:
        """Parse a file header; None when the file was not written by :func:`save_delta_weights`.

        Raises:
            ValueError: If the marker is present but a field is missing or malformed (names it).
        """
        if not metadata or _MARKER_KEY not in metadata:
            return None
        values: dict[str, object] = {}
        for f in fields(cls):
            if f.name not in metadata:
                raise ValueError(f"ΔW metadata lacks the field {f.name!r}.")
            raw = metadata[f.name]
            try:
                if f.name == "num_time_windows":
                    values[f.name] = int(raw)
                elif f.name == "cfg_scale":
                    values[f.name] = float(raw)
                else:
                    values[f.name] = raw
            except ValueError as err:
                raise ValueError(f"ΔW metadata field {f.name!r} is malformed: {raw!r}.") from err
        return cls(**values)  # type: ignore[arg-type]


def _check_layout(delta: Mapping[str, torch.Tensor], layout: str) -> None:
    """Refuse to label a ΔW with a layout its keys contradict (names the first offending key)."""
    for key in delta:
        original = is_original_motion_key(key)
        motion = original or is_diffusers_motion_key(key)
        wrong = (
            (layout == "animatediff_original" and not original)
            or (layout == "motion_adapter" and (original or not motion))
            or (layout == "diffusers_unet" and motion)
            or (layout == "diffusers_unet_motion" and original)
        )
        if wrong:
            raise ValueError(f"Key {key!r} does not belong in a ΔW with layout {layout!r}.")


def save_delta_weights(
    delta: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: DeltaMetadata
) -> None:
    """Save a ΔW as safetensors with its metadata, atomically.

    Args:
        delta: The ΔW, keyed in ``metadata.layout``.
        path: Destination ``.safetensors`` file.
        metadata: Description stored in the file header.

    Raises:
        ValueError: If ``delta`` is empty or a key contradicts ``metadata.layout`` (names the key).
    """
    if not delta:
        raise ValueError("Refusing to save an empty ΔW.")
    _check_layout(delta, metadata.layout)
    write_safetensors_atomic(delta, path, metadata.to_safetensors_metadata())


def load_delta_weights(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], DeltaMetadata | None]:
    """Load a ΔW file written by :func:`save_delta_weights` or by other tools.

    Files without our metadata load too — e.g. the released PeRFlow SD1.5 ΔW, a full diffusers UNet
    state dict of differences — and give ``None`` metadata.

    Args:
        path: A ``.safetensors`` file.

    Returns:
        The tensors as stored (dtype unchanged, CPU) and the metadata or None.
    """
    path = os.fspath(path)
    with safe_open(path, framework="pt") as fh:
        header = fh.metadata()
    return load_file(path), DeltaMetadata.from_safetensors_metadata(header)


# --------------------------------------------------------------------------------------------------
# layout conversion and apply
# --------------------------------------------------------------------------------------------------


def to_diffusers_layout(delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bring a ΔW into the ``UNetMotionModel`` layout, converting original AnimateDiff motion keys.

    Args:
        delta: A ΔW whose motion keys may be in the original AnimateDiff layout (detected per key);
            other keys pass through unchanged.

    Returns:
        A new dict in the diffusers layout. ``pos_encoder.pe`` entries are dropped (never trained).

    Raises:
        ValueError: If a converted key collides with a key already present (names it).
    """
    original = {k: v for k, v in delta.items() if is_original_motion_key(k)}
    out = {k: v for k, v in delta.items() if k not in original}
    for key, value in original_to_diffusers(original).items():
        if key in out:
            raise ValueError(f"ΔW has {key!r} both in the diffusers and in the original AnimateDiff layout.")
        out[key] = value
    return out


def delta_to_layout(delta: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Convert a ΔW (``UNetMotionModel`` layout, or with original motion keys) into ``layout``.

    Layouts:
        - ``"diffusers_unet_motion"``: everything, loads into ``UNetMotionModel``.
        - ``"diffusers_unet"``: spatial keys only, loads into ``UNet2DConditionModel``.
        - ``"motion_adapter"``: motion keys only; in diffusers 0.42 ``MotionAdapter`` motion key
          names equal ``UNetMotionModel``'s, so they are kept as they are.
        - ``"animatediff_original"``: motion keys only, renamed to the original AnimateDiff layout
          (ComfyUI-AnimateDiff-Evolved, ``MotionAdapter.from_single_file``).

    Keys the target cannot hold are dropped (logged at INFO), so export both the spatial and a
    motion layout when both parts trained.

    Args:
        delta: The ΔW.
        layout: One of :data:`LAYOUTS`.

    Returns:
        A new dict; tensors are shared with ``delta``, not copied.

    Raises:
        ValueError: For an unknown layout, or when no key of ``delta`` fits it.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown ΔW layout {layout!r}; expected one of {LAYOUTS}.")
    canonical = to_diffusers_layout(delta)
    if layout == "diffusers_unet_motion":
        return canonical
    motion = {k: v for k, v in canonical.items() if is_diffusers_motion_key(k)}
    spatial = {k: v for k, v in canonical.items() if k not in motion}
    kept, dropped, what = (
        (spatial, motion, "spatial") if layout == "diffusers_unet" else (motion, spatial, "motion")
    )
    if not kept:
        raise ValueError(f"The ΔW has no {what} keys, so it has nothing to export in layout {layout!r}.")
    if dropped:
        logger.info("Layout %r keeps %d %s keys and drops %d others.", layout, len(kept), what, len(dropped))
    if layout == "animatediff_original":
        return diffusers_to_original(kept)
    return kept


@dataclass(frozen=True)
class ApplyReport:
    """What :func:`apply_delta_weights` did.

    Attributes:
        applied: Module parameter names that were updated.
        skipped: ΔW keys (diffusers layout) deliberately not applied, because the target holds no
            such part (motion keys on a ``UNet2DConditionModel``, spatial keys on a ``MotionAdapter``)
            or because they name a non-trainable buffer.
        unmatched: ΔW keys that matched nothing (only non-empty when ``strict=False``).
    """

    applied: tuple[str, ...]
    skipped: tuple[str, ...]
    unmatched: tuple[str, ...]

    @property
    def num_applied(self) -> int:
        return len(self.applied)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)


def _holds_parts(module: torch.nn.Module) -> tuple[bool, bool]:
    """(holds motion weights, holds spatial weights) of a module, judged from its own class and keys."""
    # Imported here so that loading/saving a ΔW does not pay for importing diffusers.
    from diffusers import MotionAdapter

    names = [name for name, _ in module.named_parameters()]
    has_motion = any(is_diffusers_motion_key(n) for n in names)
    # A MotionAdapter only ever receives motion weights; its optional conv_in (SparseCtrl) is not
    # part of an AnimateDiff UNet ΔW.
    has_spatial = not isinstance(module, MotionAdapter) and any(not is_diffusers_motion_key(n) for n in names)
    return has_motion, has_spatial


def _listed(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


@dataclass
class _Plan:
    """What applying a ΔW to a module would do, decided before any weight changes."""

    updates: list[tuple[str, torch.nn.Parameter, torch.Tensor]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key (module shape vs ΔW shape)"


def _plan(module: torch.nn.Module, canonical: Mapping[str, torch.Tensor]) -> _Plan:
    params = dict(module.named_parameters())
    buffers = {name for name, _ in module.named_buffers()}
    has_motion, has_spatial = _holds_parts(module)
    plan = _Plan()
    for key, value in canonical.items():
        motion = is_diffusers_motion_key(key)
        not_held = (motion and not has_motion) or (not motion and not has_spatial)
        if not_held or key in buffers or _is_non_trainable(key):
            plan.skipped.append(key)
        elif (param := params.get(key)) is None:
            plan.unmatched.append(key)
        elif param.shape != value.shape:
            plan.mismatched.append(f"{key} ({tuple(param.shape)} vs ΔW {tuple(value.shape)})")
        else:
            plan.updates.append((key, param, value))
    return plan


def _target_module(target) -> torch.nn.Module:
    """The module a ΔW goes into: the module itself, or a pipeline's ``unet`` (AnimateDiff: the
    ``UNetMotionModel`` that holds both the spatial weights and the motion modules)."""
    if isinstance(target, torch.nn.Module):
        return target
    unet = getattr(target, "unet", None)
    if isinstance(unet, torch.nn.Module):
        return unet
    raise TypeError(
        f"cannot apply a ΔW to a {type(target).__name__}: give a UNet, a MotionAdapter or a pipeline"
    )


def apply_delta_weights(
    module,
    delta: Mapping[str, torch.Tensor],
    alpha: float = 1.0,
    strict: bool = True,
) -> ApplyReport:
    """In place ``W += alpha * ΔW`` on a ``UNet2DConditionModel``, ``UNetMotionModel``, ``MotionAdapter``
    or a whole pipeline (its ``unet``).

    The ΔW is in the ``UNetMotionModel`` layout (an SD ΔW is the ``UNet2DConditionModel`` subset of
    it); original AnimateDiff motion keys are detected and converted. Motion keys (containing
    ``motion_modules``) go to the motion modules, the rest to the spatial UNet; a part the target does
    not hold is skipped and reported. The sum is taken in float32 and stored in each parameter's own
    dtype and device. Everything is checked before the first weight changes, so an error leaves the
    module untouched.

    Args:
        module: The model (or pipeline) to update.
        delta: The ΔW.
        alpha: Scale of the update (1.0 gives the student; other values interpolate/extrapolate).
        strict: If True, a key that matches no parameter of a part the target holds is an error.

    Returns:
        An :class:`ApplyReport`.

    Raises:
        KeyError: With ``strict``, for ΔW keys that match nothing (lists them).
        ValueError: For shape mismatches (lists every one: e.g. an SDXL ΔW into an SD1.5 UNet, a v2 motion
            ΔW into a v3 adapter), whatever ``strict``.
    """
    module = _target_module(module)
    plan = _plan(module, to_diffusers_layout(delta))
    name = type(module).__name__
    if plan.mismatched:
        raise ValueError(f"{len(plan.mismatched)} ΔW tensors do not fit {name}: {_listed(plan.mismatched)}.")
    if strict and plan.unmatched:
        raise KeyError(f"ΔW keys match no parameter of {name}: {_listed(plan.unmatched)}.")
    if plan.skipped:
        logger.info("Skipped %d ΔW keys that %s does not hold.", len(plan.skipped), name)
    with torch.no_grad():
        for _, param, value in plan.updates:
            updated = param.detach().float() + alpha * value.to(param.device, torch.float32)
            param.copy_(updated.to(param.dtype))
    return ApplyReport(
        applied=tuple(k for k, _, _ in plan.updates),
        skipped=tuple(plan.skipped),
        unmatched=tuple(plan.unmatched),
    )
