"""Time windows and the one time convention of the project (docs/method.md §1).

* Continuous time t in [0, 1]; t = 1 is pure noise, t = 0 is data.
* K uniform windows; window k (k = 0 ... K-1, noisy -> clean) is [t_s, t_e] = [1 - k/K, 1 - (k+1)/K].
* A time belongs to the window whose start it equals or is below and whose end it is strictly above:
  t = 0.75 is in [0.75, 0.5] for K = 4.
* diffusers timestep of a time: tau = int(N t) (N = num_train_timesteps = 1000), so t = 1 -> 1000.
  This is the timestep the *student* is trained and sampled with (as in the reference implementation).
* abar at a time: abar[int(N t) - 1], clamped to index 0 at t = 0. The *teacher* network is evaluated
  at that same discrete index (the noise level it was trained on).

Every conversion between continuous time and diffusers' integer timesteps lives in this file: training
draws go through ``timestep_of_time`` (with a float slack, so a float32 draw of 0.75 is 750), the
sampler's float64 grid through ``sampling_timestep_of_time`` (plain truncation, the official rule).
"""

from __future__ import annotations

import numpy as np
import torch

# Float slack for "exact" grid values: 0.7 in float32 is 0.69999998808, and int(1000 * t) would say 699.
# One thousandth of a timestep is far below any real grid spacing.
_TIMESTEP_SLACK = 1e-3


def window_bounds(k: int, num_windows: int) -> tuple[float, float]:
    """[t_s, t_e] of window k (0 = the noisiest)."""
    if not 0 <= k < num_windows:
        raise ValueError(f"window index {k} out of range for {num_windows} windows")
    return 1.0 - k / num_windows, 1.0 - (k + 1) / num_windows


def window_index(t: torch.Tensor, num_windows: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Index of the window a time belongs to.

    A time within a tenth of a timestep above a window end counts as that end (it belongs to the next
    window), so that t recovered from an integer timestep never lands in the wrong window.

    Args:
        t: times in [0, 1], any shape.
    Returns:
        Long tensor of the same shape, values in [0, K-1].
    """
    slack = 0.1 / num_train_timesteps
    k = torch.floor(num_windows * (1.0 - t.double() + slack)).long()
    return k.clamp(0, num_windows - 1)


def window_of_time(
    t: torch.Tensor, num_windows: int, num_train_timesteps: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_s, t_e) of the window each time belongs to, same shape and dtype as t."""
    k = window_index(t, num_windows, num_train_timesteps).to(t.dtype)
    t_s = 1.0 - k / num_windows
    t_e = 1.0 - (k + 1) / num_windows
    return t_s, t_e


def timestep_of_time(t: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """diffusers timestep tau = int(N t) of a time (t = 1 -> N, t = 0 -> 0). Long tensor."""
    return torch.floor(t.double() * num_train_timesteps + _TIMESTEP_SLACK).long()


def sampling_timestep_of_time(t: np.ndarray, num_train_timesteps: int = 1000) -> np.ndarray:
    """The sampler's timesteps of float64 grid points: ``(N t).astype(int64)``, plain truncation.

    Exactly the official PeRFlow scheduler's rule, with none of ``timestep_of_time``'s slack: a point
    that float64 puts just below a round value goes one down (0.19999... -> 199), as released
    checkpoints were sampled (docs/method.md §4).
    """
    return (np.asarray(t, dtype=np.float64) * num_train_timesteps).astype(np.int64)


def time_of_timestep(tau: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Continuous time t = tau / N of a diffusers timestep (float64)."""
    return tau.double() / num_train_timesteps


def abar_index_of_time(t: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Index into alphas_cumprod of a time: int(N t) - 1, clamped to 0 (so t = 0 -> abar[0])."""
    return (timestep_of_time(t, num_train_timesteps) - 1).clamp(0, num_train_timesteps - 1)


def abar_at(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """abar(t) = alphas_cumprod[int(N t) - 1] (clamped at 0), same shape as t, dtype of alphas_cumprod."""
    idx = abar_index_of_time(t.cpu(), alphas_cumprod.numel())
    return alphas_cumprod.cpu()[idx].to(t.device)
