"""Clips/s of VideoClipDataset per DataLoader worker, decord vs PyAV, at 16x384x384.

Sources are synthetic ~512x512 H.264 clips (x264 High profile with B-frames, like web video: a
textured pattern drifting under moving shapes, 30 fps, a keyframe every --gop frames), written to a
temporary folder. Each measurement iterates a DataLoader (batch_size=1) and times clips after a
warm-up, so worker start-up is excluded. In the main process (--workers 0) it also reports the CPU
time per clip, which other jobs on a shared machine disturb much less than clips/s. Prints a markdown
table whose caption names the decord distribution (decord2 or decord 0.6.0) and PyAV version.

    python scripts/benchmark_loader.py                        # defaults used for docs/data.md
    python scripts/benchmark_loader.py --workers 0 1 2 --clips 48
    python scripts/benchmark_loader.py --videos 4 --workers 0 --clips 16   # short: compare CPU ms
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from perflow_video.datasets.video_clips import VideoClipConfig, VideoClipDataset
from perflow_video.media.video_decode import decord_available, decord_distribution
from perflow_video.media.video_export import encode_video


def make_sources(folder: Path, count: int, frames: int, size: int, gop: int, seed: int = 0) -> None:
    """Writes ``count`` captioned H.264 clips of ``frames`` frames at ``size`` x ``size`` (30 fps)."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (size * 2, size * 2, 3), dtype=np.uint8)
    # Smooth the noise so x264 spends bits like on natural footage, not on white noise.
    t = torch.from_numpy(texture).permute(2, 0, 1)[None].float()
    texture = torch.nn.functional.avg_pool2d(t, 9, 1, 4)[0].permute(1, 2, 0).numpy()
    texture = ((texture - texture.min()) / (np.ptp(texture) + 1e-6) * 255).astype(np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(count):
        clip = np.empty((frames, size, size, 3), np.uint8)
        for k in range(frames):
            dy, dx = int(k * 2 + i * 17) % size, int(k * 3 + i * 29) % size
            frame = texture[dy : dy + size, dx : dx + size].copy()
            cy, cx = size / 2 + size / 3 * np.sin(k / 9 + i), size / 2 + size / 3 * np.cos(k / 7 + i)
            frame[(yy - cy) ** 2 + (xx - cx) ** 2 < (size / 8) ** 2] = (230, 60, 40)
            clip[k] = frame
        encode_video(clip, folder / f"src_{i:02d}.mp4", fps=30, crf=23, codec_options={"g": str(gop)})
        (folder / f"src_{i:02d}.txt").write_text("a red ball over a drifting texture\n")


def measure(folder: Path, backend: str, workers: int, clips: int, warmup: int) -> tuple[float, float | None]:
    """Returns clips/s for the whole DataLoader with ``workers`` workers (0: main process), and with
    ``workers == 0`` also the CPU time per clip in ms (less sensitive than clips/s to other jobs on
    the machine; ``None`` with workers, whose CPU time is not seen from here)."""
    config = VideoClipConfig(
        folder=str(folder), num_frames=16, resolution=384, sample_stride=4, backend=backend
    )
    dataset = VideoClipDataset(config)
    indices = np.resize(np.random.default_rng(0).permutation(len(dataset)), warmup + clips).tolist()
    prefetch = 4 if workers else None  # keep workers busy; the main process only collects
    loader = DataLoader(dataset, batch_size=1, sampler=indices, num_workers=workers, prefetch_factor=prefetch)
    start = cpu_start = None
    for n, batch in enumerate(loader):
        assert batch["pixel_values"].shape == (1, 16, 3, 384, 384)
        if n + 1 == warmup:
            start, cpu_start = time.perf_counter(), time.process_time()
    rate = clips / (time.perf_counter() - start)
    cpu_ms = (time.process_time() - cpu_start) / clips * 1000 if workers == 0 else None
    return rate, cpu_ms


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=8, help="number of source clips to generate")
    parser.add_argument(
        "--frames", type=int, default=150, help="frames per source clip (150 = 5 s at 30 fps)"
    )
    parser.add_argument("--size", type=int, default=512, help="source width and height in pixels")
    parser.add_argument("--gop", type=int, default=60, help="keyframe interval of the sources, in frames")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--backends", nargs="+", default=["decord", "pyav"], help="decord and/or pyav")
    parser.add_argument("--clips", type=int, default=32, help="clips timed per measurement")
    parser.add_argument("--warmup", type=int, default=4, help="clips loaded before timing starts")
    args = parser.parse_args()

    torch.set_num_threads(1)  # the main process acts as one worker when --workers 0
    backends = [b for b in args.backends if b != "decord" or decord_available()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        make_sources(Path(tmp), args.videos, args.frames, args.size, args.gop)
        print(f"generated {args.videos} sources in {time.perf_counter() - t0:.1f}s")
        for backend in backends:
            for workers in args.workers:
                rate, cpu_ms = measure(Path(tmp), backend, workers, args.clips, args.warmup)
                per_worker = rate / max(workers, 1)
                rows.append((backend, workers, rate, per_worker, cpu_ms))
                print(f"{backend} workers={workers}: {rate:.2f} clips/s", flush=True)
    print()
    print(
        f"Sources: {args.videos} x {args.frames} frames, {args.size}x{args.size} H.264 (crf 23, keyframe every "
        f"{args.gop}), 30 fps; output 16x3x384x384, stride 4. Machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch thread(s) per worker; {' '.join(decord_distribution() or ('no decord',))}, PyAV {version('av')}."
    )
    print()
    print(
        "| backend | DataLoader workers | clips/s (total) | clips/s per worker | ms per clip per worker "
        "| CPU ms per clip |"
    )
    print("|---|---|---|---|---|---|")
    for backend, workers, rate, per_worker, cpu_ms in rows:
        label = "0 (main process)" if workers == 0 else str(workers)
        cpu = "-" if cpu_ms is None else f"{cpu_ms:.0f}"
        print(f"| {backend} | {label} | {rate:.2f} | {per_worker:.2f} | {1000 / per_worker:.0f} | {cpu} |")


if __name__ == "__main__":
    main()
