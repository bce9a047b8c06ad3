"""Captioned video clips for AnimateDiff-style training (16 frames at 384x384 by default).

Layouts (docs/data.md): a WebVid-style CSV (``videoid,name,page_dir``; ``<video_dir>/<videoid>.mp4``)
or a folder of videos with sidecar captions (``clip.mp4`` + ``clip.txt``, recursive).

Bad items never crash the DataLoader: the reason is recorded in a per-process :class:`SkipReport` and
item ``i+1`` (then ``i+2``, ...) is returned instead, deterministically. Past ``max_bad_fraction``
bad, :class:`BadDataError` stops with examples. ``validate()`` checks everything up front.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from perflow_video.errors import ConfigError, PathNotFoundError, UserError
from perflow_video.media.video_decode import (
    BACKENDS,
    UNDECODABLE_FRAMES,
    DecoderBackend,
    VideoDecodeError,
    VideoInfo,
    open_video,
    probe_video,
    resolve_backend,
)

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif", ".m4v")
# A clip shorter than (F-1)*stride+1 frames: sample it with a smaller stride, loop it, or skip it.
ShortClipPolicy = Literal["lower_stride", "loop", "skip"]
SHORT_CLIP_POLICIES: tuple[str, ...] = get_args(ShortClipPolicy)
TOO_SHORT = "too_short"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"


class BadItemError(RuntimeError):
    """One item cannot be used; ``reason`` is the short code counted in the :class:`SkipReport`."""

    def __init__(self, path: str, reason: str, detail: str):
        super().__init__(f"{path}: {reason}: {detail}")
        self.path, self.reason, self.detail = path, reason, detail


class BadDataError(UserError, RuntimeError):
    """Too much of the dataset is unusable (more than ``max_bad_fraction``)."""


@dataclass
class SkipReport:
    """Items skipped so far in this process, by reason, with a few examples each."""

    total: int  # items in the dataset
    bad: dict[int, tuple[str, str, str]] = field(default_factory=dict)  # index -> (reason, path, detail)
    notes: dict[str, set[str]] = field(default_factory=dict)  # recovered oddity -> paths it was seen in

    @property
    def counts(self) -> Counter:
        """Number of skipped items per reason."""
        return Counter(reason for reason, _, _ in self.bad.values())

    @property
    def bad_fraction(self) -> float:
        return len(self.bad) / max(self.total, 1)

    def examples(self, per_reason: int = 3) -> dict[str, list[str]]:
        """Up to ``per_reason`` ``"path: detail"`` strings for each reason."""
        out: dict[str, list[str]] = {}
        for reason, path, detail in self.bad.values():
            if len(out.setdefault(reason, [])) < per_reason:
                out[reason].append(f"{path}: {detail}")
        return out

    def summary(self) -> str:
        """Multi-line human-readable report."""
        lines = [f"skipped {len(self.bad)} of {self.total} items ({self.bad_fraction:.1%})"]
        for reason, n in self.counts.most_common():
            lines.append(f"  {reason}: {n}")
            lines.extend(f"    e.g. {ex}" for ex in self.examples()[reason])
        lines.extend(f"  recovered, {k}: {len(v)} file(s), e.g. {min(v)}" for k, v in self.notes.items())
        return "\n".join(lines)

    def note(self, kind: str, path: str) -> None:
        """Records a file that was odd but still usable (e.g. a header that over-reports frames)."""
        self.notes.setdefault(kind, set()).add(path)

    def record(self, index: int, error: BadItemError | VideoDecodeError, max_bad_fraction: float) -> None:
        """Adds a bad item; raises :class:`BadDataError` once the bad fraction exceeds the limit."""
        if index not in self.bad:
            self.bad[index] = (error.reason, error.path, error.detail)
            logger.warning("skipping item %d: %s", index, error)
        if self.bad_fraction > max_bad_fraction:
            raise BadDataError(
                f"more than {max_bad_fraction:.1%} of the dataset is unusable; {self.summary()}"
            )


@dataclass
class VideoClipConfig:
    """Where the clips are and how to turn them into training tensors."""

    csv_path: str | None = None  # WebVid-style CSV, one row per clip (give this or `folder`)
    folder: str | None = None  # folder of videos + sidecar captions, searched recursively
    video_dir: str | None = None  # where the CSV's videos live; default: the CSV's own folder
    video_column: str = "videoid"  # CSV column naming the file (extension optional)
    caption_column: str = "name"  # CSV column holding the caption
    video_ext: str = ".mp4"  # appended to CSV names that have no video extension
    caption_ext: str = ".txt"  # sidecar caption suffix in folder mode
    num_frames: int = 16  # F, frames per clip
    resolution: int | tuple[int, int] = 384  # output (H, W); an int means square
    sample_stride: int = 4  # distance between sampled frames in source frames
    short_clip_policy: ShortClipPolicy = (
        "lower_stride"  # clip shorter than (F-1)*stride+1: lower_stride | loop | skip
    )
    random_crop: bool = False  # random instead of center crop after the resize
    random_flip: bool = False  # horizontal flip with p=0.5 (wrong for captions saying left/right)
    backend: DecoderBackend = "auto"  # decord | pyav | auto (decord if installed, PyAV where decord fails)
    decoder_threads: int = 1  # per reader; the DataLoader workers are the parallelism
    seed: int = 0  # start frames, crops and flips derive from (seed, epoch, index)
    max_bad_fraction: float = 0.05  # stop with BadDataError when more of the dataset is unusable
    allow_empty_prompt: bool = False  # accept empty captions (unconditional training)


@dataclass(frozen=True)
class CaptionedFile:
    """One dataset entry: a media file and its caption (inline from a CSV, or a sidecar file)."""

    path: str
    prompt: str | None  # None: read the sidecar caption lazily
    caption_path: str | None


def output_size(res: int | tuple[int, int]) -> tuple[int, int]:
    """A ``resolution`` setting as (H, W): an int means square."""
    return (res, res) if isinstance(res, int) else (int(res[0]), int(res[1]))


def read_csv_rows(csv_path: str, required: list[str], hint: str) -> list[dict[str, str]]:
    """Reads a CSV and checks its header names every ``required`` column (the AnimateDiff trap)."""
    if not os.path.isfile(csv_path):
        raise PathNotFoundError(f"caption CSV not found: {csv_path}")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise ConfigError(
                f"{csv_path}: missing column(s) {missing} in header {header or '(empty file)'}. {hint}"
            )
        reader.fieldnames = header
        return list(reader)


def scan_captioned_folder(
    folder: str, extensions: tuple[str, ...], caption_ext: str, kind: str
) -> list[CaptionedFile]:
    """Every file under ``folder`` (recursively, sorted) with one of ``extensions``, paired with its
    sidecar caption ``<stem><caption_ext>``. ``kind`` ("video", "image") names them in errors."""
    root = Path(folder)
    if not root.is_dir():
        raise PathNotFoundError(f"{kind} folder not found: {root}")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
    if not paths:
        raise ConfigError(f"no {kind} files ({', '.join(extensions)}) under {root}")
    return [CaptionedFile(str(p), None, str(p.with_suffix(caption_ext))) for p in paths]


def read_caption(entry: CaptionedFile, allow_empty: bool) -> str:
    """The entry's caption, whitespace collapsed; raises :class:`BadItemError` if missing or empty."""
    if entry.prompt is not None:
        text = entry.prompt
    else:
        if entry.caption_path is None or not os.path.isfile(entry.caption_path):
            raise BadItemError(entry.path, MISSING_CAPTION, f"no caption file {entry.caption_path}")
        try:
            text = Path(entry.caption_path).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise BadItemError(entry.path, MISSING_CAPTION, f"cannot read {entry.caption_path}: {e}") from e
    text = " ".join(text.split())
    if not text and not allow_empty:
        raise BadItemError(entry.path, EMPTY_CAPTION, "caption is empty")
    return text


def resize_center_crop(
    frames: torch.Tensor, size: tuple[int, int], rng: np.random.Generator | None = None, flip: bool = False
) -> torch.Tensor:
    """Resizes so the frames cover ``size`` (antialiased bilinear), crops, maybe flips, scales to [-1, 1].

    Args:
        frames: uint8 ``(N, C, h, w)``; a channels-last view (``permute`` of ``(N, h, w, C)``) hits
            PyTorch's fast uint8 resize path, about 10x faster than resizing floats.
        size: Output ``(H, W)``.
        rng: Random crop offsets when given, else a center crop.
        flip: Mirror horizontally.

    Returns:
        float32 ``(N, C, H, W)`` in ``[-1, 1]``, contiguous.
    """
    out_h, out_w = size
    h, w = frames.shape[-2:]
    scale = max(out_h / h, out_w / w)
    new_h, new_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
    if (new_h, new_w) != (h, w):
        frames = F.interpolate(
            frames, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
        )
    if rng is None:
        top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    else:
        top, left = int(rng.integers(0, new_h - out_h + 1)), int(rng.integers(0, new_w - out_w + 1))
    frames = frames[..., top : top + out_h, left : left + out_w]
    frames = frames.flip(-1) if flip else frames
    return frames.contiguous().float().div_(127.5).sub_(1.0).clamp_(-1.0, 1.0)


class CaptionedDataset(Dataset):
    """Shared skip-on-bad-item logic; subclasses pass their entries and implement ``_load(index)``."""

    def __init__(self, entries: list[CaptionedFile], max_bad_fraction: float):
        self.entries = entries
        self.max_bad_fraction = max_bad_fraction
        self.epoch = 0
        self.report = SkipReport(total=len(entries))
        self._known_bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        """Changes random starts/crops; call before each epoch's DataLoader iterator is created.

        Non-persistent workers copy the dataset at every epoch, so they see the new value; with
        ``persistent_workers=True`` they keep the epoch they started with.
        """
        self.epoch = epoch

    def good_indices(self) -> list[int]:
        """Indices not known to be bad; after ``validate()``, ``Subset(ds, ds.good_indices())`` iterates
        every usable item exactly once (a bad index otherwise repeats its next good neighbour)."""
        return [i for i in range(len(self.entries)) if i not in self._known_bad]

    def _load(self, index: int) -> dict:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        """Item ``index``, or the next loadable one after it (wrapping), recording every skip.

        Raises:
            BadDataError: More than ``max_bad_fraction`` of the dataset turned out to be unusable.
        """
        n = len(self.entries)
        for step in range(n):
            i = (index + step) % n
            if i in self._known_bad:
                continue
            try:
                return self._load(i)
            except (BadItemError, VideoDecodeError) as e:
                self._known_bad.add(i)
                self.report.record(i, e, self.max_bad_fraction)
        raise BadDataError(f"no loadable item in the dataset; {self.report.summary()}")

    def _scan(self, check: Callable[[int], None]) -> SkipReport:
        """Runs ``check(i)`` on every item; failures join the report and leave the rotation."""
        for i in range(len(self.entries)):
            try:
                check(i)
            except (BadItemError, VideoDecodeError) as e:
                self._known_bad.add(i)
                self.report.bad.setdefault(i, (e.reason, e.path, e.detail))
        if self.report.bad_fraction > self.max_bad_fraction:
            raise BadDataError(
                f"more than {self.max_bad_fraction:.1%} of the dataset is unusable; {self.report.summary()}"
            )
        return self.report


class VideoClipDataset(CaptionedDataset):
    """Video clips with captions; items are ``{"pixel_values", "prompt", "path"}``.

    ``pixel_values`` is float32 ``(F, C, H, W)`` in ``[-1, 1]``; ``path`` is the file actually returned
    (a neighbour's when the requested item was bad). Readers are opened inside ``__getitem__`` only,
    so the dataset is safe to use with DataLoader workers.
    """

    def __init__(self, config: VideoClipConfig):
        c = config
        if (c.csv_path is None) == (c.folder is None):
            raise ValueError("VideoClipConfig: give exactly one of csv_path or folder")
        if c.short_clip_policy not in SHORT_CLIP_POLICIES:
            raise ValueError(
                f"short_clip_policy={c.short_clip_policy!r}; choose one of {SHORT_CLIP_POLICIES}"
            )
        if c.backend not in BACKENDS:
            raise ValueError(f"backend={c.backend!r}; choose one of {BACKENDS}")
        resolve_backend(c.backend)  # fail now, not in a worker, if decord was asked for but is missing
        if c.num_frames < 1 or c.sample_stride < 1:
            raise ValueError("num_frames and sample_stride must be >= 1")
        self.config = c
        self.size = output_size(c.resolution)
        entries = self._load_csv(c) if c.csv_path is not None else self._scan_folder(c)
        super().__init__(entries, c.max_bad_fraction)
        self._probes: OrderedDict[str, VideoInfo] = OrderedDict()

    @staticmethod
    def _load_csv(c: VideoClipConfig) -> list[CaptionedFile]:
        hint = (
            f"The WebVid/AnimateDiff layout is videoid,name,page_dir; set VideoClipConfig.video_column "
            f"(now {c.video_column!r}) and caption_column (now {c.caption_column!r}) to match your CSV."
        )
        rows = read_csv_rows(c.csv_path, [c.video_column, c.caption_column], hint)
        video_dir = c.video_dir or os.path.dirname(os.path.abspath(c.csv_path))
        entries = []
        for row in rows:
            name = (row.get(c.video_column) or "").strip()
            if Path(name).suffix.lower() not in VIDEO_EXTENSIONS:
                name += c.video_ext
            entries.append(
                CaptionedFile(os.path.join(video_dir, name), row.get(c.caption_column) or "", None)
            )
        if not entries:
            raise ValueError(f"{c.csv_path}: the CSV has a header but no rows")
        return entries

    @staticmethod
    def _scan_folder(c: VideoClipConfig) -> list[CaptionedFile]:
        return scan_captioned_folder(c.folder, VIDEO_EXTENSIONS, c.caption_ext, "video")

    def rng(self, index: int) -> np.random.Generator:
        """The generator for item ``index``: a function of (seed, epoch, index) only, not of the worker."""
        return np.random.default_rng([self.config.seed, self.epoch, index])

    def clip_indices(self, num_available: int, rng: np.random.Generator, path: str = "") -> np.ndarray:
        """AnimateDiff-style frame choice: random start, then every ``sample_stride``-th frame.

        Args:
            num_available: Decodable frames in the video.
            rng: Source of the random start.
            path: For error messages.

        Returns:
            int64 ``(F,)`` indices, all in ``[0, num_available)``.

        Raises:
            BadItemError: ``too_short`` when the policy cannot make a clip from this video.
        """
        f, stride = self.config.num_frames, self.config.sample_stride
        policy = self.config.short_clip_policy
        need = (f - 1) * stride + 1
        if num_available < need:
            if policy == "loop":
                start = int(rng.integers(0, num_available))
                return (start + stride * np.arange(f, dtype=np.int64)) % num_available
            if policy == "skip" or num_available < f:
                raise BadItemError(
                    path, TOO_SHORT, f"{num_available} frames < {need if policy == 'skip' else f} needed"
                )
            stride = (num_available - 1) // (f - 1)  # the largest stride that still fits
            need = (f - 1) * stride + 1
        start = int(rng.integers(0, num_available - need + 1))
        return start + stride * np.arange(f, dtype=np.int64)

    def _probe(self, path: str, decode: bool = False) -> VideoInfo:
        info = self._probes.get(path)
        if info is None or (decode and not info.decoded):
            info = probe_video(path, decode=decode)
            self._probes[path] = info
            if len(self._probes) > 1024:
                self._probes.popitem(last=False)
        if info.over_reported:
            self.report.note("header over-reports the frame count (indices clamped)", path)
        return info

    def _load(self, index: int) -> dict:
        entry = self.entries[index]
        prompt = read_caption(entry, self.config.allow_empty_prompt)
        rng = self.rng(index)
        info = self._probe(entry.path)
        backend = self.config.backend
        for attempt in range(2):
            try:
                with open_video(entry.path, backend, self.config.decoder_threads, info) as reader:
                    # The reader's count may be lower than the probe's (decord's own index): use it.
                    indices = self.clip_indices(reader.info.num_frames, rng, entry.path)
                    frames = reader.get_frames(indices)
                break
            except VideoDecodeError as e:
                if attempt or e.reason != UNDECODABLE_FRAMES:
                    raise
                # Packets that do not decode: count what really decodes (bounded work, no hang) and
                # resample within it with PyAV, whose indices follow that count.
                info, backend, rng = self._probe(entry.path, decode=True), "pyav", self.rng(index)
                self.report.note("packets that do not decode (resampled within decodable frames)", entry.path)
        crop_rng = rng if self.config.random_crop else None
        flip = self.config.random_flip and bool(rng.random() < 0.5)
        x = resize_center_crop(torch.from_numpy(frames).permute(0, 3, 1, 2), self.size, crop_rng, flip)
        return {"pixel_values": x, "prompt": prompt, "path": entry.path}

    def validate(self, decode: bool = True) -> SkipReport:
        """Checks every item up front; bad ones are then skipped without retrying them.

        Args:
            decode: Decode every frame (exact frame counts, finds corrupt streams; slow) rather than
                only demuxing.

        Returns:
            The :class:`SkipReport` for the whole dataset.

        Raises:
            BadDataError: The bad fraction exceeds ``max_bad_fraction``; the message lists examples.
        """

        def check(i: int) -> None:
            entry = self.entries[i]
            read_caption(entry, self.config.allow_empty_prompt)
            info = self._probe(entry.path, decode=decode)
            self.clip_indices(info.num_frames, self.rng(i), entry.path)

        return self._scan(check)
