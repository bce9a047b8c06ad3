"""perflow-video: Piecewise Rectified Flow (PeRFlow) for AnimateDiff and Stable Diffusion 1.5 / 2.1 / XL."""

from perflow_video._version import __version__
from perflow_video.datasets.image_captions import ImageCaptionConfig, ImageCaptionDataset
from perflow_video.datasets.video_clips import BadDataError, VideoClipConfig, VideoClipDataset
from perflow_video.generation.model_source import tiny_model_folder
from perflow_video.media.video_export import export_video, export_videos
from perflow_video.method.parameterization import get_parameterization
from perflow_video.method.reflow_objective import ReflowConfig, reflow_loss
from perflow_video.method.teacher_solver import Conditioning, solve_window
from perflow_video.scheduler import PeRFlowScheduler
from perflow_video.weights.delta_export import export_delta
from perflow_video.weights.delta_sources import read_delta
from perflow_video.weights.delta_weights import (
    apply_delta_weights,
    compute_delta_weights,
    load_delta_weights,
    save_delta_weights,
)

__all__ = [
    "__version__",
    "BadDataError",
    "Conditioning",
    "ImageCaptionConfig",
    "ImageCaptionDataset",
    "PeRFlowScheduler",
    "ReflowConfig",
    "VideoClipConfig",
    "VideoClipDataset",
    "apply_delta_weights",
    "compute_delta_weights",
    "export_delta",
    "export_video",
    "export_videos",
    "get_parameterization",
    "load_delta_weights",
    "read_delta",
    "reflow_loss",
    "save_delta_weights",
    "solve_window",
    "tiny_model_folder",
]
