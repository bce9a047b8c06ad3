"""Key conversion between diffusers' motion-module names and the original AnimateDiff layout.

The original AnimateDiff layout (guoyww/AnimateDiff checkpoints, ComfyUI-AnimateDiff-Evolved, and what
``MotionAdapter.from_single_file`` reads) names one motion-module transformer like this::

    down_blocks.0.motion_modules.0.temporal_transformer.norm.weight
    down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight
    down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight
    down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe
    down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.norms.0.weight
    down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.ff_norm.weight
    down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.ff.net.0.proj.weight

diffusers (``MotionAdapter`` and ``UNetMotionModel``, which use identical motion key names) drops
``.temporal_transformer``, renames ``attention_blocks.{0,1}`` to ``attn{1,2}``, ``norms.{0,1}`` to
``norm{1,2}`` and ``ff_norm`` to ``norm3``, and keeps one sinusoidal ``pos_embed.pe`` buffer per
transformer block that it applies before both self-attentions, where the original has one
``pos_encoder.pe`` per attention block (same values).

The conversion here parses keys token by token instead of doing substring replacement, so that
``norm`` (the block's GroupNorm) is never confused with ``norm1`` and unknown names are rejected
with an error naming the key rather than passed through into a file no loader can read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

__all__ = [
    "diffusers_to_original",
    "export_motion_module_original",
    "is_diffusers_motion_key",
    "is_original_motion_key",
    "original_to_diffusers",
]

_MOTION = "motion_modules"
_TEMPORAL = "temporal_transformer"
# Sub-modules of a motion transformer that carry the same name in both layouts.
_SHARED_TRANSFORMER_CHILDREN = frozenset({"norm", "proj_in", "proj_out"})
_DIFFUSERS_TO_ORIGINAL_BLOCK_CHILD = {
    "attn1": ("attention_blocks", "0"),
    "attn2": ("attention_blocks", "1"),
    "norm1": ("norms", "0"),
    "norm2": ("norms", "1"),
    "norm3": ("ff_norm",),
    "ff": ("ff",),
}
_ORIGINAL_ATTENTION_TO_DIFFUSERS = {"0": "attn1", "1": "attn2"}
_ORIGINAL_NORM_TO_DIFFUSERS = {"0": "norm1", "1": "norm2"}


def _motion_index(parts: list[str]) -> int | None:
    """Position of the ``motion_modules`` token when it is followed by a module index, else None."""
    for i, part in enumerate(parts[:-1]):
        if part == _MOTION and parts[i + 1].isdigit() and i > 0:
            return i
    return None


def is_original_motion_key(key: str) -> bool:
    """Whether ``key`` names a motion-module tensor in the original AnimateDiff layout.

    Args:
        key: A state-dict key.

    Returns:
        True for keys of the form ``<block>.motion_modules.<M>.temporal_transformer.<...>``.
    """
    parts = key.split(".")
    i = _motion_index(parts)
    return i is not None and len(parts) > i + 3 and parts[i + 2] == _TEMPORAL


def is_diffusers_motion_key(key: str) -> bool:
    """Whether ``key`` names a motion-module tensor in the diffusers layout.

    Args:
        key: A state-dict key.

    Returns:
        True for keys of the form ``<block>.motion_modules.<M>.<...>`` without ``temporal_transformer``.
    """
    parts = key.split(".")
    i = _motion_index(parts)
    return i is not None and len(parts) > i + 2 and parts[i + 2] != _TEMPORAL


def _diffusers_block_rest_to_original(key: str, rest: list[str]) -> list[list[str]]:
    """Map the part of a diffusers key after ``transformer_blocks.<j>`` to original name tails.

    Returns a list because ``pos_embed.pe`` fans out to both attention blocks' ``pos_encoder.pe``.
    """
    if rest == ["pos_embed", "pe"]:
        return [
            ["attention_blocks", "0", "pos_encoder", "pe"],
            ["attention_blocks", "1", "pos_encoder", "pe"],
        ]
    if len(rest) >= 2 and rest[0] in _DIFFUSERS_TO_ORIGINAL_BLOCK_CHILD:
        return [[*_DIFFUSERS_TO_ORIGINAL_BLOCK_CHILD[rest[0]], *rest[1:]]]
    raise ValueError(
        f"Cannot convert {key!r} to the original AnimateDiff layout: unknown motion transformer-block "
        f"member {'.'.join(rest)!r} (expected attn1/attn2/norm1/norm2/norm3/ff/pos_embed.pe)."
    )


def diffusers_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename diffusers motion-module keys to the original AnimateDiff layout.

    ``pos_embed.pe`` (present in a module's full state dict, absent from a ΔW) becomes both
    ``attention_blocks.0.pos_encoder.pe`` and ``attention_blocks.1.pos_encoder.pe``; the second is a
    copy because safetensors refuses to store two names for one storage.

    Args:
        state: Tensors keyed by ``MotionAdapter`` / ``UNetMotionModel`` motion key names.

    Returns:
        A new dict keyed in the original layout; tensors are not copied except the duplicated ``pe``.

    Raises:
        ValueError: If a key is not a diffusers motion-module key or has a member this layout cannot
            express; the message names the key.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        i = _motion_index(parts)
        if i is None or not is_diffusers_motion_key(key):
            raise ValueError(
                f"{key!r} is not a diffusers motion-module key "
                "(expected '<block>.motion_modules.<M>.<...>'); filter spatial keys out before converting."
            )
        head = parts[: i + 2] + [_TEMPORAL]
        rest = parts[i + 2 :]
        if rest[0] in _SHARED_TRANSFORMER_CHILDREN:
            tails = [rest]
        elif rest[0] == "transformer_blocks" and len(rest) >= 4 and rest[1].isdigit():
            tails = [rest[:2] + t for t in _diffusers_block_rest_to_original(key, rest[2:])]
        else:
            raise ValueError(
                f"Cannot convert {key!r} to the original AnimateDiff layout: unknown member {rest[0]!r}."
            )
        for n, tail in enumerate(tails):
            new_key = ".".join(head + tail)
            if new_key in out:
                raise ValueError(f"Two keys map to {new_key!r} (the second is {key!r}).")
            out[new_key] = value if n == 0 else value.clone()
    return out


def _original_block_rest_to_diffusers(key: str, rest: list[str]) -> list[str] | None:
    """Map the part of an original key after ``transformer_blocks.<j>`` to a diffusers tail.

    Returns None for ``pos_encoder.pe`` (handled by the caller).
    """
    if len(rest) >= 3 and rest[0] == "attention_blocks" and rest[1] in _ORIGINAL_ATTENTION_TO_DIFFUSERS:
        if rest[2:] == ["pos_encoder", "pe"]:
            return None
        return [_ORIGINAL_ATTENTION_TO_DIFFUSERS[rest[1]], *rest[2:]]
    if len(rest) >= 3 and rest[0] == "norms" and rest[1] in _ORIGINAL_NORM_TO_DIFFUSERS:
        return [_ORIGINAL_NORM_TO_DIFFUSERS[rest[1]], *rest[2:]]
    if len(rest) >= 2 and rest[0] == "ff_norm":
        return ["norm3", *rest[1:]]
    if len(rest) >= 2 and rest[0] == "ff":
        return rest
    raise ValueError(
        f"Cannot convert {key!r} to the diffusers layout: unknown motion transformer-block member "
        f"{'.'.join(rest)!r} (diffusers supports attention_blocks.0/1, norms.0/1, ff_norm, ff)."
    )


def original_to_diffusers(
    state: Mapping[str, torch.Tensor], include_pos_embed: bool = False
) -> dict[str, torch.Tensor]:
    """Rename original AnimateDiff motion-module keys to diffusers' names.

    Args:
        state: Tensors keyed in the original layout (every key must contain ``temporal_transformer``).
        include_pos_embed: By default ``pos_encoder.pe`` is dropped, as diffusers' own loader does,
            because the buffer is a fixed sinusoid the module rebuilds (and v1 files store 24 positions
            where diffusers defaults to 32). With True, ``attention_blocks.0.pos_encoder.pe`` becomes
            ``pos_embed.pe`` (and ``attention_blocks.1``'s copy must be equal), which makes
            diffusers → original → diffusers the identity on a full state dict.

    Returns:
        A new dict keyed like ``MotionAdapter`` / ``UNetMotionModel`` motion keys.

    Raises:
        ValueError: If a key is not in the original layout, or the two ``pos_encoder.pe`` copies of
            one block differ while ``include_pos_embed`` is True; the message names the key.
    """
    out: dict[str, torch.Tensor] = {}
    pos_encoders: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for key, value in state.items():
        parts = key.split(".")
        if not is_original_motion_key(key):
            raise ValueError(
                f"{key!r} is not an original AnimateDiff motion-module key "
                "(expected '<block>.motion_modules.<M>.temporal_transformer.<...>')."
            )
        i = _motion_index(parts)
        assert i is not None  # guaranteed by is_original_motion_key
        head = parts[: i + 2]
        rest = parts[i + 3 :]
        if rest[0] in _SHARED_TRANSFORMER_CHILDREN:
            tail = rest
        elif rest[0] == "transformer_blocks" and len(rest) >= 4 and rest[1].isdigit():
            block_tail = _original_block_rest_to_diffusers(key, rest[2:])
            if block_tail is None:
                pe_key = ".".join(head + rest[:2] + ["pos_embed", "pe"])
                pos_encoders.setdefault(pe_key, []).append((key, value))
                continue
            tail = rest[:2] + block_tail
        else:
            raise ValueError(f"Cannot convert {key!r} to the diffusers layout: unknown member {rest[0]!r}.")
        new_key = ".".join(head + tail)
        if new_key in out:
            raise ValueError(f"Two keys map to {new_key!r} (the second is {key!r}).")
        out[new_key] = value
    if include_pos_embed:
        for pe_key, sources in pos_encoders.items():
            first_key, first = sorted(sources)[0]
            for other_key, other in sources:
                if other.shape != first.shape or not torch.equal(other, first):
                    raise ValueError(
                        f"{other_key!r} differs from {first_key!r}; diffusers keeps a single {pe_key!r}."
                    )
            out[pe_key] = first
    return out


def export_motion_module_original(
    unet_motion_or_adapter: torch.nn.Module,
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Write the full motion module of a model as an original-layout AnimateDiff safetensors file.

    The file loads with ``MotionAdapter.from_single_file`` and ComfyUI-AnimateDiff-Evolved: every key
    contains ``temporal``, a ``mid_block.`` key is present when the model has a motion mid block (how
    v2-style modules are recognised), and ``pos_encoder.pe`` [1, L, C] is included for both attention
    blocks — ComfyUI treats a file without them as AnimateLCM, and diffusers detects AnimateDiff by one.

    Args:
        unet_motion_or_adapter: A ``UNetMotionModel`` or ``MotionAdapter`` (any module whose state dict
            has diffusers motion-module keys); spatial keys are ignored.
        path: Destination ``.safetensors`` file; written atomically.
        metadata: Optional extra safetensors string metadata.

    Returns:
        The exported tensors (CPU, contiguous), keyed in the original layout.

    Raises:
        ValueError: If the module has no motion modules, or a motion transformer block has no
            ``pos_embed.pe`` buffer to export.
    """
    # Imported here because delta_weights imports this module for its layout conversions.
    from perflow_video.atomic_files import write_safetensors_atomic

    motion = {
        k: v.detach().to("cpu").contiguous()
        for k, v in unet_motion_or_adapter.state_dict().items()
        if is_diffusers_motion_key(k)
    }
    if not motion:
        raise ValueError(f"{type(unet_motion_or_adapter).__name__} has no motion-module keys to export.")
    original = diffusers_to_original(motion)
    for key in original:
        parts = key.split(".")
        if parts[-2:] == ["to_q", "weight"] and "attention_blocks" in parts:
            pe_key = ".".join(parts[:-2] + ["pos_encoder", "pe"])
            if pe_key not in original:
                raise ValueError(
                    f"No positional encoding for {key!r}: expected {pe_key!r}; without it ComfyUI would "
                    "load the file as AnimateLCM."
                )
    file_metadata = {"format": "pt"}
    file_metadata.update(metadata or {})
    write_safetensors_atomic(original, path, file_metadata)
    return original
