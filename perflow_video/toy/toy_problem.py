"""A toy problem where PeRFlow must win: a 2-D Gaussian mixture with a closed-form teacher.

The teacher is the exact eps-predictor of a Gaussian mixture diffused with SD's noise schedule, so its
many-step DDIM endpoints are the ground truth a 4-step sampler should reach from the same noise. The
student is a small MLP trained with the project's own reflow objective (``reflow_loss``) and sampled
with the project's ``PeRFlowScheduler`` — the same code paths as the real models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from perflow_video.method.noise_schedule import make_alphas_cumprod
from perflow_video.method.reflow_objective import ReflowConfig, reflow_loss
from perflow_video.method.teacher_solver import Conditioning, solve_window, unet_output
from perflow_video.scheduler import PeRFlowScheduler


@dataclass
class GaussianMixture:
    """Isotropic Gaussian mixture data: ``means`` (M, D), common ``std``, uniform weights."""

    means: Tensor
    std: float

    @staticmethod
    def ring(num_modes: int = 8, radius: float = 1.5, std: float = 0.15, dim: int = 2) -> GaussianMixture:
        """Modes evenly spaced on a circle in the first two coordinates (a classic hard case for few steps)."""
        angles = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
        means = torch.zeros(num_modes, dim, dtype=torch.float64)
        means[:, 0], means[:, 1] = radius * angles.cos(), radius * angles.sin()
        return GaussianMixture(means, std)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        idx = torch.randint(0, self.means.shape[0], (n,), generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return self.means[idx] + self.std * noise


class MixtureTeacher(nn.Module):
    """Exact eps(z, i) = -sqrt(1 - abar_i) * score of the diffused mixture; called like a diffusers UNet."""

    def __init__(self, mixture: GaussianMixture, alphas_cumprod: Tensor):
        super().__init__()
        self.register_buffer("means", mixture.means.clone())
        self.std = mixture.std
        self.register_buffer("alphas_cumprod", alphas_cumprod.double())

    def forward(
        self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor | None = None
    ) -> Tensor:
        a = self.alphas_cumprod[timestep.long().reshape(-1).expand(sample.shape[0])].to(sample.dtype)[:, None]
        var = a * self.std**2 + (1.0 - a)  # (B, 1), variance of every diffused component
        centered = sample[:, None, :] - a.sqrt()[:, :, None] * self.means[None].to(sample.dtype)  # (B, M, D)
        logits = -0.5 * (centered**2).sum(-1) / var  # equal variances: the normaliser cancels
        resp = torch.softmax(logits, dim=1)  # (B, M)
        score = -(resp[:, :, None] * centered).sum(1) / var
        return -(1.0 - a).sqrt() * score


class TeacherAsStudent(nn.Module):
    """A teacher evaluated at the student's timestep convention (tau = 1000 t -> index tau - 1): the
    untrained PeRFlow student, for identity tests. Rounds float timesteps from the objective."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher

    def forward(
        self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor | None = None
    ) -> Tensor:
        return self.teacher(
            sample, (timestep.reshape(-1).round().long() - 1).clamp(min=0), encoder_hidden_states
        )


def sd_teacher_scheduler(scheduler_cls, **options):
    """A diffusers scheduler on SD's schedule with "trailing" timesteps (the fair few-step baseline)."""
    return scheduler_cls(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        timestep_spacing="trailing",
        **options,
    )


class ToyStudent(nn.Module):
    """Small MLP eps/v-predictor with Fourier features of t = timestep / 1000; called like a UNet."""

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 3, num_freqs: int = 16):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1000.0), num_freqs)))
        layers: list[nn.Module] = [nn.Linear(dim + 2 * num_freqs, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(
        self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor | None = None
    ) -> Tensor:
        t = (timestep.to(sample.dtype).reshape(-1) / 1000.0).expand(sample.shape[0])
        angles = t[:, None] * self.freqs[None].to(sample.dtype)
        return self.net(torch.cat([sample, angles.sin(), angles.cos()], dim=1))


def sd_alphas_cumprod() -> Tensor:
    """SD 1.x's abar (scaled_linear 0.00085 -> 0.012, 1000 steps)."""
    return make_alphas_cumprod()


def fit_teacher_copy(
    student: nn.Module,
    teacher: MixtureTeacher,
    mixture: GaussianMixture,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
) -> None:
    """Make the student a copy of the teacher (regress the teacher's eps at the student's timestep 1000 t).

    PeRFlow starts the student from the teacher's weights; the toy teacher is analytic, so the copy is
    fitted instead. Deterministic given the generator.
    """
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    abar = teacher.alphas_cumprod
    for _ in range(steps):
        z_0 = mixture.sample(batch_size, generator)
        tau = torch.randint(1, abar.numel() + 1, (batch_size,), generator=generator)
        a = abar[tau - 1][:, None]
        z_t = a.sqrt() * z_0 + (1 - a).sqrt() * torch.randn(z_0.shape, generator=generator, dtype=z_0.dtype)
        target = teacher(z_t, tau - 1)
        loss = ((student(z_t.float(), tau.float()) - target.float()) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def train_toy_student(
    teacher: MixtureTeacher,
    mixture: GaussianMixture,
    config: ReflowConfig,
    steps: int = 2000,
    batch_size: int = 512,
    lr: float = 2e-3,
    seed: int = 0,
    hidden: int = 128,
    copy_steps: int = 1000,
) -> ToyStudent:
    """Train a ToyStudent with :func:`reflow_loss` (Adam, cosine decay). Deterministic given seed.

    Eps parameterizations start from a fitted copy of the teacher (``copy_steps``), as PeRFlow starts
    from the teacher's weights; ``velocity`` starts from scratch (the copy would predict eps).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    student = ToyStudent(dim=mixture.means.shape[1], hidden=hidden)  # float32: 5x faster than float64 on CPU
    if config.parameterization != "velocity" and copy_steps > 0:
        fit_teacher_copy(student, teacher, mixture, copy_steps, batch_size, lr, gen)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    cond = Conditioning()
    for _ in range(steps):
        z_0 = mixture.sample(batch_size, gen).float()
        out = reflow_loss(student, teacher, z_0, teacher.alphas_cumprod, config, cond, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
    return student


@torch.no_grad()
def sample_with_scheduler(model: nn.Module, scheduler, noise: Tensor, num_steps: int) -> Tensor:
    """Generic diffusers sampling loop (what a pipeline does) for a UNet-like model."""
    scheduler.set_timesteps(num_steps)
    z = noise * scheduler.init_noise_sigma
    dtype = next(iter(model.parameters()), noise).dtype  # run the model in its own precision
    for tau in scheduler.timesteps:
        out = unet_output(model(scheduler.scale_model_input(z, tau).to(dtype), tau.reshape(1)))
        z = scheduler.step(out.to(z.dtype), tau, z).prev_sample
    return z


def perflow_sample(student: nn.Module, noise: Tensor, num_steps: int, num_windows: int, prediction_type: str):
    """Sample a toy student with the project's PeRFlowScheduler."""
    scheduler = PeRFlowScheduler(num_time_windows=num_windows, prediction_type=prediction_type)
    return sample_with_scheduler(student, scheduler, noise, num_steps)


@torch.no_grad()
def reference_endpoints(teacher: MixtureTeacher, noise: Tensor, num_steps: int = 1000) -> Tensor:
    """The teacher's many-step DDIM endpoint from t = 1 to t = 0 (1000 steps = every discrete level)."""
    ones = torch.ones(noise.shape[0], dtype=torch.float64)
    return solve_window(
        teacher, noise, ones, 0 * ones, teacher.alphas_cumprod, Conditioning(), num_steps=num_steps
    )


def mean_distance(a: Tensor, b: Tensor) -> float:
    """Mean Euclidean distance between paired samples (B, D)."""
    return float((a - b).norm(dim=1).mean())
