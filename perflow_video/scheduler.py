"""PeRFlowScheduler: a diffusers scheduler that samples a PeRFlow student (docs/method.md §4).

It drives diffusers' own ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` and
``AnimateDiffPipeline`` unchanged, and reads the ``scheduler_config.json`` of released PeRFlow
checkpoints (same keys; ``prediction_type="epsilon"`` is the old name of ``diff_eps``).

``set_timesteps(n)``: n steps over the K windows, the first ``n mod K`` windows get one extra step;
inside a window the points are ``linspace(t_s, t_e, m, endpoint=False)`` in float64 and the timesteps
are their truncation ``(1000 t).astype(int64)``, exactly the official PeRFlow scheduler's rule (no float
slack: t = 0.2 from ``linspace(1, 0, 5)`` is 0.19999... and gives 199; :func:`perflow_timesteps`).
For K = 4: n = 4 -> [1000, 750, 500, 250]; n = 8 -> [1000, 875, ..., 125]; K = 1, n = 5 ->
[1000, 800, 600, 399, 199]. A truncated timestep is never above its point, so it stays in the window
it was generated in, and ``step`` finds the window from the timestep's value as the official code does.

``n < K`` (fewer steps than windows): we run exactly the n steps asked for, at
``t = 1 - j / n`` (j = 0 ... n-1), each an Euler step of the velocity of the window the current
time lies in, over the longer interval. Quality is below n = K (each step extrapolates its window's
straight segment past its end), and a warning says so once per call. The reference implementation
silently forced n = K instead.

``step``: the prediction becomes the window velocity with paper eq. 6 (or is the velocity), then
Euler ``z_next = z + (tau_next - tau) / 1000 * v`` (tau_next = 0 after the last step).
Classifier-free guidance is applied to the prediction before ``step`` (equivalent to CFG on v).

Video-to-video / img2img (``strength``): diffusers' ``AnimateDiffVideoToVideoPipeline`` (and the
image-to-image pipelines) call ``set_timesteps(n)``, keep the last ``int(n * strength)`` timesteps, noise
the encoded input with ``add_noise(z_0, eps, first kept timestep)`` and step from there; some call
``set_begin_index(first kept index)`` first. ``add_noise`` at timestep tau is the teacher's marginal at
t = tau / N, ``sqrt(abar[tau - 1]) z_0 + sqrt(1 - abar[tau - 1]) eps`` (docs/method.md §1): at a window
start this is exactly the z_s the student was trained on (Algorithm 1, step 3). For K = 4, n = 4 the kept
timesteps are [1000, 750, 500, 250] (strength 1), [750, 500, 250] (0.75), [500, 250] (0.5): always window
starts. With more steps than windows a strength can start inside a window (n = 6, strength 0.5 keeps
[625, 500, 250]); there the student was trained on the straight segment between two teacher marginals, and
the teacher's marginal at t is the closest noising a data latent has (an approximation, not the segment).
``step`` tracks ``step_index`` as diffusers' schedulers do: from ``begin_index`` when one was set, else from
the first timestep it is given (the timesteps are unique, so a timestep's value names its step).

``from_config``: a teacher's DDIM / PNDM / ... config says ``prediction_type="epsilon"`` about the
*teacher*; it does not say which PeRFlow parameterization the student was trained with. Converting
such a (non-PeRFlow) config therefore requires ``prediction_type=`` to be named, and raises otherwise
instead of silently turning "epsilon" into ``diff_eps`` (docs/method.md §7). A PeRFlow config (it
has ``num_time_windows`` or ``_class_name`` PeRFlowScheduler) keeps its own value, so the released
configs with the legacy ``"epsilon"`` still load as ``diff_eps``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from perflow_video.errors import ConfigError
from perflow_video.method.noise_schedule import make_alphas_cumprod, unsupported_schedule_reason
from perflow_video.method.parameterization import canonical_prediction_type, get_parameterization
from perflow_video.method.time_windows import (
    abar_at,
    sampling_timestep_of_time,
    time_of_timestep,
    window_of_time,
)

logger = logging.getLogger(__name__)


@dataclass
class PeRFlowSchedulerOutput(BaseOutput):
    """Output of :meth:`PeRFlowScheduler.step`.

    Args:
        prev_sample: (B, ...) the latent at the next timestep.
        pred_window_end: (B, ...) the end of the current window the prediction implies
            (z + (t_e - t) v): a preview of where this window's straight segment leads.
    """

    prev_sample: torch.Tensor
    pred_window_end: torch.Tensor | None = None


def perflow_time_points(num_inference_steps: int, num_windows: int) -> np.ndarray:
    """The sampling times t (float64, decreasing from 1) of docs/method.md §4, including the n < K rule.

    The window edges are computed as the official scheduler computes them, t_s = (K - k) / K and
    t_e = (K - k - 1) / K (not 1 - k / K, which can differ in the last bit), so that the points are
    bit-identical to its ``np.linspace`` points.
    """
    n, K = int(num_inference_steps), int(num_windows)
    if n < K:
        return np.linspace(1.0, 0.0, n, endpoint=False)
    points = []
    for k in range(K):
        m = n // K + (1 if k < n % K else 0)
        t_s, t_e = (K - k) / K, (K - k - 1) / K
        points.append(np.linspace(t_s, t_e, m, endpoint=False))
    return np.concatenate(points)


def perflow_timesteps(
    num_inference_steps: int, num_windows: int, num_train_timesteps: int = 1000
) -> np.ndarray:
    """The integer timesteps of ``set_timesteps`` (int64, decreasing from N): the official PeRFlow rule.

    ``(perflow_time_points(n, K) * N).astype(int64)``: plain truncation of the float64 points, with none
    of the slack ``time_windows.timestep_of_time`` allows for float32 training draws. So a point that
    float64 puts just below a round value goes one down: K = 1, n = 5 gives [1000, 800, 600, 399, 199]
    (numpy's 1 + 3 * (-0.2) is 0.3999... in float64). Truncation never raises a timestep above its
    point, so each one stays in the window it was generated in (checked in tests/test_scheduler.py).
    """
    return sampling_timestep_of_time(
        perflow_time_points(num_inference_steps, num_windows), num_train_timesteps
    )


def _is_perflow_config(config: dict) -> bool:
    """Whether a scheduler config was written by / for a PeRFlowScheduler (ours or the released one)."""
    return config.get("_class_name") == "PeRFlowScheduler" or "num_time_windows" in config


class PeRFlowScheduler(SchedulerMixin, ConfigMixin):
    """Piecewise rectified flow sampler (Euler on the per-window straight velocity field).

    Args:
        num_train_timesteps: N, the teacher's number of diffusion steps.
        beta_start, beta_end, beta_schedule, trained_betas: the teacher's noise schedule (abar is needed
            at the window edges). AnimateDiff motion modules use ``linear``, SD ``scaled_linear``.
        set_alpha_to_one: accepted for config compatibility with released checkpoints; PeRFlow's last
            window always ends at abar[0] (docs/method.md §1), so it has no effect.
        prediction_type: ``ddim_eps`` (B), ``diff_eps`` (A; legacy name ``epsilon``) or ``velocity``.
        t_noise, t_clean: the time interval; PeRFlow uses [1, 0] (other values are rejected).
        num_time_windows: K.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        set_alpha_to_one: bool = False,
        prediction_type: str = "ddim_eps",
        t_noise: float = 1.0,
        t_clean: float = 0.0,
        num_time_windows: int = 4,
    ):
        if float(t_noise) != 1.0 or float(t_clean) != 0.0:
            raise ValueError(f"PeRFlow uses t_noise=1, t_clean=0; got t_noise={t_noise}, t_clean={t_clean}")
        if int(num_time_windows) < 1:
            raise ValueError(f"num_time_windows must be >= 1, got {num_time_windows}")
        canonical = canonical_prediction_type(prediction_type)
        if canonical != prediction_type:
            self.register_to_config(prediction_type=canonical)
        self.parameterization = get_parameterization(canonical)
        self.alphas_cumprod = make_alphas_cumprod(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas
        )
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None
        # Placeholder until set_timesteps (step() refuses to run before it): one step per window.
        self.timesteps = torch.from_numpy(
            perflow_timesteps(num_time_windows, num_time_windows, num_train_timesteps)
        )

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_config``, refusing to guess the parameterization from a foreign config.

        A non-PeRFlow config (a teacher's DDIM / PNDM / Euler ... config) must be converted with an
        explicit ``prediction_type=`` (``ddim_eps``, ``diff_eps`` or ``velocity``): its own
        ``prediction_type`` describes the teacher, and inheriting ``"epsilon"`` would silently make a
        ``ddim_eps`` student a ``diff_eps`` one. PeRFlow configs keep their own value (legacy
        ``"epsilon"`` = ``diff_eps``).

        Raises:
            ValueError: non-PeRFlow config and no ``prediction_type`` given.
        """
        if kwargs.get("prediction_type", "") is None:
            kwargs.pop("prediction_type")
        if isinstance(config, dict) and "prediction_type" not in kwargs and not _is_perflow_config(config):
            source = config.get("_class_name") or "non-PeRFlow scheduler"
            raise ValueError(
                f"PeRFlowScheduler.from_config: this is a {source} config (prediction_type="
                f"{config.get('prediction_type')!r} describes the teacher, not the PeRFlow student). "
                "Name the student's parameterization: from_config(config, prediction_type='ddim_eps' | "
                "'diff_eps' | 'velocity', num_time_windows=K) — e.g. 'ddim_eps' for AnimateDiff and SDXL, "
                "'diff_eps' for the released PeRFlow-SD1.5, 'velocity' for SD2.1 (docs/method.md §6, §7)."
            )
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def scale_model_input(
        self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """PeRFlow does not rescale the model input."""
        return sample

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Place ``num_inference_steps`` sampling points on the K windows (see the module docstring)."""
        n, K, N = int(num_inference_steps), self.config.num_time_windows, self.config.num_train_timesteps
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {n}")
        if n > N:
            raise ValueError(f"num_inference_steps={n} exceeds num_train_timesteps={N}")
        if n < K:
            logger.warning(
                "PeRFlowScheduler: %d steps < %d time windows; running %d Euler steps that cross window "
                "edges (lower quality than %d steps).",
                n,
                K,
                n,
                K,
            )
        taus = torch.from_numpy(perflow_timesteps(n, K, N))
        if torch.unique(taus).numel() != taus.numel():
            raise ValueError(f"{n} steps over {K} windows put two steps on the same integer timestep")
        self.num_inference_steps = n
        self.timesteps = taus.to(device)
        self._step_index = None
        self._begin_index = None

    @property
    def step_index(self) -> int | None:
        """Index into ``timesteps`` of the next ``step`` (None before the first one)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Index of the first timestep to step, as set by a pipeline with ``set_begin_index`` (else None)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start sampling at ``timesteps[begin_index]`` (img2img / video-to-video pipelines call it)."""
        if self.num_inference_steps is not None and not 0 <= int(begin_index) < len(self.timesteps):
            raise ValueError(f"begin_index {begin_index} out of range for {len(self.timesteps)} timesteps")
        self._begin_index = int(begin_index)

    def index_for_timestep(self, timestep: int | torch.Tensor) -> int:
        """Position of a timestep in ``timesteps`` (they are unique, so its value names its step)."""
        tau = int(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)
        hits = (self.timesteps.cpu() == tau).nonzero()
        if hits.numel() == 0:
            raise ValueError(
                f"timestep {tau} is not one of the scheduler's timesteps {self.timesteps.tolist()}"
            )
        return int(hits[0])

    def _init_step_index(self, timestep: int | torch.Tensor) -> None:
        if self._begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _index_of(self, timestep: int | torch.Tensor) -> int:
        """The step index for ``timestep``: the tracked ``step_index`` (started from ``begin_index`` or the
        first timestep), re-synchronised by value if the caller stepped another timestep."""
        if self._step_index is None:
            self._init_step_index(timestep)
        idx = self._step_index
        tau = int(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)
        if not (0 <= idx < len(self.timesteps) and int(self.timesteps[idx]) == tau):
            idx = self.index_for_timestep(timestep)
        return idx

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> PeRFlowSchedulerOutput | tuple:
        """Advance ``sample`` from ``timestep`` to the next scheduled timestep (docs/method.md §4).

        Args:
            model_output: (B, ...) the student's (guided) prediction: eps or v per ``prediction_type``.
            timestep: the current timestep, one of ``self.timesteps``.
            sample: (B, ...) the current latent z_t.
        """
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps(num_inference_steps) before step()")
        idx = self._index_of(timestep)
        N, K = self.config.num_train_timesteps, self.config.num_time_windows
        tau = self.timesteps[idx].cpu()
        tau_next = self.timesteps[idx + 1].cpu() if idx + 1 < len(self.timesteps) else torch.tensor(0)

        t = time_of_timestep(tau.reshape(1), N)
        t_s, t_e = window_of_time(t, K, N)
        abar_s, abar_e = (
            abar_at(t_s, self.alphas_cumprod).double(),
            abar_at(t_e, self.alphas_cumprod).double(),
        )
        # Window quantities in float64, the latent update in the sample's dtype.
        v = self.parameterization.velocity(
            model_output.double(), sample.double(), t, t_s, t_e, abar_s, abar_e
        )
        dt = float(tau_next - tau) / N
        prev_sample = (sample.double() + dt * v).to(sample.dtype)
        window_end = (sample.double() + float(t_e - t) * v).to(sample.dtype)
        self._step_index = idx + 1
        if not return_dict:
            return (prev_sample,)
        return PeRFlowSchedulerOutput(prev_sample=prev_sample, pred_window_end=window_end)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """The teacher's marginal at t = tau / N: ``sqrt(abar[tau - 1]) z_0 + sqrt(1 - abar[tau - 1]) eps``.

        abar index ``tau - 1`` (clamped to 0), docs/method.md §1. At a window start t_s this is the z_s of
        Algorithm 1 step 3, the latent the student was trained on there (see the module docstring for
        video-to-video). ``timesteps``: one per sample along the first axis, or one for all; the
        coefficients are computed in float64 and cast to the samples' dtype.
        """
        taus = torch.as_tensor(timesteps).reshape(-1).cpu()
        if taus.numel() == 0:
            raise ValueError("add_noise: no timestep given (a strength that keeps no sampling step?)")
        t = time_of_timestep(taus, self.config.num_train_timesteps)
        abar = abar_at(t, self.alphas_cumprod).double()
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        kw = {"device": original_samples.device, "dtype": original_samples.dtype}
        signal, sigma = abar.sqrt().reshape(shape).to(**kw), (1.0 - abar).sqrt().reshape(shape).to(**kw)
        return signal * original_samples + sigma * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def perflow_scheduler_for(
    teacher_scheduler_config: dict, parameterization: str, num_windows: int
) -> PeRFlowScheduler:
    """A PeRFlowScheduler on the teacher's own noise schedule (e.g. AnimateDiff's linear betas).

    Raises:
        ConfigError: the teacher's schedule is rescaled to zero terminal SNR (not supported yet; its betas alone
            would give the wrong schedule).
    """
    reason = unsupported_schedule_reason(teacher_scheduler_config)
    if reason:
        raise ConfigError(reason)
    return PeRFlowScheduler.from_config(
        teacher_scheduler_config, prediction_type=parameterization, num_time_windows=num_windows
    )
