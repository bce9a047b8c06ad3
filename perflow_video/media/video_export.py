"""Write generated clips to GIF or MP4.

Accepted frame formats (everything else raises ``TypeError``/``ValueError`` naming what was given):

* ``torch.Tensor`` ``(F, C, H, W)`` or ``(C, F, H, W)``, float in ``[-1, 1]`` or ``[0, 1]`` (detected
  from the minimum unless ``value_range`` is given), or uint8; ``C`` is 1 or 3.
* ``numpy.ndarray`` ``(F, H, W, 3)`` uint8, or float in ``[0, 1]`` / ``[-1, 1]`` (diffusers' ``"np"``).
* A list of PIL images or of ``(H, W, 3)`` uint8 arrays, all the same size.

A layout is ambiguous when both of the first two dims are 1 or 3, e.g. ``(3, 3, H, W)``; it is then
read as ``(F, C, H, W)`` (diffusers' ``output_type="pt"`` per clip) unless ``layout="cfhw"``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Literal, get_args

import av
import numpy as np
import torch
from PIL import Image

ClipFormat = Literal["gif", "mp4"]  # the clip files this module writes
CLIP_FORMATS: tuple[str, ...] = get_args(ClipFormat)

LAYOUTS = ("fchw", "cfhw")


def to_uint8_frames(
    frames: torch.Tensor | np.ndarray | Sequence[Image.Image] | Sequence[np.ndarray],
    layout: str | None = None,
    value_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Converts any accepted clip format to uint8 RGB ``(F, H, W, 3)``.

    Args:
        frames: One clip (see the module docstring).
        layout: ``"fchw"`` or ``"cfhw"`` for 4-D tensors; ``None`` guesses from the channel dim.
        value_range: ``(-1, 1)`` or ``(0, 1)`` for float input; ``None`` means ``(-1, 1)`` if any value
            is negative, else ``(0, 1)``.

    Returns:
        uint8 ``(F, H, W, 3)``.
    """
    if isinstance(frames, (list, tuple)):
        return _from_list(frames)
    if isinstance(frames, torch.Tensor):
        if frames.ndim != 4:
            raise ValueError(
                "expected one clip as a 4-D tensor (F, C, H, W) or (C, F, H, W), "
                f"got shape {tuple(frames.shape)}"
                + ("; for a batch use export_videos" if frames.ndim == 5 else "")
            )
        x = frames.detach().to("cpu")
        x = x.permute(1, 0, 2, 3) if _tensor_layout(x.shape, layout) == "cfhw" else x
        arr = (
            x.permute(0, 2, 3, 1).float().numpy() if x.is_floating_point() else x.permute(0, 2, 3, 1).numpy()
        )
    elif isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] not in (1, 3):
            raise ValueError(f"expected a numpy clip (F, H, W, 3), got shape {frames.shape}")
        arr = frames
    else:
        raise TypeError(
            f"cannot export {type(frames).__name__}: give a torch tensor (F, C, H, W)/(C, F, H, W), "
            "a numpy array (F, H, W, 3) or a list of PIL images"
        )
    if arr.shape[0] == 0:
        raise ValueError("the clip has no frames")
    if arr.dtype == np.uint8:
        out = arr
    elif np.issubdtype(arr.dtype, np.floating):
        out = _float_to_uint8(arr, value_range)
    else:
        raise TypeError(f"frames must be uint8 or float, got dtype {arr.dtype}")
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return np.ascontiguousarray(out)


def _tensor_layout(shape: torch.Size, layout: str | None) -> str:
    if layout is not None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r}; choose one of {LAYOUTS}")
        channels = shape[1] if layout == "fchw" else shape[0]
        if channels not in (1, 3):
            raise ValueError(
                f"layout={layout!r} puts {channels} channels in shape {tuple(shape)}; need 1 or 3"
            )
        return layout
    if shape[1] in (1, 3):
        return "fchw"
    if shape[0] in (1, 3):
        return "cfhw"
    raise ValueError(f"no channel dim of size 1 or 3 in tensor shape {tuple(shape)}; expected (F, C, H, W)")


def _float_to_uint8(arr: np.ndarray, value_range: tuple[float, float] | None) -> np.ndarray:
    lo_seen, hi_seen = float(np.nanmin(arr)), float(np.nanmax(arr))
    if value_range is None:
        value_range = (-1.0, 1.0) if lo_seen < 0 else (0.0, 1.0)
    lo, hi = value_range
    if (lo, hi) not in ((-1.0, 1.0), (0.0, 1.0)):
        raise ValueError(f"value_range={value_range}; use (-1, 1) or (0, 1)")
    # A VAE decode overshoots a little; more than that means the caller passed 0..255 floats.
    slack = 0.5 * (hi - lo)
    if lo_seen < lo - slack or hi_seen > hi + slack:
        raise ValueError(
            f"float frames span [{lo_seen:.3g}, {hi_seen:.3g}], outside value_range {value_range}; "
            "scale them to [0, 1] or [-1, 1] (or pass uint8)"
        )
    unit = (np.nan_to_num(arr.astype(np.float32)) - lo) / (hi - lo)
    return (np.clip(unit, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _from_list(frames: Sequence) -> np.ndarray:
    if not frames:
        raise ValueError("the clip has no frames")
    arrays = []
    for i, f in enumerate(frames):
        if isinstance(f, Image.Image):
            arrays.append(np.asarray(f.convert("RGB")))
        elif isinstance(f, np.ndarray) and f.dtype == np.uint8 and f.ndim == 3 and f.shape[-1] == 3:
            arrays.append(f)
        else:
            raise TypeError(
                f"frame {i} is {type(f).__name__}; a list must hold PIL images or uint8 (H, W, 3)"
            )
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"frames differ in size: {sorted({a.shape for a in arrays})}")
    return np.stack(arrays)


def encode_video(
    frames: np.ndarray,
    path: str | os.PathLike,
    fps: float = 8,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    crf: int = 18,
    codec_options: dict[str, str] | None = None,
) -> Path:
    """Encodes uint8 ``(F, H, W, 3)`` frames with PyAV; the container follows the file extension.

    For x264 in 4:2:0, odd widths/heights are padded by one replicated pixel row/column (the encoder
    and browsers need even sizes). MP4/MOV get ``+faststart`` so browsers can play while downloading.

    Args:
        frames: uint8 ``(F, H, W, 3)``.
        path: Output file (``.mp4``, ``.mov``, ``.mkv``, ``.webm``, ``.avi``).
        fps: Frame rate.
        codec: FFmpeg encoder name (``libx264``, ``libvpx-vp9``, ``mjpeg``, ``ffv1``...).
        pix_fmt: Encoder pixel format.
        crf: Constant rate factor for x264/VP9 (lower is better; 18 is visually lossless for x264).
        codec_options: Extra encoder options, passed to FFmpeg as strings.

    Returns:
        The written path.
    """
    path = Path(path)
    if codec not in av.codecs_available:
        raise RuntimeError(f"this PyAV/FFmpeg build has no {codec!r} encoder; cannot write {path}")
    if codec in ("libx264", "h264") and pix_fmt in ("yuv420p", "yuvj420p", "nv12"):
        pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    options = {"crf": str(crf)} if codec in ("libx264", "libvpx-vp9") else {}
    if codec == "libvpx-vp9":
        options["b"] = "0"  # constant-quality mode
    options.update(codec_options or {})
    container_options = {"movflags": "+faststart"} if path.suffix.lower() in (".mp4", ".mov", ".m4v") else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options=container_options) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001), options=options)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def write_gif(frames: np.ndarray, path: str | os.PathLike, fps: float = 8, dither: bool = True) -> Path:
    """Writes a looping GIF with one palette for the whole clip (no flicker between frames).

    The 256-colour palette is fitted (median cut) to frames sampled across the clip; Floyd-Steinberg
    dithering then hides the banding a palette leaves on smooth gradients. Frame delays are whole
    centiseconds, alternated so the average rate equals ``fps``.

    Args:
        frames: uint8 ``(F, H, W, 3)``.
        path: Output ``.gif``.
        fps: Frame rate, at most 50 (browsers slow shorter delays down to 10 fps).
        dither: Dither to the palette.

    Returns:
        The written path.
    """
    if not 0 < fps <= 50:
        raise ValueError(f"GIF fps must be in (0, 50], got {fps}: browsers slow delays below 20 ms down")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sample = frames[np.linspace(0, len(frames) - 1, min(len(frames), 8)).round().astype(int)]
    palette = Image.fromarray(np.concatenate(list(sample), axis=0)).quantize(256, Image.Quantize.MEDIANCUT)
    mode = Image.Dither.FLOYDSTEINBERG if dither else Image.Dither.NONE
    images = [Image.fromarray(f).quantize(palette=palette, dither=mode) for f in frames]
    ends = np.round(np.arange(len(frames) + 1) * 100.0 / fps).astype(int) * 10
    durations = [int(d) for d in np.diff(ends)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0, optimize=False)
    return path


def export_video(
    frames: torch.Tensor | np.ndarray | Sequence[Image.Image] | Sequence[np.ndarray],
    path: str | os.PathLike,
    fps: float = 8,
    layout: str | None = None,
    value_range: tuple[float, float] | None = None,
) -> Path:
    """Writes one clip; the format follows the extension (``.gif`` or ``.mp4``).

    ``.mp4`` is H.264 in yuv420p with ``+faststart`` (plays in browsers; odd sizes padded to even);
    ``.gif`` loops forever with a clip-wide palette.

    Args:
        frames: One clip; see the module docstring for the accepted formats.
        path: Output file ending in ``.gif`` or ``.mp4``.
        fps: Frame rate.
        layout: ``"fchw"``/``"cfhw"`` to disambiguate 4-D tensors.
        value_range: ``(-1, 1)`` or ``(0, 1)`` for float frames; ``None`` detects it.

    Returns:
        The written path.
    """
    suffix = Path(path).suffix.lower()
    if suffix.lstrip(".") not in CLIP_FORMATS:
        raise ValueError(f"{path}: unsupported extension {suffix!r}; use .gif or .mp4")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    arr = to_uint8_frames(frames, layout, value_range)
    return write_gif(arr, path, fps) if suffix == ".gif" else encode_video(arr, path, fps)


def export_videos(
    videos: torch.Tensor | np.ndarray | Sequence,
    out_dir: str | os.PathLike,
    fps: float = 8,
    ext: str = ".mp4",
    names: Sequence[str] | None = None,
    layout: str | None = None,
    value_range: tuple[float, float] | None = None,
) -> list[Path]:
    """Writes a batch, one file per clip: ``out_dir/<name><ext>``.

    Args:
        videos: ``(B, F, C, H, W)`` / ``(B, C, F, H, W)`` tensor, ``(B, F, H, W, 3)`` array, or a
            list of clips in any format :func:`export_video` accepts (diffusers' ``frames`` output).
        out_dir: Folder to write into (created).
        fps: Frame rate.
        ext: ``".mp4"`` or ``".gif"``.
        names: File stems, one per clip; default ``000``, ``001``, ...
        layout: As in :func:`export_video`, for the per-clip 4-D layout.
        value_range: As in :func:`export_video`.

    Returns:
        The written paths, in batch order.
    """
    if isinstance(videos, (torch.Tensor, np.ndarray)) and videos.ndim != 5:
        raise ValueError(
            f"a batch must be 5-D, got shape {tuple(videos.shape)}; use export_video for one clip"
        )
    clips = list(videos)
    names = list(names) if names is not None else [f"{i:03d}" for i in range(len(clips))]
    if len(names) != len(clips):
        raise ValueError(f"{len(names)} names for {len(clips)} clips")
    is_float = isinstance(videos, torch.Tensor) and videos.is_floating_point()
    is_float = is_float or (isinstance(videos, np.ndarray) and np.issubdtype(videos.dtype, np.floating))
    if value_range is None and is_float:
        # Detect the range once for the batch so a bright clip is not mistaken for a [0, 1] clip.
        value_range = (-1.0, 1.0) if float(videos.min()) < 0 else (0.0, 1.0)
    ext = ext if ext.startswith(".") else "." + ext
    return [
        export_video(clip, Path(out_dir) / f"{name}{ext}", fps, layout, value_range)
        for clip, name in zip(clips, names, strict=True)
    ]
