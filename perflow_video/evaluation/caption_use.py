"""How much a tiny shape-world teacher uses each word of its caption (docs/tiny_teacher.md, sixth session).

Three measurements per attribute (colour, shape, direction), each comparing a caption with the same caption
whose one word is swapped (red <-> blue, circle <-> square, left <-> right):

* :func:`padding_difference` - mean norm of the text encoder's hidden-state difference at the positions
  after the caption's last word (EOS and 70 padding positions of CLIP's 77, what cross-attention reads most);
* :func:`epsilon_change` - RMS change of the UNet's epsilon from the same noisy latents at a timestep;
* :func:`swap_loss_gap` - the epsilon loss on noised shape-world clips with the swapped captions minus with
  the right ones (> 0: the UNet uses the word the right way);

and :func:`probe_samples`: the pixel probe's accuracy on the teacher's own DDIM samples with guidance;
:func:`opposite_word_samples`: the directions read from clips sampled from the *same* noise with opposite
direction words (a teacher that follows the word reads them opposite; one whose path is fixed by the noise
reads them equal).

:func:`x0_from_noise` and :func:`centroid_track_slope` ask whether the teacher knows the direction where
sampling decides it, at the first steps: the slope of the decoded x0 prediction's centroid track from pure
noise, along the caption's direction. The data's mean clip per direction moves ~0.9 px / frame (a clip moving left
starts on the right); a teacher that ignores the word predicts the same track for every direction.

:func:`relative_x0_error` measures how much of a clip the first timesteps still hold: the x0 error of the
teacher's prediction from *noised clips* at a high t, relative to the clips' variance, with their own captions
and with other clips' (docs/tiny_teacher.md, the non-zero terminal SNR leak). Below the error of the data's mean
clip with the *other* captions, the teacher reads the clip out of z_t, which pure noise at sampling does not hold.

:func:`frame_order_change` asks whether the motion modules can express a direction at all: how much the
epsilon changes when the clip's frames are reordered (and the output ordered back). A UNet that treats frames
independently changes by 0 under any order; one whose motion modules are symmetric in time changes by 0
under reversal. Left and right (up and down) are each other's time reversal, so a reversal-symmetric UNet
cannot tell them apart, whatever the caption says.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from torch import Tensor

from perflow_video.evaluation.evidence_models import Teacher
from perflow_video.evaluation.sampling import sample_latents
from perflow_video.method.teacher_solver import x0_from_model_output
from perflow_video.tiny.teacher_training import prediction_errors
from perflow_video.toy.probe import axis_accuracy, probe_accuracy, probe_clip
from perflow_video.toy.shape_world import DIRECTION_VECTORS, ShapeWorld, parse_prompt, prompt_of
from perflow_video.toy.toy_clips import BACKGROUND

__all__ = [
    "SWAPS",
    "relative_x0_error",
    "centroid_track_slope",
    "epsilon_change",
    "frame_order_change",
    "opposite_word_samples",
    "padding_difference",
    "probe_samples",
    "swap_caption",
    "swap_loss_gap",
    "validation_latents",
    "x0_from_noise",
]

#: The word each attribute's swap puts in place of each word (colours and directions in pairs; shapes in a
#: cycle circle -> square -> circle, triangle -> circle). ``direction`` swaps a direction for its opposite
#: (the same clip played backwards), ``axis`` for one at right angles (not a time reversal).
SWAPS: dict[str, dict[str, str]] = {
    "colour": {"red": "blue", "blue": "red", "green": "yellow", "yellow": "green", "purple": "white",
               "white": "purple"},
    "shape": {"circle": "square", "square": "circle", "triangle": "circle"},
    "direction": {"left": "right", "right": "left", "up": "down", "down": "up"},
    "axis": {"left": "up", "up": "left", "right": "down", "down": "right"},
}  # fmt: skip


def swap_caption(prompt: str, attribute: str) -> str:
    """``prompt`` with its ``attribute`` word exchanged as :data:`SWAPS` says."""
    color, shape, direction = parse_prompt(prompt)
    table = SWAPS[attribute]
    if attribute == "colour":
        return prompt_of(table[color], shape, direction)
    if attribute == "shape":
        return prompt_of(color, table[shape], direction)
    return prompt_of(color, shape, table[direction])  # direction, axis


def padding_difference(hidden_a: Tensor, hidden_b: Tensor, first_position: int) -> float:
    """Mean over positions ``>= first_position`` of ||hidden_a - hidden_b|| ((L, D) or (B, L, D))."""
    return (hidden_a - hidden_b)[..., first_position:, :].norm(dim=-1).mean().item()


@torch.no_grad()
def epsilon_change(unet: torch.nn.Module, z_t: Tensor, t: int, hidden_a: Tensor, hidden_b: Tensor) -> float:
    """RMS of eps(z_t, t, hidden_b) - eps(z_t, t, hidden_a); ``z_t`` (B, C, F, h, w), hidden (B, L, D)."""
    frames = z_t.shape[2]
    steps = torch.full((z_t.shape[0],), t)
    eps_a = unet(z_t, steps, encoder_hidden_states=hidden_a.repeat_interleave(frames, dim=0)).sample
    eps_b = unet(z_t, steps, encoder_hidden_states=hidden_b.repeat_interleave(frames, dim=0)).sample
    return (eps_b - eps_a).pow(2).mean().sqrt().item()


@torch.no_grad()
def frame_order_change(unet: torch.nn.Module, z_t: Tensor, t: int, hidden: Tensor, order: Tensor) -> float:
    """RMS of eps(z_t) - eps(z_t[order])[order^-1] over frames (dim 2 of ``z_t``, (B, C, F, h, w)); hidden
    (B, L, D). 0 for a UNet equivariant to that reordering of the frames."""
    frames = z_t.shape[2]
    steps = torch.full((z_t.shape[0],), t)
    cond = hidden.repeat_interleave(frames, dim=0)
    eps = unet(z_t, steps, encoder_hidden_states=cond).sample
    eps_reordered = unet(z_t[:, :, order], steps, encoder_hidden_states=cond).sample[:, :, order.argsort()]
    return (eps - eps_reordered).pow(2).mean().sqrt().item()


@torch.no_grad()
def relative_x0_error(
    unet: torch.nn.Module,
    z0: Tensor,
    noise: Tensor,
    t: int,
    hidden: Tensor,
    alphas_cumprod: Tensor,
    prediction_type: str,
) -> float:
    """mean |x0_hat - z0|^2 / var(z0) of the prediction from z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) noise at
    timestep ``t`` (one for all clips), captions ``hidden`` (B, L, D); ``prediction_type``: the teacher's."""
    frames, a = z0.shape[2], alphas_cumprod[torch.full((z0.shape[0],), t)]
    z_t = a.sqrt().view(-1, 1, 1, 1, 1) * z0 + (1 - a).sqrt().view(-1, 1, 1, 1, 1) * noise
    out = unet(z_t, torch.full((z0.shape[0],), t), encoder_hidden_states=hidden.repeat_interleave(frames, 0))
    x0 = x0_from_model_output(out.sample, z_t, a, prediction_type)
    return ((x0 - z0).pow(2).mean() / z0.var()).item()


@torch.no_grad()
def swap_loss_gap(
    unet: torch.nn.Module,
    z0: Tensor,
    noise: Tensor,
    t: Tensor,
    hidden_right: Tensor,
    hidden_swapped: Tensor,
    alphas_cumprod: Tensor,
    prediction_type: str,
) -> float:
    """Mean training loss (the teacher's ``prediction_type``: epsilon or v) with the swapped captions minus
    with the right ones, on latent clips ``z0``."""
    frames = z0.shape[2]
    losses = [
        prediction_errors(
            unet, z0, noise, t, hidden.repeat_interleave(frames, dim=0), alphas_cumprod, prediction_type
        ).mean()
        for hidden in (hidden_right, hidden_swapped)
    ]
    return (losses[1] - losses[0]).item()


@torch.no_grad()
def validation_latents(
    vae: torch.nn.Module, world: ShapeWorld, n: int, gen: torch.Generator
) -> tuple[Tensor, list[str]]:
    """The first ``n`` clips of ``world`` as scaled VAE latents (n, C, F, h, w) (posterior samples from
    ``gen``), with their captions (never dropped)."""
    clips = torch.stack([world.clip(i) for i in range(n)])  # (n, 3, F, H, W)
    frames = clips.permute(0, 2, 1, 3, 4).flatten(0, 1)
    z0 = vae.encode(frames).latent_dist.sample(generator=gen) * vae.config.scaling_factor
    return z0.unflatten(0, (n, clips.shape[2])).permute(0, 2, 1, 3, 4), [
        world.spec(i).prompt for i in range(n)
    ]


@torch.no_grad()
def probe_samples(
    teacher: Teacher, prompts: list[str], steps: int, guidance: float, seed: int
) -> dict[str, float]:
    """Probe accuracy (colour, shape, direction, all, and the direction's axis alone) of the teacher's
    ``steps``-step DDIM clips of ``prompts`` with CFG ``guidance`` (its own scheduler config), one seeded noise
    per prompt."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(prompts), *teacher.latent_shape()), generator=g)
    scheduler = DDIMScheduler.from_config(teacher.scheduler_config)
    uncond = teacher.conditioning([""] * len(prompts)) if guidance != 1.0 else None
    z = sample_latents(teacher.unet, scheduler, noise, teacher.conditioning(prompts), uncond, steps, guidance)
    clips = list(teacher.decode(z))
    return {**probe_accuracy(clips, prompts), "axis": axis_accuracy(clips, prompts)}


def centroid_track_slope(clips: Tensor, directions: list[str]) -> Tensor:
    """Per clip, the least-squares slope (pixels per frame) of its centroid track along its direction.

    ``clips`` (N, 3, F, H, W) in [-1, 1]; each pixel weighs its RGB distance from the background above the
    frame's median distance (so a blurry mean clip has a centroid too). > 0: the mass moves the named way.
    """
    background = torch.tensor(BACKGROUND, dtype=clips.dtype).view(1, 3, 1, 1, 1) / 127.5 - 1
    dist = (clips - background).norm(dim=1)  # (N, F, H, W)
    mass = (dist - dist.flatten(2).median(dim=2).values[..., None, None]).clamp(min=0) + 1e-8
    size_y, size_x = mass.shape[-2:]
    ys = torch.arange(size_y, dtype=clips.dtype).view(1, 1, -1, 1)
    xs = torch.arange(size_x, dtype=clips.dtype).view(1, 1, 1, -1)
    total = mass.sum(dim=(2, 3))
    cy, cx = (mass * ys).sum(dim=(2, 3)) / total, (mass * xs).sum(dim=(2, 3)) / total  # (N, F)
    unit = torch.tensor([DIRECTION_VECTORS[d] for d in directions], dtype=clips.dtype)  # (N, 2): (dy, dx)
    along = cy * unit[:, :1] + cx * unit[:, 1:]
    f = torch.arange(along.shape[1], dtype=clips.dtype)
    f = f - f.mean()
    return (f * (along - along.mean(dim=1, keepdim=True))).sum(dim=1) / (f * f).sum()


@torch.no_grad()
def x0_from_noise(
    unet: torch.nn.Module,
    noise: Tensor,
    t: int,
    hidden: Tensor,
    hidden_empty: Tensor,
    guidance: float,
    alphas_cumprod: Tensor,
    prediction_type: str,
) -> Tensor:
    """The UNet's (guided) x0 prediction when ``noise`` (B, C, F, h, w) is taken as z_t at timestep ``t`` -
    what the first sampling step aims at. hidden, hidden_empty (B, L, D); ``prediction_type``: the
    teacher's (the guidance acts on its output, epsilon or v, as a sampler's does)."""
    frames = noise.shape[2]
    steps = torch.full((noise.shape[0],), t)
    eps = unet(noise, steps, encoder_hidden_states=hidden.repeat_interleave(frames, dim=0)).sample
    if guidance != 1.0:
        eps_u = unet(noise, steps, encoder_hidden_states=hidden_empty.repeat_interleave(frames, dim=0)).sample
        eps = eps_u + guidance * (eps - eps_u)
    return x0_from_model_output(eps, noise, alphas_cumprod[steps], prediction_type)


@torch.no_grad()
def opposite_word_samples(
    teacher: Teacher,
    prompts: list[str],
    steps: int,
    guidance: float,
    seed: int,
    start_signal: dict[str, Tensor] | None = None,
) -> dict[str, int]:
    """Samples each caption and its opposite-direction twin (:data:`SWAPS`) from the same seeded noise
    (``steps``-step DDIM, CFG ``guidance``) and counts the pairs whose read directions are equal (``same``)
    and those where both match their own word (``both_follow``).

    With ``start_signal`` (a latent clip (C, F, h, w) per direction word), the start is not pure noise but
    what a noised training clip is at the first timestep: sqrt(abar) * start_signal[word] + sqrt(1 - abar) *
    noise - does the teacher follow the word once the start holds it?"""
    noise = torch.randn(
        (len(prompts), *teacher.latent_shape()), generator=torch.Generator().manual_seed(seed)
    )
    uncond = teacher.conditioning([""] * len(prompts)) if guidance != 1.0 else None
    twins = [swap_caption(p, "direction") for p in prompts]
    reads = []
    for captions in (prompts, twins):
        scheduler = DDIMScheduler.from_config(teacher.scheduler_config)
        start = noise
        if start_signal is not None:
            scheduler.set_timesteps(steps)
            a = scheduler.alphas_cumprod[scheduler.timesteps[0]]
            signal = torch.stack([start_signal[parse_prompt(c)[2]] for c in captions])
            start = a.sqrt() * signal + (1 - a).sqrt() * noise
        z = sample_latents(
            teacher.unet, scheduler, start, teacher.conditioning(captions), uncond, steps, guidance
        )
        reads.append([probe_clip(c).direction for c in teacher.decode(z)])
    same = sum(a == b for a, b in zip(*reads, strict=True))
    follow = sum(
        a == parse_prompt(p)[2] and b == parse_prompt(q)[2]
        for a, b, p, q in zip(*reads, prompts, twins, strict=True)
    )
    return {"pairs": len(prompts), "same": same, "both_follow": follow}
