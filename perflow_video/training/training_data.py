"""The training dataset of a run: video clips for AnimateDiff, captioned images for the image families
(the family says which: ``ModelFamily.data_kind``), and a batch of it as (z_0, text conditioning)."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from perflow_video.datasets.image_captions import ImageCaptionConfig, ImageCaptionDataset
from perflow_video.datasets.video_clips import VideoClipConfig, VideoClipDataset
from perflow_video.errors import PathNotFoundError
from perflow_video.families import DataKind, FamilyModels, ModelFamily
from perflow_video.method.teacher_solver import Conditioning
from perflow_video.training.latent_cache import conditioning_from_batch
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
        raise PathNotFoundError(f"data.train_data={path!r} does not exist (give a CSV file or a folder)")
    return {"csv_path": path} if os.path.isfile(path) else {"folder": path}


def clip_dataset(config: TrainConfig) -> VideoClipDataset:
    """Video clips (F, 3, H, W) in [-1, 1] of ``model.num_frames`` frames (video families)."""
    d, m = config.data, config.model
    return VideoClipDataset(
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


def image_dataset(config: TrainConfig) -> ImageCaptionDataset:
    """Captioned images (3, H, W) in [-1, 1] (image families)."""
    d, m = config.data, config.model
    return ImageCaptionDataset(
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


#: The dataset of each kind of training data a family declares (``ModelFamily.data_kind``).
DATASETS: dict[DataKind, Callable[[TrainConfig], Dataset]] = {"clips": clip_dataset, "images": image_dataset}


def build_dataset(config: TrainConfig, data_kind: DataKind) -> IndexedDataset:
    """The run's training data, of the kind its family trains on, with each item's dataset index."""
    return IndexedDataset(DATASETS[data_kind](config))


@torch.no_grad()
def encode_batch(
    family: ModelFamily, models: FamilyModels, batch: dict, device, cached: bool
) -> tuple[Tensor, Conditioning]:
    """(clean latents z_0, per-prompt text conditioning) of a data batch, from the latent cache when
    ``cached`` (``data.cache_latents``), else through the VAE and the text encoder(s)."""
    if cached:
        return batch["latents"].to(device).float(), conditioning_from_batch(batch, device)
    z_0 = family.encode_pixels(models, batch["pixel_values"].to(device)).float()
    return z_0, family.encode_text(models, list(batch["prompt"]), device)
