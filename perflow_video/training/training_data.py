"""The training dataset of a run: video clips for AnimateDiff, captioned images for the image families."""

from __future__ import annotations

import os

from torch.utils.data import Dataset

from perflow_video.datasets.image_captions import ImageCaptionConfig, ImageCaptionDataset
from perflow_video.datasets.video_clips import VideoClipConfig, VideoClipDataset
from perflow_video.training.train_config import TrainConfig


class IndexedDataset(Dataset):
    """Adds the item's dataset index: per-sample randomness derives from (seed, epoch, index), so a run
    draws the same t, noise and prompt dropout for a sample however the batch is split over processes."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        item["index"] = index
        return item


def _source(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"data.train_data={path!r} does not exist (give a CSV file or a folder)")
    return {"csv_path": path} if os.path.isfile(path) else {"folder": path}


def build_dataset(config: TrainConfig, is_video: bool) -> IndexedDataset:
    """VideoClipDataset (clips (F, 3, H, W)) or ImageCaptionDataset (images (3, H, W)), in [-1, 1]."""
    d, m = config.data, config.model
    if is_video:
        dataset = VideoClipDataset(
            VideoClipConfig(
                **_source(d.train_data),
                video_dir=d.video_dir,
                video_column=d.video_column,
                caption_column=d.caption_column,
                num_frames=m.num_frames,
                resolution=m.resolution,
                sample_stride=d.sample_stride,
                short_clip_policy=d.short_clip_policy,
                random_flip=d.random_flip,
                backend=d.backend,
                seed=config.optim.seed,
                max_bad_fraction=d.max_bad_fraction,
            )
        )
    else:
        dataset = ImageCaptionDataset(
            ImageCaptionConfig(
                **_source(d.train_data),
                image_dir=d.video_dir,
                image_column=d.image_column,
                caption_column=d.caption_column,
                resolution=m.resolution,
                random_flip=d.random_flip,
                seed=config.optim.seed,
                max_bad_fraction=d.max_bad_fraction,
            )
        )
    return IndexedDataset(dataset)
