"""perflow-video: Piecewise Rectified Flow (PeRFlow) for AnimateDiff and Stable Diffusion."""

__version__ = "0.1.0"
