"""Video decoding behind one small interface: decord or PyAV (everywhere).

"decord" is the ``decord`` module, installed from the ``decord2`` distribution (maintained; wheels for
Linux x86_64 / aarch64, Windows x86_64, macOS 14+ arm64) or from the unmaintained ``decord`` 0.6.0.

Both backends index frames the same way: frame ``i`` is the ``i``-th video packet in presentation
order, and both convert to RGB with FFmpeg's swscale, so they return identical frames for the same
file and indices (tests check this).

Why a probe first: container headers lie. A truncated download keeps the header of the full file, an
AVI header can claim any frame count, and decord is known to spin forever inside ``get_batch`` when
asked for a frame that the file does not really hold (dmlc/decord#373). :func:`probe_video` therefore
demuxes the file once (cheap: no decoding) and counts the packets that are fully present; every read
is validated against that count before decord sees it. ``probe_video(path, decode=True)`` goes further
and decodes the whole file, counting the frames the decoder really produces (used by
``VideoClipDataset.validate`` and to recover from a short read).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from typing import Literal, get_args

import av
import numpy as np

DecoderBackend = Literal["auto", "decord", "pyav"]  # auto: decord where it can decode the file, else PyAV
BACKENDS: tuple[str, ...] = get_args(DecoderBackend)

# Short reason codes shared with the datasets' skip reports.
MISSING_FILE = "missing_file"
EMPTY_FILE = "empty_file"
UNREADABLE = "unreadable"
NO_VIDEO_STREAM = "no_video_stream"
NO_FRAMES = "no_frames"
INDEX_OUT_OF_RANGE = "index_out_of_range"
DECODE_ERROR = "decode_error"
UNDECODABLE_FRAMES = "undecodable_frames"


class VideoDecodeError(RuntimeError):
    """A video could not be read; ``reason`` is a short code for reports, the message names the file."""

    def __init__(self, path: str, reason: str, detail: str):
        super().__init__(f"{path}: {reason}: {detail}")
        self.path = path
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` learned about a file.

    Attributes:
        path: The file.
        num_frames: Frames that may be indexed (``0 <= i < num_frames``): packets fully present in the
            file, or, after ``probe_video(decode=True)``, frames the decoder actually produced.
        reported_frames: Frame count claimed by the container header (0 when it does not say).
        fps: Average frame rate.
        width: Coded frame width in pixels (rotation metadata is ignored by both backends).
        height: Coded frame height in pixels.
        frame_pts: Presentation timestamp of frame ``i``, or ``None`` if the container lacks timestamps.
        keyframe_pts: Sorted timestamps of keyframes (seek targets for the PyAV backend).
        decoded: True when ``num_frames`` was counted by decoding, not by demuxing.
    """

    path: str
    num_frames: int
    reported_frames: int
    fps: float
    width: int
    height: int
    frame_pts: tuple[int, ...] | None
    keyframe_pts: tuple[int, ...]
    decoded: bool = False

    @property
    def over_reported(self) -> bool:
        """True when the header claims more frames than the file holds."""
        return self.reported_frames > self.num_frames


class VideoReader:
    """An open video (base of the backends). Use as a context manager; open it inside
    ``Dataset.__getitem__`` only, never share one with DataLoader workers."""

    info: VideoInfo

    def get_frames(self, indices: np.ndarray | list[int]) -> np.ndarray:
        """Returns uint8 RGB frames ``(len(indices), H, W, 3)`` in the order asked."""
        raise NotImplementedError

    def close(self) -> None:
        """Releases the decoder."""

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def decord_available() -> bool:
    """True if the ``decord`` module is installed (from ``decord2`` or ``decord`` 0.6.0).

    Looks the module up without importing it, and decord is imported only when a decord reader is
    opened: decord 0.6.0 bundles an FFmpeg that, when loaded before PyAV's, makes PyAV's libvpx
    (VP8/VP9) encoders fail to open in the same process (decord2 3.4.0 does not; docs/data.md).
    A ``decord/`` folder left without its ``__init__.py`` (``pip uninstall decord`` run after
    installing decord2, which shares that folder) counts as not installed.
    """
    spec = importlib.util.find_spec("decord")
    return spec is not None and spec.origin is not None


def decord_distribution() -> tuple[str, str] | None:
    """``(distribution, version)`` of the installed decord: ``("decord2", "3.4.0")``,
    ``("decord", "0.6.0")``, or ``None`` if neither is installed."""
    for dist in ("decord2", "decord"):
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise VideoDecodeError(path, MISSING_FILE, "no such file")
    if os.path.isdir(path):
        raise VideoDecodeError(path, UNREADABLE, "is a directory, not a video")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, EMPTY_FILE, "file is empty (0 bytes)")


def _open_container(path: str) -> av.container.InputContainer:
    _check_file(path)
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoDecodeError(path, UNREADABLE, f"FFmpeg cannot open it ({e})") from e
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(path, NO_VIDEO_STREAM, "the container has no video stream")
    return container


def probe_video(path: str, decode: bool = False) -> VideoInfo:
    """Counts the frames a file really holds, without trusting its header.

    Args:
        path: Video file (anything FFmpeg reads).
        decode: If False, demux only (fast) and count packets that lie completely inside the file.
            If True, decode every frame and count what the decoder produces (slow, exact).

    Returns:
        The :class:`VideoInfo`.

    Raises:
        VideoDecodeError: Missing, empty, unreadable file, no video stream, or no frame at all.
    """
    path = os.fspath(path)
    size = os.path.getsize(path) if os.path.exists(path) else 0
    container = _open_container(path)
    try:
        stream = container.streams.video[0]
        reported = int(stream.frames or 0)
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        width, height = stream.codec_context.width, stream.codec_context.height
        pts: list[int | None] = []
        keys: list[int] = []
        if decode:
            stream.thread_type = "AUTO"
            for frame in _decode_tolerant(container, stream):
                pts.append(frame.pts)
                width, height = frame.width, frame.height
            keys = [p for p in pts[:1] if p is not None]
        else:
            try:
                for packet in container.demux(stream):
                    # The trailing flush packet has no data; discarded packets (edit lists) never
                    # become frames; a packet running past EOF belongs to a truncated download.
                    if packet.size == 0 or packet.is_discard:
                        continue
                    if packet.pos is not None and packet.pos >= 0 and packet.pos + packet.size > size:
                        break
                    t = packet.pts if packet.pts is not None else packet.dts
                    pts.append(t)
                    if packet.is_keyframe and t is not None:
                        keys.append(t)
            except av.FFmpegError:
                pass  # demuxing stops at the first unreadable byte; what came before is usable
    finally:
        container.close()
    if not pts:
        raise VideoDecodeError(path, NO_FRAMES, "no decodable video frame in the file")
    has_pts = all(p is not None for p in pts) and len(set(pts)) == len(pts)
    return VideoInfo(
        path=path,
        num_frames=len(pts),
        reported_frames=reported,
        fps=fps,
        width=width,
        height=height,
        frame_pts=tuple(sorted(pts)) if has_pts else None,
        keyframe_pts=tuple(sorted(keys)) if has_pts else (),
        decoded=decode,
    )


def _decode_tolerant(container, stream):
    """Yields decoded frames, skipping packets the decoder rejects instead of aborting the file."""
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError:
                continue  # a corrupt packet: later keyframes may still decode
            yield from frames
    except av.FFmpegError:
        return  # demuxer hit garbage or EOF inside a packet: stop with what we have


def validate_indices(indices: np.ndarray | list[int], info: VideoInfo) -> np.ndarray:
    """Checks that every index is in ``[0, info.num_frames)``; returns them as int64.

    Raises:
        VideoDecodeError: ``index_out_of_range``, before any decoder is asked for a frame that the file
            does not hold (the case that hangs decord).
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise ValueError(f"{info.path}: no frame indices requested")
    bad = idx[(idx < 0) | (idx >= info.num_frames)]
    if bad.size:
        raise VideoDecodeError(
            info.path,
            INDEX_OUT_OF_RANGE,
            f"frame(s) {bad[:5].tolist()} requested but only {info.num_frames} are decodable "
            f"(header claims {info.reported_frames})",
        )
    return idx


class PyAVReader(VideoReader):
    """PyAV backend: seeks to the keyframe before the first wanted frame and decodes forward."""

    def __init__(self, path: str, info: VideoInfo | None = None, threads: int = 1):
        self.info = info if info is not None else probe_video(path)
        self._threads = threads
        self._path = os.fspath(path)

    def get_frames(self, indices: np.ndarray | list[int]) -> np.ndarray:
        """Returns uint8 RGB frames ``(len(indices), H, W, 3)``; see :class:`VideoReader`."""
        idx = validate_indices(indices, self.info)
        wanted = sorted(set(idx.tolist()))
        try:
            frames = self._decode(wanted, seek=True)
            if len(frames) < len(wanted):
                frames = self._decode(wanted, seek=False)  # a seek can land late; the start never does
        except (av.FFmpegError, OSError, ValueError) as e:  # e.g. a pixel format swscale cannot convert
            raise VideoDecodeError(self._path, DECODE_ERROR, f"PyAV: {e}") from e
        missing = [i for i in wanted if i not in frames]
        if missing:
            raise VideoDecodeError(
                self._path,
                UNDECODABLE_FRAMES,
                f"decoder produced no frame for index(es) {missing[:5]} of {self.info.num_frames} packets",
            )
        return np.stack([frames[i] for i in idx.tolist()])

    def _decode(self, wanted: list[int], seek: bool) -> dict[int, np.ndarray]:
        container = _open_container(self._path)
        try:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = self._threads
            out: dict[int, np.ndarray] = {}
            pts = self.info.frame_pts
            if pts is None:  # no usable timestamps: count frames from the start
                for n, frame in enumerate(_decode_tolerant(container, stream)):
                    if n in wanted:
                        out[n] = frame.to_ndarray(format="rgb24")
                    if n >= wanted[-1]:
                        break
                return out
            target = {pts[i]: i for i in wanted}
            last = pts[wanted[-1]]
            first = pts[wanted[0]]
            keys = [k for k in self.info.keyframe_pts if k <= first]
            if seek and keys and keys[-1] > pts[0]:
                container.seek(keys[-1], stream=stream, backward=True, any_frame=False)
            for frame in _decode_tolerant(container, stream):
                if frame.pts in target:
                    out[target[frame.pts]] = frame.to_ndarray(format="rgb24")
                if frame.pts is not None and frame.pts >= last:
                    break
            return out
        finally:
            container.close()


class DecordReader(VideoReader):
    """decord backend. Indices are validated against the PyAV probe before ``get_batch``."""

    def __init__(self, path: str, info: VideoInfo | None = None, threads: int = 1):
        import decord

        self._path = os.fspath(path)
        probe = info if info is not None else probe_video(self._path)
        try:
            self._vr = decord.VideoReader(self._path, ctx=decord.cpu(0), num_threads=threads)
        except (decord.DECORDError, RuntimeError) as e:  # the wrapper raises RuntimeError on some files
            raise VideoDecodeError(self._path, UNREADABLE, f"decord cannot open it ({_first_line(e)})") from e
        # decord's own count may trust the header; never let it index past what the probe found.
        n = min(len(self._vr), probe.num_frames)
        self.info = dataclasses.replace(probe, num_frames=n)

    def get_frames(self, indices: np.ndarray | list[int]) -> np.ndarray:
        """Returns uint8 RGB frames ``(len(indices), H, W, 3)``; see :class:`VideoReader`."""
        import decord

        idx = validate_indices(indices, self.info)
        try:
            frames = self._vr.get_batch(idx.tolist()).asnumpy()
        except (decord.DECORDError, RuntimeError) as e:
            raise VideoDecodeError(self._path, DECODE_ERROR, f"decord: {_first_line(e)}") from e
        if frames.shape[0] != idx.size:
            raise VideoDecodeError(self._path, DECODE_ERROR, f"decord returned {frames.shape[0]} frames")
        return frames

    def close(self) -> None:
        """Releases the decoder."""
        self._vr = None


def _first_line(e: Exception) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else type(e).__name__


def resolve_backend(backend: str) -> str:
    """Maps ``"auto"`` to ``"decord"`` when it imports, else ``"pyav"``; validates the name."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "decord" if decord_available() else "pyav"
    if backend == "decord" and not decord_available():
        raise ImportError(
            "backend='decord' but decord is not installed (pip install decord2; no wheel for this "
            "platform?); use 'pyav'"
        )
    return backend


def open_video(
    path: str, backend: str = "auto", threads: int = 1, info: VideoInfo | None = None
) -> VideoReader:
    """Opens a video with the chosen backend.

    Args:
        path: Video file.
        backend: ``"decord"``, ``"pyav"`` or ``"auto"`` (decord if installed, PyAV for any file or
            read decord fails on: H.264 at some widths, e.g. 48 px, and GIF with decord 0.6.0).
        threads: Decoder threads; keep 1 inside DataLoader workers (the workers are the parallelism).
        info: A probe to reuse (saves one demux pass).

    Returns:
        A :class:`VideoReader`; use it as a context manager.

    Raises:
        VideoDecodeError: The file cannot be read (reason code in ``.reason``).
    """
    path = os.fspath(path)
    name = resolve_backend(backend)
    if info is None:
        info = probe_video(path)
    if name == "pyav":
        return PyAVReader(path, info, threads)
    if backend == "decord":
        return DecordReader(path, info, threads)
    return _FallbackReader(path, info, threads)


class _FallbackReader(VideoReader):
    """decord first; PyAV for what decord fails on: ``get_batch`` errors on some frame widths (16, 24,
    48, 72 px, decord 0.6.0 and decord2 3.4.0 alike; 96 px too on some CPUs) and files it cannot open (GIF with decord 0.6.0)."""

    def __init__(self, path: str, info: VideoInfo, threads: int):
        self._pyav = PyAVReader(path, info, threads)
        try:
            self._decord: DecordReader | None = DecordReader(path, info, threads)
            self.info = self._decord.info
        except (VideoDecodeError, ImportError, OSError):  # also a decord install that fails to load
            self._decord, self.info = None, info

    def get_frames(self, indices: np.ndarray | list[int]) -> np.ndarray:
        """Returns uint8 RGB frames ``(len(indices), H, W, 3)``; see :class:`VideoReader`."""
        if self._decord is not None:
            try:
                return self._decord.get_frames(indices)
            except VideoDecodeError as e:
                if e.reason != DECODE_ERROR:
                    raise
                self._decord = None  # same frames from PyAV; stay with it for this file
        return self._pyav.get_frames(indices)

    def close(self) -> None:
        """Releases the decoder."""
        if self._decord is not None:
            self._decord.close()


def read_frames(
    path: str, indices: np.ndarray | list[int], backend: str = "auto", threads: int = 1
) -> np.ndarray:
    """One-shot helper: uint8 RGB frames ``(len(indices), H, W, 3)`` from ``path``."""
    with open_video(path, backend=backend, threads=threads) as reader:
        return reader.get_frames(indices)
