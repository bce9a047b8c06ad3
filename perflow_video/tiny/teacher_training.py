"""The pieces of the tiny teacher's training recipe that are math or weight surgery (``scripts/train_tiny_teacher.py``
runs the loop; ``docs/tiny_teacher.md`` says why each exists):

* :func:`prediction_errors` - the DDPM objective per sample (videos or images) for an epsilon or a v
  teacher, what every stage trains (:func:`prediction_target`: its target);
* :func:`terminal_x0_errors` - the x0 error of the UNet's prediction from *pure* noise near t = T: AnimateDiff's
  linear betas keep sqrt(abar_T) = 0.040 of the clip in z_T, so a model trained only on noised clips reads a
  clip out of the sampler's pure-noise start and fixes its path there, whatever the caption says (the
  non-zero terminal SNR flaw, docs/tiny_teacher.md); trained on pure noise, the first steps aim at the
  caption's mean clip instead;
* :func:`draw_timesteps` - uniform, or ``high`` (density rising linearly with t);
* :func:`video_loss_weights` - the epsilon loss turned into the x0 error where the noise dominates, capped;
* :func:`unet_param_groups` - the optimizer's UNet groups, the motion modules at their own learning rate
  when asked (they alone turn a caption's direction into motion);
* :func:`separate_word_embeddings` - re-draws caption words' input embeddings as orthogonal vectors, so words
  the encoder keeps too close to tell apart start with distinct hidden states;
* :class:`CaptionAttributeHead` / :func:`caption_attribute_loss` - linear read-outs of a caption's colour,
  shape and direction from the text encoder's hidden states at and after the direction word (EOS and padding,
  the positions the UNet's cross-attention reads most): a stand-in for the pre-training a real CLIP text
  encoder brings, which a tiny encoder trained from scratch lacks;
* :func:`reinit_motion_modules` - fresh motion modules with zeroed output projections, as AnimateDiff trains
  them on a frozen image model (the video UNet then equals the image UNet frame by frame);
* :func:`load_teacher_weights` - a teacher folder's text encoder and UNet + motion adapter, into models of
  the same :class:`~perflow_video.tiny.teacher_models.TeacherArch` (to continue training from it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from transformers import CLIPTextModel

from perflow_video.errors import ConfigError
from perflow_video.method.parameterization import expand_like
from perflow_video.method.teacher_solver import TEACHER_PREDICTION_TYPES, x0_from_model_output
from perflow_video.tiny.teacher_models import TeacherArch, teacher_motion_adapter
from perflow_video.tiny.tiny_tokenizer import tiny_tokenizer

__all__ = [
    "CaptionAttributeHead",
    "caption_attribute_loss",
    "draw_timesteps",
    "load_teacher_weights",
    "prediction_errors",
    "prediction_target",
    "reinit_motion_modules",
    "separate_word_embeddings",
    "terminal_x0_errors",
    "unet_param_groups",
    "video_loss_weights",
]


def prediction_target(
    z0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the UNet is trained to output at z_t = sqrt(abar) z0 + sqrt(1 - abar) noise: the noise
    (``epsilon``) or v = sqrt(abar) noise - sqrt(1 - abar) z0 (``v_prediction``; Salimans & Ho 2022,
    docs/method.md §1). |v_hat - v|^2 = |eps_hat - eps|^2 + |x0_hat - x0|^2, so the v objective is the x0
    error where the noise dominates and stays finite at abar = 0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return expand_like(abar.sqrt(), z0) * noise - expand_like((1 - abar).sqrt(), z0) * z0
    raise ConfigError(
        f"unknown prediction_type {prediction_type!r}; choose one of {TEACHER_PREDICTION_TYPES}"
    )


def prediction_errors(
    unet: torch.nn.Module,
    z0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    hidden: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """Per-sample mean squared error of ``unet``'s output (epsilon or v, ``prediction_type``) at
    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) noise (docs/method.md, the teacher's objective); ``z0`` is
    (B, C, H, W) or (B, C, F, H, W)."""
    a = alphas_cumprod[t]
    z_t = expand_like(a.sqrt(), z0) * z0 + expand_like((1 - a).sqrt(), z0) * noise
    pred = unet(z_t, t, encoder_hidden_states=hidden).sample
    target = prediction_target(z0, noise, a, prediction_type)
    return (pred - target).pow(2).flatten(1).mean(dim=1)


def terminal_x0_errors(
    unet: torch.nn.Module,
    z0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    hidden: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """Per-sample mean squared error |x0_hat - z0|^2 where x0_hat = (z - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)
    is an epsilon teacher's prediction from the pure noise ``z = noise`` at timestep ``t`` (no clip in the
    input, as the sampler starts). Its minimiser is E[z0 | caption]: the first sampling steps then aim at the
    caption's mean clip."""
    eps = unet(noise, t, encoder_hidden_states=hidden).sample
    x0_hat = x0_from_model_output(eps, noise, alphas_cumprod[t], "epsilon")
    return (x0_hat - z0).pow(2).flatten(1).mean(dim=1)


def draw_timesteps(n: int, gen: torch.Generator, kind: str, num_train_timesteps: int = 1000) -> torch.Tensor:
    """``n`` training timesteps: ``uniform``; ``high`` (density proportional to t + 1/2: t = floor(T sqrt(u)),
    so 75 % of the draws lie above T / 2); or ``top`` (uniform over the top fifth, t >= 0.8 T: where the
    first sampling steps decide the object's path, nothing else trained)."""
    if kind == "uniform":
        return torch.randint(0, num_train_timesteps, (n,), generator=gen)
    if kind == "top":
        return torch.randint(num_train_timesteps * 4 // 5, num_train_timesteps, (n,), generator=gen)
    if kind != "high":
        raise ConfigError(f"timestep sampling must be 'uniform', 'high' or 'top', got {kind!r}")
    u = torch.rand(n, generator=gen)
    return (num_train_timesteps * u.sqrt()).floor().long().clamp(max=num_train_timesteps - 1)


def video_loss_weights(t: torch.Tensor, alphas_cumprod: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-sample weights min(cap, max(1, (1 - abar_t) / abar_t)) of the epsilon loss.

    With x0_hat = (z_t - sqrt(1 - abar) eps_hat) / sqrt(abar), (1 - abar) / abar * |eps_hat - eps|^2 equals
    |x0_hat - x0|^2: where the SNR abar / (1 - abar) is below 1 (t >= 285 for AnimateDiff's linear betas) and
    the cap does not bind (up to t ~ 665 at cap 20) the weighted loss is the x0 error, which the plain epsilon
    loss shrinks by the SNR exactly where the noise hides the object's path. The weights are not normalised:
    their mean (~11 at cap 20 under ``high`` timesteps) shifts the video loss against any loss added to it. The optimum at
    each t (the conditional mean) is unchanged; ``cap`` = 1 gives the plain epsilon loss.
    """
    if cap < 1:
        raise ConfigError(f"the x0 weight cap must be >= 1 (1 = plain epsilon loss), got {cap}")
    a = alphas_cumprod[t].double()
    return ((1 - a) / a).clamp(min=1.0, max=cap).float()


def unet_param_groups(unet: UNetMotionModel, lr: float, motion_lr: float) -> list[dict]:
    """AdamW groups for ``unet``: one at ``lr``, or - with ``motion_lr`` > 0 - the spatial weights at ``lr``
    and the motion modules' (the ``motion_modules`` keys, what a ``MotionAdapter`` holds) at ``motion_lr``.
    Each group keeps its ``base_lr`` for the warm-up."""
    if motion_lr <= 0:
        return [{"params": list(unet.parameters()), "lr": lr, "base_lr": lr}]
    named = list(unet.named_parameters())
    spatial = [p for n, p in named if "motion_modules" not in n]
    motion = [p for n, p in named if "motion_modules" in n]
    return [
        {"params": spatial, "lr": lr, "base_lr": lr},
        {"params": motion, "lr": motion_lr, "base_lr": motion_lr},
    ]


@torch.no_grad()
def reinit_motion_modules(unet: UNetMotionModel, arch: TeacherArch, seed: int) -> None:
    """Replaces ``unet``'s motion modules by a fresh seeded ``MotionAdapter``'s, each module's ``proj_out``
    zeroed (AnimateDiff's initialisation: every motion module starts as the identity)."""
    fresh = teacher_motion_adapter(arch, seed).state_dict()
    for key in fresh:
        if ".proj_out." in key:
            fresh[key].zero_()
    own = {k for k in unet.state_dict() if "motion_modules" in k}
    if own != set(fresh):
        raise ConfigError(f"the UNet's motion modules do not match a {arch} MotionAdapter's")
    unet.load_state_dict(fresh, strict=False)


def separate_word_embeddings(
    encoder: CLIPTextModel, words: list[str], norm: float, gen: torch.Generator
) -> None:
    """Re-draws the input embeddings of ``words`` (one tiny-tokenizer token each) as orthonormal vectors
    scaled to ``norm``, drawn from ``gen``; every other row is left as it is."""
    tok = tiny_tokenizer()
    ids: list[int] = []
    for word in dict.fromkeys(words):  # each word once, in order
        pieces = tok(word).input_ids[1:-1]
        if len(pieces) != 1:
            raise ConfigError(
                f"--separate-words: {word!r} is {len(pieces)} tokens of the tiny tokenizer, not 1"
            )
        ids.append(pieces[0])
    weight = encoder.get_input_embeddings().weight
    if len(ids) > weight.shape[1]:
        raise ConfigError(
            f"--separate-words: {len(ids)} words, but the embeddings have {weight.shape[1]} dims"
        )
    basis, _ = torch.linalg.qr(torch.randn(weight.shape[1], len(ids), generator=gen, dtype=torch.float64))
    with torch.no_grad():
        weight[ids] = (norm * basis.T).to(weight.dtype)


class CaptionAttributeHead(torch.nn.Module):
    """One linear classifier per caption attribute (e.g. 6 colours, 3 shapes, 4 directions) on a hidden state."""

    def __init__(self, hidden_size: int, num_classes: tuple[int, ...]) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden_size, n) for n in num_classes)

    def forward(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        return [head(hidden) for head in self.heads]


def caption_attribute_loss(
    head: CaptionAttributeHead, hidden: torch.Tensor, labels: torch.Tensor, first_position: int
) -> torch.Tensor:
    """Cross-entropy of every attribute read from every position ``>= first_position``.

    Args:
        head: The read-outs.
        hidden: (B, L, D) text encoder hidden states of B captions.
        labels: (B, A) class index of each caption's A attributes.
        first_position: The first token position read (the direction word's, in "a <c> <s> moving <d>").
    """
    tail = hidden[:, first_position:]
    losses = []
    for a, logits in enumerate(head(tail)):
        target = labels[:, a : a + 1].expand(-1, tail.shape[1])
        losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten()))
    return torch.stack(losses).mean()


def load_teacher_weights(
    folder: Path,
    arch: TeacherArch,
    unet: UNetMotionModel,
    encoder: CLIPTextModel,
    schedule: str = "animatediff",
) -> int:
    """Loads ``folder``'s (a ``train_tiny_teacher.py`` output) text encoder and UNet + motion adapter into
    ``unet`` and ``encoder`` (strict), after checking its ``teacher_info.json`` names ``arch`` and a schedule
    the run may continue in (``schedule``: the same, or ``zero-snr-v`` from an ``animatediff`` teacher, the
    fine-tune into it); returns the training step it records."""
    info_path = folder / "teacher_info.json"
    if not info_path.is_file():
        raise ConfigError(f"--init-from {folder}: no teacher_info.json (not a train_tiny_teacher.py folder)")
    info = json.loads(info_path.read_text())
    if info.get("arch") != arch.to_json():
        raise ConfigError(
            f"--init-from {folder}: its architecture {info.get('arch')} is not this run's {arch.to_json()}"
        )
    trained = info.get("schedule", "animatediff")  # folders from before --schedule are AnimateDiff's
    if trained != schedule and (trained, schedule) != ("animatediff", "zero-snr-v"):
        raise ConfigError(
            f"--init-from {folder}: it was trained with --schedule {trained}, this run has --schedule {schedule} "
            f"(its UNet predicts {'v' if trained == 'zero-snr-v' else 'epsilon'}): give --schedule {trained}"
        )
    loaded = UNetMotionModel.from_unet2d(
        UNet2DConditionModel.from_pretrained(folder / "unet"),
        MotionAdapter.from_pretrained(folder / "motion_adapter"),
    )
    unet.load_state_dict(loaded.state_dict(), strict=True)
    encoder.load_state_dict(CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict(), strict=True)
    return int(info["step"])
