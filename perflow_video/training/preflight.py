"""What a run needs from the disk, checked before any model loads: data, checkpoint, weights.

Each failure is one message naming the config key (and its flag), instead of a traceback minutes in.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from perflow_video.errors import ConfigError, PathNotFoundError
from perflow_video.families import get_family
from perflow_video.families.animatediff import DEFAULT_MOTION_ADAPTER
from perflow_video.families.base import is_single_file
from perflow_video.families.loading import (
    EXAMPLE_MOTION_ADAPTER,
    EXAMPLE_WEIGHTS,
    MODEL_MARKER,
    PIPELINE_MARKER,
    check_weights_present,
)
from perflow_video.training.checkpointing import resolve_resume
from perflow_video.training.optimizers import check_optimizer_device
from perflow_video.training.train_config import DataConfig, ModelConfig, TrainConfig


class WeightSource(NamedTuple):
    """One place weights (or their configs) are read from, as the config names it."""

    flag: str  # the config key, e.g. model.motion_adapter
    path: str  # its value: hub id, local path or tiny
    marker: str  # the file that marks the repo as downloaded (PIPELINE_MARKER / MODEL_MARKER)
    example: str  # a typical value for the family, for the message
    revision: str | None = None  # hub revision (model.revision, which names the base model's)


def check_data(data: DataConfig) -> None:
    """``data.train_data`` (and ``data.video_dir`` if given) exist."""
    if not os.path.exists(data.train_data):
        raise PathNotFoundError(
            f"data.train_data={data.train_data!r} does not exist (--train_data: a CSV file or a folder of "
            "files with sidecar .txt captions)"
        )
    if data.video_dir is not None and not os.path.isdir(data.video_dir):
        raise PathNotFoundError(f"data.video_dir={data.video_dir!r} is not a folder")


def check_resume(cfg: TrainConfig) -> None:
    """``run.resume_from_checkpoint`` is "latest", empty, or a complete checkpoint folder."""
    try:
        resolve_resume(cfg.run.output_dir, cfg.run.resume_from_checkpoint)
    except FileNotFoundError as err:
        raise PathNotFoundError(str(err)) from None


def base_model_source(model: ModelConfig) -> WeightSource:
    """The base model; for a single checkpoint file, where its component configs come from."""
    example = EXAMPLE_WEIGHTS[model.family]
    path = model.pretrained_model_name_or_path
    if not is_single_file(path):
        return WeightSource(
            "model.pretrained_model_name_or_path", path, PIPELINE_MARKER, example, model.revision
        )
    if model.single_file_config is None:
        raise ConfigError(
            f"model.pretrained_model_name_or_path={path!r} is a single checkpoint file: set "
            f"model.single_file_config to the diffusers folder or hub id of its component configs, "
            f"e.g. model.single_file_config={example}"
        )
    return WeightSource("model.single_file_config", model.single_file_config, PIPELINE_MARKER, example)


def motion_adapter_source(model: ModelConfig) -> WeightSource:
    """The motion modules; for an original motion-module file, where its config comes from."""
    adapter = model.motion_adapter or DEFAULT_MOTION_ADAPTER
    if not is_single_file(adapter):
        return WeightSource("model.motion_adapter", adapter, MODEL_MARKER, EXAMPLE_MOTION_ADAPTER)
    config = model.motion_adapter_config or DEFAULT_MOTION_ADAPTER
    return WeightSource("model.motion_adapter_config", config, MODEL_MARKER, EXAMPLE_MOTION_ADAPTER)


def check_weights(model: ModelConfig) -> None:
    """Every weight source is tiny, local, in the Hugging Face cache, or on a reachable hub."""
    sources = [base_model_source(model)]
    if get_family(model.family).data_kind == "clips":  # the video families add motion modules
        sources.append(motion_adapter_source(model))
    for source in sources:
        check_weights_present(source.flag, source.path, source.marker, source.revision, source.example)


def check_before_loading(cfg: TrainConfig) -> None:
    """All of the above, and that ``optim.optimizer`` has its device; raises the first problem
    (PathNotFoundError / WeightsNotFoundError / ConfigError). A ``model.init=random`` run reads no weights
    (the architecture configs ship with the package)."""
    check_optimizer_device(cfg.optim.optimizer, torch.cuda.is_available())
    check_data(cfg.data)
    check_resume(cfg)
    if cfg.model.init == "pretrained":
        check_weights(cfg.model)
