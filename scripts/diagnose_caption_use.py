"""How much a tiny shape-world teacher uses its caption's colour, shape and direction words.

For each attribute, a caption is compared with the same caption whose one word is swapped (red <-> blue,
circle <-> square, left <-> right, ...; perflow_video/evaluation/caption_use.py; "axis" swaps the direction
for one at right angles, left <-> up, right <-> down):

* padding: mean norm of the text encoder's hidden-state difference at EOS and the padding (what the UNet's
  cross-attention reads most);
* epsilon change: RMS change of the UNet's epsilon (its raw output: v for a v-prediction teacher) from the same
  noise at t = 900, 600, 300;
* loss gap: the training loss (epsilon or v, the teacher's) on noised shape-world clips with the swapped
  captions minus the right ones (> 0 means the UNet uses the word the right way).

x0 track: the slope (pixels per frame, along the caption's direction) of the centroid track of the decoded
x0 prediction from pure noise at t = 999, 900, 700, without guidance and with --cfg, over 32 captions (8 per
direction, the same 8 noises for each), beside the same slope of the data's mean clip per direction (~0.9):
where sampling decides the direction, does the teacher know it? (0 for a teacher that ignores the word.)

leak: the x0 error (relative to the clips' variance) of the prediction from *noised* validation clips at
t = 999, 950, 900, 800, with their own captions and with the next clip's, beside that of the clips' mean (a
prediction that reads nothing): below it, the teacher reads the clip out of z_t, which the sampler's pure-noise
start does not hold (AnimateDiff's betas keep 4 % of the clip at t = 999; a zero-terminal-SNR schedule none).

frame order: RMS change of the epsilon at t = 900, 600, 300 when the frames are reversed (and the output
reversed back), and when they are shuffled; a reversal change far below the shuffle's means the motion
modules use frame order but not its sign, so they cannot tell left from right.

With --same-noise N, N captions and their opposite-direction twins are sampled from the same noises
(--probe-steps, --cfg): the number of pairs read as moving the same way, and as each following its word;
then again with the start holding what a noised training clip holds at the first timestep, the mean latent
clip of the caption's direction (288 clips), scaled by sqrt(abar): does the teacher follow the word once the
start carries it?

With --probe-prompts N, also the pixel probe's accuracy on the teacher's own DDIM clips (--probe-steps,
CFG --cfg) of N of the 72 prompts (spread over colours, shapes and directions).

Prints one JSON object (and writes it to --out if given). Example, on the shipped teacher::

    python scripts/diagnose_caption_use.py --teacher tiny-teacher
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import DDIMScheduler  # noqa: E402

from perflow_video.atomic_files import atomic_destination  # noqa: E402
from perflow_video.errors import exit_status_of  # noqa: E402
from perflow_video.evaluation.caption_use import (  # noqa: E402
    SWAPS,
    centroid_track_slope,
    epsilon_change,
    frame_order_change,
    opposite_word_samples,
    padding_difference,
    probe_samples,
    relative_x0_error,
    swap_caption,
    swap_loss_gap,
    validation_latents,
    x0_from_noise,
)
from perflow_video.evaluation.evidence_models import load_teacher  # noqa: E402
from perflow_video.evaluation.evidence_samplers import select_prompts  # noqa: E402
from perflow_video.families import get_family  # noqa: E402
from perflow_video.toy.shape_world import (  # noqa: E402
    DIRECTION_VECTORS,
    EOS_POSITION,
    ShapeWorld,
    ShapeWorldConfig,
    parse_prompt,
    prompt_of,
)

TIMESTEPS = (900, 600, 300)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="tiny-teacher", help="teacher folder or tiny-teacher [%(default)s]")
    p.add_argument("--clips", type=int, default=16, help="validation clips for the loss gap [%(default)s]")
    p.add_argument("--seed", type=int, default=0, help="seed of the clips, noise and timesteps [%(default)s]")
    p.add_argument(
        "--probe-prompts",
        type=int,
        default=0,
        help="prompts sampled for the probe (1-72; 0 = none) [%(default)s]",
    )
    p.add_argument(
        "--probe-steps", type=int, default=50, help="DDIM steps of the probe samples [%(default)s]"
    )
    p.add_argument(
        "--same-noise",
        type=int,
        default=0,
        help="caption pairs (opposite direction words) sampled from the same noise (0 = none) [%(default)s]",
    )
    p.add_argument("--cfg", type=float, default=5.0, help="guidance scale of the probe samples [%(default)s]")
    p.add_argument("--out", default="", help="also write the JSON here (atomically) ['']")
    return p


def hidden_states(teacher, prompts: list[str]) -> torch.Tensor:
    """(B, 77, D) text encoder hidden states, as the AnimateDiff pipeline computes them."""
    family = get_family("animatediff")
    return family.encode_text(teacher.models, prompts, "cpu").encoder_hidden_states


def frame_order(teacher, z0: torch.Tensor, noise: torch.Tensor, hidden: torch.Tensor, alphas, g) -> dict:
    """Epsilon change under reversed and shuffled frames, per timestep, on 4 noised validation clips."""
    frames = z0.shape[2]
    orders = {"reversed": torch.arange(frames - 1, -1, -1), "shuffled": torch.randperm(frames, generator=g)}
    out: dict = {name: {} for name in orders}
    for step in TIMESTEPS:
        a = alphas[step]
        z_t = a.sqrt() * z0[:4] + (1 - a).sqrt() * noise[:4]
        for name, order in orders.items():
            out[name][step] = round(frame_order_change(teacher.unet, z_t, step, hidden[:4], order), 5)
    return out


X0_TRACK_TIMESTEPS = (999, 900, 700)
LEAK_TIMESTEPS = (999, 950, 900, 800)


def leak(teacher, z0, noise, prompts: list[str], alphas, prediction_type: str) -> dict:
    """Per high timestep: the x0 error (relative to the clips' variance) from noised validation clips with their
    own captions and with the next clip's; and that of the clips' mean, a prediction that reads nothing."""
    own = hidden_states(teacher, prompts)
    other = hidden_states(teacher, prompts[1:] + prompts[:1])
    out: dict = {}
    for step in LEAK_TIMESTEPS:
        out[step] = {
            name: round(relative_x0_error(teacher.unet, z0, noise, step, h, alphas, prediction_type), 3)
            for name, h in (("own", own), ("other", other))
        }
    out["clips_mean"] = round(((z0.mean(0, keepdim=True) - z0).pow(2).mean() / z0.var()).item(), 3)
    return out


def teacher_world(teacher: str) -> ShapeWorldConfig:
    """The shape world a ``train_tiny_teacher.py`` folder was trained in (its ``teacher_info.json``'s trail);
    the default, trail-free world for folders that do not record one (the shipped teacher)."""
    info = Path(teacher) / "teacher_info.json"
    world = json.loads(info.read_text()).get("world", {}) if info.is_file() else {}
    return ShapeWorldConfig(**world)


def direction_mean_latents(
    teacher, seed: int, world_config: ShapeWorldConfig, clips: int = 288
) -> dict[str, torch.Tensor]:
    """The mean scaled VAE latent clip of each direction over ``clips`` shape-world clips."""
    world = ShapeWorld("all", seed=seed + 11, config=world_config)
    z0, prompts = validation_latents(teacher.models.vae, world, clips, torch.Generator().manual_seed(seed))
    words = [parse_prompt(p)[2] for p in prompts]
    return {d: z0[[i for i, w in enumerate(words) if w == d]].mean(dim=0) for d in DIRECTION_VECTORS}


def x0_track(
    teacher, alphas, prediction_type: str, guidance: float, seed: int, world_config: ShapeWorldConfig
) -> dict:
    """Mean centroid-track slope along the caption's direction of the x0 prediction from noise, per timestep
    and guidance (8 captions per direction, the same 8 noises for every direction, so a track that does not
    depend on the word averages to 0), and of the data's mean clip (200 clips per direction)."""
    looks = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("white", "circle")] * 2
    directions = [d for d in DIRECTION_VECTORS for _ in looks]
    prompts = [prompt_of(c, s, d) for d in DIRECTION_VECTORS for c, s in looks]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(looks), *teacher.latent_shape()), generator=g).repeat(
        len(DIRECTION_VECTORS), 1, 1, 1, 1
    )
    hidden, empty = hidden_states(teacher, prompts), hidden_states(teacher, [""] * len(prompts))
    out: dict = {}
    for step in X0_TRACK_TIMESTEPS:
        out[step] = {}
        for w in sorted({1.0, guidance}):
            x0 = x0_from_noise(teacher.unet, noise, step, hidden, empty, w, alphas, prediction_type)
            out[step][f"cfg{w:g}"] = round(
                centroid_track_slope(teacher.decode(x0), directions).mean().item(), 3
            )
    world = ShapeWorld("all", seed=seed + 77, config=world_config)
    clips: dict[str, list] = {d: [] for d in DIRECTION_VECTORS}
    for i in range(200 * len(DIRECTION_VECTORS)):
        clips[parse_prompt(world.spec(i).prompt)[2]].append(world.clip(i))
    means = torch.stack([torch.stack(c).mean(dim=0) for c in clips.values()])
    out["data_mean_clip"] = round(centroid_track_slope(means, list(clips)).mean().item(), 3)
    return out


@torch.no_grad()
def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    teacher = load_teacher(args.teacher, num_frames=16)
    alphas = DDIMScheduler.from_config(teacher.scheduler_config).alphas_cumprod  # its own schedule
    prediction_type = teacher.scheduler_config["prediction_type"]
    world_config = teacher_world(args.teacher)
    world = ShapeWorld("all", seed=args.seed + 4243, config=world_config)
    g = torch.Generator().manual_seed(args.seed)
    z0, prompts = validation_latents(teacher.models.vae, world, args.clips, g)
    noise = torch.randn(z0.shape, generator=g)
    t = torch.linspace(100, 900, args.clips).round().long()
    right = hidden_states(teacher, prompts)
    out: dict = {"teacher": args.teacher, "clips": args.clips, "seed": args.seed}
    out["world"] = world_config.trail_record()
    for attribute in SWAPS:
        swapped = hidden_states(teacher, [swap_caption(p, attribute) for p in prompts])
        eps = {}
        for step in TIMESTEPS:
            a = alphas[step]
            z_t = a.sqrt() * z0[:4] + (1 - a).sqrt() * noise[:4]
            eps[step] = round(epsilon_change(teacher.unet, z_t, step, right[:4], swapped[:4]), 5)
        out[attribute] = {
            "padding_difference": round(padding_difference(right, swapped, EOS_POSITION), 4),
            "epsilon_change": eps,
            "swap_loss_gap": round(
                swap_loss_gap(teacher.unet, z0, noise, t, right, swapped, alphas, prediction_type), 6
            ),
        }
    out["frame_order"] = frame_order(teacher, z0, noise, right, alphas, g)
    out["x0_track"] = x0_track(teacher, alphas, prediction_type, args.cfg, args.seed, world_config)
    out["leak"] = leak(teacher, z0, noise, prompts, alphas, prediction_type)
    if args.same_noise:
        chosen = select_prompts(str(args.same_noise))
        out["same_noise"] = opposite_word_samples(teacher, chosen, args.probe_steps, args.cfg, args.seed)
        means = direction_mean_latents(teacher, args.seed, world_config)
        out["same_noise_mean_start"] = opposite_word_samples(
            teacher, chosen, args.probe_steps, args.cfg, args.seed, start_signal=means
        )
    if args.probe_prompts:
        chosen = select_prompts(str(args.probe_prompts))
        out["probe"] = probe_samples(teacher, chosen, args.probe_steps, args.cfg, args.seed)
        out["probe"].update(steps=args.probe_steps, cfg=args.cfg)
    return out


def run(args: argparse.Namespace) -> int:
    result = measure(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with atomic_destination(args.out) as tmp:
            Path(tmp).write_text(text + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_status_of(lambda: run(args), debug=False)


if __name__ == "__main__":
    sys.exit(main())
