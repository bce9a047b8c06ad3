"""The input clip of video-to-video (``--video``): decoded with :mod:`perflow_video.media.video_decode`, its
first frames taken, resized to cover the model's resolution and center-cropped as the training clips are
(:func:`perflow_video.datasets.video_clips.resize_center_crop`).

Every problem with the file is a user error that names it: a missing file, one FFmpeg cannot open or decode,
or one with fewer frames than ``--num_frames`` asks for.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from perflow_video.datasets.video_clips import resize_center_crop
from perflow_video.errors import ConfigError, PathNotFoundError
from perflow_video.media.video_decode import (
    MISSING_FILE,
    VideoDecodeError,
    VideoInfo,
    probe_video,
    read_frames,
)


def probe_input_video(path: Path) -> VideoInfo:
    """What the file holds (frames really present, size), without decoding it; raises a user error naming it."""
    try:
        return probe_video(os.fspath(path))
    except VideoDecodeError as err:
        if err.reason == MISSING_FILE:
            raise PathNotFoundError(f"--video {path}: no such file") from None
        raise ConfigError(f"--video {path}: cannot read it as a video ({err.reason}: {err.detail})") from None


def input_frame_count(info: VideoInfo, requested: int | None, default: int) -> int:
    """Frames to take from the start of the video: ``requested`` (it must hold them), else all of them up to
    ``default`` (the model's clip length)."""
    if requested is None:
        return min(info.num_frames, default)
    if requested > info.num_frames:
        raise ConfigError(
            f"--num_frames {requested}: --video {info.path} has only {info.num_frames} frames; "
            f"give --num_frames {info.num_frames} or fewer"
        )
    return requested


def read_input_video(info: VideoInfo, num_frames: int, height: int, width: int) -> torch.Tensor:
    """The first ``num_frames`` frames, resized and center-cropped to (height, width).

    Returns:
        float32 (1, F, 3, height, width) in [0, 1], the layout ``AnimateDiffVideoToVideoPipeline`` takes.
    """
    try:
        frames = read_frames(info.path, list(range(num_frames)))
    except VideoDecodeError as err:
        raise ConfigError(f"--video {info.path}: cannot decode it ({err.reason}: {err.detail})") from None
    pixels = resize_center_crop(torch.from_numpy(frames).permute(0, 3, 1, 2), (height, width))
    return ((pixels + 1.0) / 2.0).unsqueeze(0)


__all__ = ["input_frame_count", "probe_input_video", "read_input_video"]
