"""Architecture of the tiny *trained* text-to-video teacher (real diffusers / transformers classes, shrunk).

Where :mod:`perflow_video.tiny.tiny_models` builds random stand-ins, these builders give the shapes that
``scripts/train_tiny_teacher.py`` trains on shape-world clips (32x32 pixels, 16 frames):

* ``AutoencoderKL`` with 3 blocks of 16/32/32 channels, i.e. spatial factor 4 (real SD: 8), 4 latent
  channels: 32x32 px -> 8x8x4 latents (0.24 M parameters);
* ``CLIPTextModel`` (hidden 32, 2 layers, 4 heads, 77 positions, quick_gelu as OpenAI CLIP) on the
  project's tiny tokenizer, trained jointly with the UNet (0.05 M);
* ``UNet2DConditionModel`` with SD1.5's block pattern shrunk to 3 levels of 32/64/64 channels (8x8, 4x4,
  2x2 latents): ``CrossAttnDownBlock2D`` at every level by default (``cross_attn_levels``; SD1.5 has 3 of
  4), the matching ``CrossAttnUpBlock2D``, a ``UNetMidBlock2DCrossAttn`` mid block;
* ``MotionAdapter`` (AnimateDiff v2 analogue): a motion module per resnet of every block and one in the
  mid block, 2 heads, 32 frame positions (UNet + adapter: 2.44 M);
* ``DDIMScheduler`` with AnimateDiff's *linear* betas 0.00085 -> 0.012 over 1000 steps, epsilon
  (``animatediff``); or the same betas rescaled to zero terminal SNR with v-prediction (``zero-snr-v``:
  Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"), where z_T holds nothing
  of the clip (AnimateDiff's keeps sqrt(abar_T) = 4.0 % of it; docs/tiny_teacher.md, eighth session).

All sizes are parameters of :class:`TeacherArch` so the trials of the training script can vary them; the
defaults are the sizes of the long run (see ``docs/tiny_teacher.md``). Builders are seeded and leave the
global RNG untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import torch
from diffusers import AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from transformers import CLIPTextConfig, CLIPTextModel

from perflow_video.tiny.tiny_tokenizer import tiny_tokenizer

__all__ = [
    "TEACHER_SCHEDULER_CONFIG",
    "TEACHER_SCHEDULES",
    "TeacherArch",
    "TeacherSchedule",
    "split_unet_motion",
    "teacher_motion_adapter",
    "teacher_scheduler",
    "teacher_scheduler_config",
    "teacher_text_encoder",
    "teacher_unet",
    "teacher_unet_motion",
    "teacher_vae",
]

#: AnimateDiff's training schedule: linear betas, epsilon prediction, 1000 steps (DDIM config for sampling).
TEACHER_SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "linspace",
}

#: The teacher's noise schedules: AnimateDiff's own, or its betas rescaled to zero terminal SNR (then the
#: UNet predicts v: epsilon is undefined as a target at abar_T = 0, where z_T is the noise itself).
TeacherSchedule = Literal["animatediff", "zero-snr-v"]
TEACHER_SCHEDULES: tuple[str, ...] = get_args(TeacherSchedule)
_SCHEDULE_OVERRIDES: dict[str, dict] = {
    "animatediff": {},
    "zero-snr-v": {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
}


@dataclass(frozen=True)
class TeacherArch:
    """Sizes of every component (JSON-serialisable; stored in checkpoints so a resume rebuilds the same)."""

    frame_size: int = 32
    vae_channels: tuple[int, ...] = (16, 32, 32)  # 3 blocks -> 2 downsamplings -> factor 4
    vae_groups: int = 8
    latent_channels: int = 4
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 4
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_groups: int = 8
    unet_heads: int = 2  # attention heads (SD1.5's ``attention_head_dim`` is the head *count*)
    cross_attn_levels: int = 3  # first N levels use CrossAttn blocks, the rest plain Down/Up blocks
    motion_heads: int = 2
    max_frames: int = 32

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.frame_size // self.vae_factor

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> TeacherArch:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def teacher_vae(
    arch: TeacherArch = TeacherArch(), seed: int = 0, scaling_factor: float = 1.0
) -> AutoencoderKL:
    """The teacher's ``AutoencoderKL`` (untrained; ``scaling_factor`` is set after fitting it)."""
    n = len(arch.vae_channels)
    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(arch.vae_channels),
            layers_per_block=1,
            latent_channels=arch.latent_channels,
            norm_num_groups=arch.vae_groups,
            sample_size=arch.frame_size,
            scaling_factor=scaling_factor,
        )


def teacher_text_encoder(arch: TeacherArch = TeacherArch(), seed: int = 2) -> CLIPTextModel:
    """The teacher's ``CLIPTextModel`` on the tiny tokenizer (77 positions, pooled at the first EOS)."""
    tok = tiny_tokenizer()
    config = CLIPTextConfig(
        hidden_size=arch.text_hidden,
        intermediate_size=arch.text_hidden * 2,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        max_position_embeddings=77,
        vocab_size=len(tok),
        hidden_act="quick_gelu",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with _seeded(seed):
        return CLIPTextModel(config)


def _unet_blocks(arch: TeacherArch) -> tuple[tuple[str, ...], tuple[str, ...]]:
    n = len(arch.unet_channels)
    down = tuple("CrossAttnDownBlock2D" if i < arch.cross_attn_levels else "DownBlock2D" for i in range(n))
    up = tuple(
        "CrossAttnUpBlock2D" if (n - 1 - i) < arch.cross_attn_levels else "UpBlock2D" for i in range(n)
    )
    return down, up


def teacher_unet(arch: TeacherArch = TeacherArch(), seed: int = 0) -> UNet2DConditionModel:
    """The spatial part: an SD1.5-pattern ``UNet2DConditionModel`` shrunk (see the module docstring)."""
    down, up = _unet_blocks(arch)
    with _seeded(seed):
        return UNet2DConditionModel(
            sample_size=arch.latent_size,
            in_channels=arch.latent_channels,
            out_channels=arch.latent_channels,
            down_block_types=down,
            up_block_types=up,
            mid_block_type="UNetMidBlock2DCrossAttn",
            block_out_channels=tuple(arch.unet_channels),
            layers_per_block=1,
            norm_num_groups=arch.unet_groups,
            cross_attention_dim=arch.text_hidden,
            attention_head_dim=arch.unet_heads,
        )


def teacher_motion_adapter(arch: TeacherArch = TeacherArch(), seed: int = 4) -> MotionAdapter:
    """The temporal part: a ``MotionAdapter`` matching :func:`teacher_unet`, with a mid-block module (v2)."""
    with _seeded(seed):
        return MotionAdapter(
            block_out_channels=tuple(arch.unet_channels),
            motion_layers_per_block=1,
            motion_mid_block_layers_per_block=1,
            motion_num_attention_heads=arch.motion_heads,
            motion_norm_num_groups=arch.unet_groups,
            motion_max_seq_length=arch.max_frames,
            use_motion_mid_block=True,
        )


def teacher_unet_motion(arch: TeacherArch = TeacherArch(), seed: int = 0) -> UNetMotionModel:
    """``UNetMotionModel.from_unet2d(teacher_unet, teacher_motion_adapter)`` (UNet ``seed``, adapter ``seed + 4``)."""
    return UNetMotionModel.from_unet2d(teacher_unet(arch, seed), teacher_motion_adapter(arch, seed + 4))


def split_unet_motion(
    model: UNetMotionModel, arch: TeacherArch = TeacherArch()
) -> tuple[UNet2DConditionModel, MotionAdapter]:
    """Splits a video UNet back into its ``UNet2DConditionModel`` and ``MotionAdapter`` (strict loads).

    The motion model's keys are the 2D UNet's plus the ``motion_modules`` ones, which are the adapter's keys.
    """
    state = model.state_dict()
    unet, adapter = teacher_unet(arch), teacher_motion_adapter(arch)
    unet.load_state_dict({k: v for k, v in state.items() if "motion_modules" not in k}, strict=True)
    adapter.load_state_dict({k: v for k, v in state.items() if "motion_modules" in k}, strict=True)
    return unet.eval(), adapter.eval()


def teacher_scheduler_config(schedule: str = "animatediff") -> dict:
    """The DDIM config of the teacher's ``schedule`` (one of :data:`TEACHER_SCHEDULES`)."""
    if schedule not in _SCHEDULE_OVERRIDES:
        raise ValueError(f"unknown teacher schedule {schedule!r}; choose one of {TEACHER_SCHEDULES}")
    return {**TEACHER_SCHEDULER_CONFIG, **_SCHEDULE_OVERRIDES[schedule]}


def teacher_scheduler(schedule: str = "animatediff") -> DDIMScheduler:
    """DDIM with the teacher's linear-beta schedule (AnimateDiff's, or rescaled to zero terminal SNR)."""
    return DDIMScheduler(**teacher_scheduler_config(schedule))
