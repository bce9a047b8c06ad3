"""perflow-video: Piecewise Rectified Flow (PeRFlow) for AnimateDiff and Stable Diffusion 1.5 / 2.1 / XL."""

__version__ = "0.1.0"

from .delta_weights import apply_delta_weights, load_delta_weights, save_delta_weights  # noqa: E402
from .image_captions import ImageCaptionConfig, ImageCaptionDataset  # noqa: E402
from .parameterization import get_parameterization  # noqa: E402
from .reflow_objective import ReflowConfig, reflow_loss  # noqa: E402
from .scheduler import PeRFlowScheduler  # noqa: E402
from .teacher_solver import Conditioning, solve_window  # noqa: E402
from .video_clips import BadDataError, VideoClipConfig, VideoClipDataset  # noqa: E402
from .video_export import export_video, export_videos  # noqa: E402

__all__ = [
    "BadDataError",
    "Conditioning",
    "ImageCaptionConfig",
    "ImageCaptionDataset",
    "PeRFlowScheduler",
    "ReflowConfig",
    "VideoClipConfig",
    "VideoClipDataset",
    "apply_delta_weights",
    "export_video",
    "export_videos",
    "get_parameterization",
    "load_delta_weights",
    "reflow_loss",
    "save_delta_weights",
    "solve_window",
]
