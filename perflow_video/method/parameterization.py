"""PeRFlow parameterizations (paper eq. 3-8): how a network output becomes the window's velocity.

Inside window [t_s, t_e] the reflowed trajectory is the straight segment z_s -> z_e. The eps-type
parameterizations write its end as ``z_e = lambda_k z_s + eta_k eps`` (docs/method.md §2):

=============  =====  =======================  ==========================================================
config value   paper  lambda_k                 eta_k
=============  =====  =======================  ==========================================================
``diff_eps``   eq. 7  sqrt(abar_e / abar_s)    -sqrt(abar_e / abar_s - 1)
``ddim_eps``   eq. 8  sqrt(abar_e / abar_s)    sqrt(1 - abar_e) - sqrt(abar_e (1 - abar_s) / abar_s)
``velocity``   eq. 3  (network predicts v directly)
=============  =====  =======================  ==========================================================

With ``ddim_eps`` one step per window is exactly a DDIM step with the predicted eps.
All window-level arguments (t, t_s, t_e, abar_s, abar_e) are tensors of shape (B,) (or scalars)
and broadcast over the latent dimensions, so 4-D images and 5-D videos are handled alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal, get_args

import torch
from torch import Tensor

PredictionType = Literal["ddim_eps", "diff_eps", "velocity"]  # B (eq. 8), A (eq. 7), velocity (eq. 3)
PREDICTION_TYPES: tuple[str, ...] = get_args(PredictionType)
# Released PeRFlow checkpoints of the first version wrote "epsilon" for parameterization A.
LEGACY_PREDICTION_TYPES = {"epsilon": "diff_eps"}


def expand_like(x: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a per-sample (B,) tensor or a scalar to the shape of ``like`` (B, ...)."""
    x = torch.as_tensor(x, device=like.device, dtype=like.dtype)
    return x.reshape(x.shape + (1,) * (like.ndim - x.ndim))


def lambda_eta_diff_eps(abar_s: Tensor, abar_e: Tensor) -> tuple[Tensor, Tensor]:
    """Parameterization A, paper eq. 7: lambda_k = sqrt(abar_e/abar_s), eta_k = -sqrt(abar_e/abar_s - 1)."""
    ratio = abar_e / abar_s
    return ratio.sqrt(), -(ratio - 1.0).sqrt()


def lambda_eta_ddim_eps(abar_s: Tensor, abar_e: Tensor) -> tuple[Tensor, Tensor]:
    """Parameterization B, paper eq. 8: the DDIM step abar_s -> abar_e written as lambda_k z_s + eta_k eps."""
    lambda_k = (abar_e / abar_s).sqrt()
    eta_k = (1.0 - abar_e).sqrt() - (abar_e * (1.0 - abar_s) / abar_s).sqrt()
    return lambda_k, eta_k


def velocity_denominator(t: Tensor, t_s: Tensor, t_e: Tensor, lambda_k: Tensor) -> Tensor:
    """D = t - t_e + lambda_k t_s - lambda_k t, the denominator of paper eq. 6."""
    return t - t_e + lambda_k * t_s - lambda_k * t


def eps_to_velocity(
    eps: Tensor, z_t: Tensor, t: Tensor, t_s: Tensor, t_e: Tensor, lambda_k: Tensor, eta_k: Tensor
) -> Tensor:
    """Paper eq. 6: v(z_t, t) = ((1 - lambda_k) z_t - eta_k eps) / (t - t_e + lambda_k t_s - lambda_k t).

    Args:
        eps, z_t: (B, ...) prediction and current latent.
        t, t_s, t_e, lambda_k, eta_k: (B,) or scalars.
    Returns:
        v: (B, ...), with the convention z(t + dt) = z(t) + dt v (dt < 0 towards data).
    """
    d = expand_like(velocity_denominator(t, t_s, t_e, lambda_k), z_t)
    return ((1.0 - expand_like(lambda_k, z_t)) * z_t - expand_like(eta_k, z_t) * eps) / d


def velocity_to_eps(
    v: Tensor, z_t: Tensor, t: Tensor, t_s: Tensor, t_e: Tensor, lambda_k: Tensor, eta_k: Tensor
) -> Tensor:
    """Inverse of :func:`eps_to_velocity` (paper eq. 6 solved for eps)."""
    d = expand_like(velocity_denominator(t, t_s, t_e, lambda_k), z_t)
    return ((1.0 - expand_like(lambda_k, z_t)) * z_t - d * v) / expand_like(eta_k, z_t)


def eps_target(z_s: Tensor, z_e: Tensor, lambda_k: Tensor, eta_k: Tensor) -> Tensor:
    """Training target of the eps types (Algorithm 1): eps* = (z_e - lambda_k z_s) / eta_k."""
    return (z_e - expand_like(lambda_k, z_s) * z_s) / expand_like(eta_k, z_s)


def velocity_target(z_s: Tensor, z_e: Tensor, t_s: Tensor, t_e: Tensor) -> Tensor:
    """Training target of the velocity type (paper eq. 3): v* = (z_e - z_s) / (t_e - t_s)."""
    return (z_e - z_s) / expand_like(t_e - t_s, z_s)


class Parameterization(ABC):
    """What the student predicts inside a window, and how that becomes a velocity.

    Window quantities are (B,) tensors: t (current time), t_s / t_e (window start / end),
    abar_s / abar_e (the teacher's abar at the window edges).
    """

    name: str

    @abstractmethod
    def velocity(
        self,
        prediction: Tensor,
        z_t: Tensor,
        t: Tensor,
        t_s: Tensor,
        t_e: Tensor,
        abar_s: Tensor,
        abar_e: Tensor,
    ) -> Tensor:
        """Velocity (B, ...) of the window's straight segment implied by the network output."""

    @abstractmethod
    def target(
        self, z_s: Tensor, z_e: Tensor, t_s: Tensor, t_e: Tensor, abar_s: Tensor, abar_e: Tensor
    ) -> Tensor:
        """The regression target (B, ...) that makes the prediction reproduce the segment z_s -> z_e."""

    @abstractmethod
    def endpoint_sensitivity(
        self, t: Tensor, t_s: Tensor, t_e: Tensor, abar_s: Tensor, abar_e: Tensor
    ) -> Tensor:
        """d z_e_hat / d prediction, (B,): how much a prediction error moves the implied window end.

        z_e_hat = z_t + (t_e - t) v. Its square is the "endpoint" loss weight.
        """


class EpsParameterization(Parameterization):
    """Parameterizations A (``diff_eps``, eq. 7) and B (``ddim_eps``, eq. 8): the network predicts eps."""

    def __init__(self, name: str):
        if name not in ("diff_eps", "ddim_eps"):
            raise ValueError(f"not an eps parameterization: {name!r}")
        self.name = name
        self._coefficients = lambda_eta_diff_eps if name == "diff_eps" else lambda_eta_ddim_eps

    def lambda_eta(self, abar_s: Tensor, abar_e: Tensor) -> tuple[Tensor, Tensor]:
        """(lambda_k, eta_k) of the window with edge values abar_s, abar_e."""
        return self._coefficients(abar_s, abar_e)

    def velocity(self, prediction, z_t, t, t_s, t_e, abar_s, abar_e):
        lambda_k, eta_k = self.lambda_eta(abar_s, abar_e)
        return eps_to_velocity(prediction, z_t, t, t_s, t_e, lambda_k, eta_k)

    def target(self, z_s, z_e, t_s, t_e, abar_s, abar_e):
        lambda_k, eta_k = self.lambda_eta(abar_s, abar_e)
        return eps_target(z_s, z_e, lambda_k, eta_k)

    def endpoint_sensitivity(self, t, t_s, t_e, abar_s, abar_e):
        # eta_t of eq. 6: z_e_hat = lambda_t z_t + eta_t eps with eta_t = -eta_k (t_e - t) / D.
        lambda_k, eta_k = self.lambda_eta(abar_s, abar_e)
        return -eta_k * (t_e - t) / velocity_denominator(t, t_s, t_e, lambda_k)


class VelocityParameterization(Parameterization):
    """Paper eq. 3: the network predicts the window velocity v directly (PeRFlow for SD2.1)."""

    name = "velocity"

    def velocity(self, prediction, z_t, t, t_s, t_e, abar_s, abar_e):
        return prediction

    def target(self, z_s, z_e, t_s, t_e, abar_s, abar_e):
        return velocity_target(z_s, z_e, t_s, t_e)

    def endpoint_sensitivity(self, t, t_s, t_e, abar_s, abar_e):
        return t_e - t


def canonical_prediction_type(name: str) -> str:
    """Map a config value (including the legacy ``epsilon``) to one of :data:`PREDICTION_TYPES`."""
    name = LEGACY_PREDICTION_TYPES.get(name, name)
    if name not in PREDICTION_TYPES:
        hint = ""
        if name == "v_prediction":
            hint = " ('v_prediction' is a teacher type; PeRFlow students of v-teachers use 'velocity')"
        raise ValueError(f"unknown PeRFlow prediction_type {name!r}; choose one of {PREDICTION_TYPES}{hint}")
    return name


def get_parameterization(name: str) -> Parameterization:
    """Factory: ``ddim_eps`` | ``diff_eps`` | ``velocity`` (or legacy ``epsilon``)."""
    name = canonical_prediction_type(name)
    return VelocityParameterization() if name == "velocity" else EpsParameterization(name)
