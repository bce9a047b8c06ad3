"""Train the tiny text-to-video teacher (AnimateDiff classes, shrunk) on shape-world clips, on a CPU.

One command does everything, in two stages, and resumes by itself when run again with the same --out:

1. VAE: fits the ``AutoencoderKL`` (factor 4, 4 latent channels) on shape-world frames, measures its
   reconstruction PSNR and the probe's accuracy on reconstructions, sets ``scaling_factor`` = 1 / latent std,
   and stores it in ``<out>/training/vae/``.
2. Teacher: trains the ``CLIPTextModel`` and the ``UNetMotionModel`` jointly with the epsilon objective on
   AnimateDiff's linear-beta schedule (1000 steps; ``--schedule zero-snr-v``: v on those betas rescaled to
   zero terminal SNR), prompts balanced over the 66 training prompts and
   dropped to "" with probability --drop-prompt (classifier-free guidance). Every --eval-every steps, the EMA
   weights sample a few prompts (50-step DDIM, CFG), the pixel probe grades them, the numbers go to
   ``<out>/training/metrics.jsonl``, a frame strip to ``<out>/training/samples/``, and a loadable snapshot
   of the teacher to ``<out>/snapshot/``.

Checkpoints (``<out>/training/checkpoint.pt``, written to a temporary name then renamed) are taken every
--checkpoint-minutes, on SIGTERM / SIGINT and at the end; a run finds the latest and continues from it
(data, noise and timesteps are pure functions of the seed and step, so a resumed run sees what an
uninterrupted one would).

At the end the EMA teacher is written to ``<out>/`` in diffusers layout (safetensors only): ``vae/``,
``text_encoder/``, ``tokenizer/``, ``unet/`` (the ``UNet2DConditionModel`` part), ``motion_adapter/``,
``scheduler/`` (DDIM, linear betas, the run's schedule) and ``model_index.json``. Load it like SD1.5 + an AnimateDiff adapter::

    adapter = MotionAdapter.from_pretrained(out / "motion_adapter")
    pipe = AnimateDiffPipeline.from_pretrained(out, motion_adapter=adapter)

Example (the long run; one thread so the machine stays usable)::

    nohup python scripts/train_tiny_teacher.py --out outputs/tiny-teacher > outputs/tiny-teacher/train.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from perflow_video.atomic_files import atomic_destination  # noqa: E402
from perflow_video.errors import ConfigError, exit_status_of  # noqa: E402
from perflow_video.tiny.teacher_models import (  # noqa: E402
    TEACHER_SCHEDULES,
    TeacherArch,
    split_unet_motion,
    teacher_scheduler,
    teacher_text_encoder,
    teacher_unet,
    teacher_unet_motion,
    teacher_vae,
)
from perflow_video.tiny.teacher_training import (  # noqa: E402
    CaptionAttributeHead,
    caption_attribute_loss,
    draw_timesteps,
    load_teacher_weights,
    prediction_errors,
    reinit_motion_modules,
    separate_word_embeddings,
    terminal_x0_errors,
    unet_param_groups,
    video_loss_weights,
)
from perflow_video.tiny.tiny_tokenizer import tiny_tokenizer  # noqa: E402
from perflow_video.toy.probe import ATTRIBUTES, axis_accuracy, probe_accuracy, probe_clip  # noqa: E402
from perflow_video.toy.shape_world import (  # noqa: E402
    ALL_PROMPTS,
    DIRECTION_POSITION,
    HELD_OUT,
    OPPOSITE,
    ShapeWorld,
    ShapeWorldConfig,
    attribute_labels,
    parse_prompt,
)
from perflow_video.toy.toy_clips import COLORS, DIRECTIONS, SHAPES  # noqa: E402

_STOP = {"requested": False}


def _request_stop(signum, frame) -> None:  # noqa: ARG001
    _STOP["requested"] = True


# ----------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a(
        "--out",
        default="outputs/tiny-teacher",
        help="output folder: final teacher, snapshot/, training/ "
        "(checkpoint, metrics.jsonl, samples). Run again with the same --out to resume. [%(default)s]",
    )
    a(
        "--seed",
        type=int,
        default=0,
        help="seed of the data stream, initialisation, noise and timesteps [%(default)s]",
    )
    a("--threads", type=int, default=1, help="torch CPU threads (keep 1 on a shared machine) [%(default)s]")
    a(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop (with a checkpoint) after this wall time; "
        "0 = no limit. A later run resumes. [%(default)s]",
    )
    a("--checkpoint-minutes", type=float, default=4.0, help="wall-time between checkpoints [%(default)s]")
    # data
    a("--frame-size", type=int, default=32, help="frames are N x N pixels [%(default)s]")
    a("--num-frames", type=int, default=16, help="frames per clip [%(default)s]")
    # VAE stage
    a("--vae-steps", type=int, default=1500, help="optimizer steps of the VAE fit (stage 1) [%(default)s]")
    a(
        "--vae-batch-frames",
        type=int,
        default=32,
        help="frames per VAE batch (4 random frames of each of N/4 clips) [%(default)s]",
    )
    a("--vae-lr", type=float, default=2e-3, help="VAE learning rate (AdamW, cosine to 10%%) [%(default)s]")
    a(
        "--vae-kl",
        type=float,
        default=1e-4,
        help="weight of the KL term (per latent element) in the VAE "
        "loss; the rest is pixel MSE [%(default)s]",
    )
    a(
        "--vae-channels",
        type=_ints,
        default=(16, 32, 32),
        help="VAE block widths; N blocks -> factor 2^(N-1) [%(default)s]",
    )
    # teacher architecture
    a(
        "--unet-channels",
        type=_ints,
        default=(32, 64, 64),
        help="UNet level widths (SD1.5: 320,640,1280,1280) [%(default)s]",
    )
    a(
        "--cross-attn-levels",
        type=int,
        default=3,
        help="how many levels (from the top) use CrossAttn "
        "down/up blocks; the rest are plain DownBlock2D/UpBlock2D [%(default)s]",
    )
    a(
        "--unet-groups",
        type=int,
        default=8,
        help="GroupNorm groups in the UNet and motion modules [%(default)s]",
    )
    a("--unet-heads", type=int, default=2, help="spatial attention heads [%(default)s]")
    a("--motion-heads", type=int, default=2, help="temporal (motion module) attention heads [%(default)s]")
    a(
        "--text-hidden",
        type=int,
        default=32,
        help="CLIP text encoder width = cross-attention dim [%(default)s]",
    )
    a("--text-layers", type=int, default=2, help="CLIP text encoder layers [%(default)s]")
    # teacher optimisation
    a("--steps", type=int, default=15000, help="teacher optimizer steps in total (stage 2) [%(default)s]")
    a("--batch-size", type=int, default=4, help="clips per teacher step [%(default)s]")
    a(
        "--lr",
        type=float,
        default=5e-4,
        help="UNet learning rate (AdamW, linear warm-up then constant) [%(default)s]",
    )
    a(
        "--motion-lr",
        type=float,
        default=0.0,
        help="learning rate of the motion modules (the MotionAdapter's weights); 0 = the same as --lr. "
        "A run resumes only with the setting it started with [%(default)s]",
    )
    a(
        "--text-lr",
        type=float,
        default=1e-3,
        help="text encoder learning rate; 0 freezes the (random) text encoder [%(default)s]",
    )
    a(
        "--image-batch",
        type=int,
        default=0,
        help="also train the spatial UNet on N single frames per step, each from its own clip and caption "
        "(the 2D UNet shares the video UNet's weights; AnimateDiff's spatial UNet is an image model). "
        "A clip batch has one caption per 16 frames, an image batch one per frame, so caption binding "
        "gets 16x the examples at the same cost. 0 = video batches only [%(default)s]",
    )
    a(
        "--image-text-grad",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let the image batch train the text encoder too; --no-image-text-grad detaches its captions' "
        "hidden states, so the encoder learns only from clips (a frame shows no direction: its gradient "
        "on the direction words is noise) [%(default)s]",
    )
    a(
        "--image-start-step",
        type=int,
        default=0,
        help="first step that adds the image batch (the long run added it to a video-only run) [%(default)s]",
    )
    a(
        "--t-sampling",
        choices=("uniform", "high", "top"),
        default="uniform",
        help="timestep distribution of the epsilon loss: uniform; high = density rising linearly with t "
        "(75%% of draws above t = 500, where the caption decides colour, shape and path; the optimum per "
        "t is unchanged, only its weight); top = uniform over t >= 800 only (a diagnostic: the first sampling "
        "steps, where the path is decided; lower t are not trained) [%(default)s]",
    )
    a(
        "--t-sampling-start-step",
        type=int,
        default=0,
        help="first step that uses --t-sampling (earlier steps: uniform) [%(default)s]",
    )
    a(
        "--reversal-pairs",
        action="store_true",
        help="half of each video batch is the other half played backwards under the opposite direction word "
        "(ShapeWorld.reversal_pairs): same object, same path, same timestep, only frame order and direction "
        "differ, so the loss can fall only by reading the direction from the caption. --batch-size must be "
        "even [off]",
    )
    a(
        "--init-from",
        default="",
        help="start the teacher stage from this teacher folder (a train_tiny_teacher.py output, e.g. the packaged "
        "perflow_video/tiny/assets/tiny_teacher): its VAE becomes <out>/training/vae (no VAE stage; another VAE "
        "already there is an error), its text encoder, UNet and motion adapter are the initial weights and EMA, "
        "and the step count (and the warm-up) continue from its teacher_info.json. Ignored, with a message, once "
        "<out>/training/checkpoint.pt exists (resume) ['']",
    )
    a(
        "--terminal-loss",
        type=float,
        default=0.0,
        help="weight of an extra loss on each step's clips: the x0 error of the prediction from pure noise at "
        "t in [950, 1000) (the sampler starts from pure noise, but AnimateDiff's schedule leaves 4.0%% of the "
        "clip in z_T, so a model trained only on noised clips reads a path out of the noise; "
        "docs/tiny_teacher.md). 0 = off [%(default)s]",
    )
    a(
        "--reinit-motion",
        action="store_true",
        help="with --init-from: start the motion modules afresh (seeded, output projections zeroed, as "
        "AnimateDiff trains them on a frozen image model); the spatial UNet and text encoder are the folder's",
    )
    a(
        "--separate-words",
        default="",
        help="comma-separated caption words whose input embeddings are re-drawn, with --init-from, as "
        "orthogonal vectors of norm --separate-norm (seeded): words the encoder keeps too close to tell "
        "apart (docs/tiny_teacher.md: the direction words) then start with distinct hidden states ['']",
    )
    a(
        "--separate-norm",
        type=float,
        default=1.0,
        help="norm of the re-drawn embeddings of --separate-words (the trained colour words: ~0.5) "
        "[%(default)s]",
    )
    a(
        "--trail-frames",
        type=float,
        default=0.0,
        help="draw a fading trail behind every shape, this many frames of its motion long, so each single "
        "frame shows which way it moves (ShapeWorldConfig.trail_frames; docs/tiny_teacher.md, ninth "
        "session); a resume must keep it; 0 = no trail, the shipped teacher's world [0]",
    )
    a(
        "--trail-opacity",
        type=float,
        default=0.35,
        help="the trail's opacity right behind the shape, fading towards 0 at its end [0.35]",
    )
    a(
        "--direction",
        choices=("", *DIRECTIONS),
        default="",
        help="train on (and sample the evaluation prompts of) only the prompts moving this way: with "
        "--init-from and only the motion modules learning (--lr 0 --text-lr 0 --motion-lr R), the run's motion_adapter/ is a direction "
        "adapter, like a pan-left motion LoRA of AnimateDiff (docs/tiny_teacher.md, eighth session); "
        "'' = all four [all]",
    )
    a(
        "--schedule",
        choices=TEACHER_SCHEDULES,
        default="animatediff",
        help="the noise schedule the teacher is trained on and exported with (scheduler/): 'animatediff' "
        "(AnimateDiff's linear betas 0.00085 -> 0.012, epsilon prediction; z_T keeps 4.0%% of the clip) or "
        "'zero-snr-v' (the same betas rescaled to zero terminal SNR, v-prediction: z_T is pure noise, as the "
        "sampler's start, so the first step aims at the caption's mean clip; Lin et al. 2024, "
        "docs/tiny_teacher.md). --init-from an 'animatediff' teacher fine-tunes it into the new schedule; a "
        "resume must keep the checkpoint's [%(default)s]",
    )
    a(
        "--x0-weight-max",
        type=float,
        default=1.0,
        help="W: the video epsilon loss at timestep t is weighted min(W, max(1, (1 - abar_t) / abar_t)), i.e. "
        "it becomes the x0 error where the SNR is below 1 (where the caption decides the path), capped at W. "
        "The optimum per t is unchanged; the weights are not normalised (mean ~11 at W = 20 with --t-sampling "
        "high), so the video loss grows against the image and read-out losses. 1 = plain epsilon loss "
        "[%(default)s]",
    )
    a(
        "--text-attribute-loss",
        type=float,
        default=0.0,
        help="weight of an auxiliary loss on the text encoder: linear read-outs of colour, shape and direction "
        "from its hidden states at and after the direction word (EOS, padding), over the training prompts "
        "every step, so the positions the UNet reads carry the direction as they carry the colour (a real "
        "CLIP encoder is pre-trained; this one is not). The read-outs are not exported. 0 = off [%(default)s]",
    )
    a("--warmup", type=int, default=300, help="linear warm-up steps [%(default)s]")
    a("--weight-decay", type=float, default=0.01, help="AdamW weight decay [%(default)s]")
    a("--grad-clip", type=float, default=1.0, help="gradient norm clip [%(default)s]")
    a(
        "--ema",
        type=float,
        default=0.999,
        help="EMA decay of the weights used for evaluation and export [%(default)s]",
    )
    a(
        "--drop-prompt",
        type=float,
        default=0.1,
        help="probability a caption is replaced by '' (CFG) [%(default)s]",
    )
    # evaluation
    a("--log-every", type=int, default=50, help="steps between loss lines in metrics.jsonl [%(default)s]")
    a(
        "--eval-every",
        type=int,
        default=1000,
        help="steps between probe evaluations (+ snapshot) [%(default)s]",
    )
    a(
        "--eval-train-prompts",
        type=int,
        default=12,
        help="training prompts sampled per evaluation (chosen to cover every word) [%(default)s]",
    )
    a(
        "--eval-held-out",
        type=int,
        default=6,
        help="held-out prompts sampled per evaluation (of 6) [%(default)s]",
    )
    a("--eval-steps", type=int, default=50, help="DDIM steps of evaluation samples [%(default)s]")
    a(
        "--cfg",
        type=float,
        default=5.0,
        help="classifier-free guidance scale of evaluation samples [%(default)s]",
    )
    a("--no-final-export", action="store_true", help="do not write the diffusers folder at the end (trials)")
    return p


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def _gen(seed: int, *keys: int) -> torch.Generator:
    """A torch generator that is a pure function of (seed, keys)."""
    mixed = int(np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0]) & ((1 << 63) - 1)
    return torch.Generator().manual_seed(mixed)


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def _save_torch_atomic(obj, path: Path) -> None:
    with atomic_destination(path) as tmp:
        torch.save(obj, tmp)


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Moves a finished folder ``tmp`` to ``dest`` (the old ``dest`` is renamed away first, then removed)."""
    old = dest.with_name(f".{dest.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old.exists():
        shutil.rmtree(old)


def _to_uint8_frames(clip: torch.Tensor) -> np.ndarray:
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8."""
    x = ((clip.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).numpy()


def _save_strip(clips: list[torch.Tensor], path: Path, frames: tuple[int, ...] = (0, 5, 10, 15)) -> None:
    """PNG with one row per clip showing the given frames (scaled x2)."""
    from PIL import Image

    rows = []
    for c in clips:
        f = _to_uint8_frames(c)
        idx = [min(i, f.shape[0] - 1) for i in frames]
        sep = np.full((f.shape[1], 2, 3), 128, np.uint8)
        rows.append(np.concatenate([x for i in idx for x in (f[i], sep)], axis=1))
    img = Image.fromarray(np.concatenate(rows, axis=0))
    img = img.resize((img.width * 2, img.height * 2), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_destination(path) as tmp:
        img.save(tmp, format="PNG")


def eval_prompts(n_train: int, n_held: int, direction: str = "") -> list[str]:
    """Deterministic evaluation prompts: training prompts chosen so every colour, shape and direction
    appears (colour i, shape (i+1)%3, direction (i+2)%4, then shifted variants), plus held-out ones; with
    ``direction``, the first of that direction's training and held-out prompts instead."""
    if direction:
        moving = [p for p in ALL_PROMPTS if parse_prompt(p)[2] == direction]
        train_d, held_d = [p for p in moving if p not in HELD_OUT], [p for p in moving if p in HELD_OUT]
        return train_d[:n_train] + held_d[:n_held]
    train = [p for p in ALL_PROMPTS if p not in HELD_OUT]
    colors = list(COLORS)
    chosen: list[str] = []
    shift = 0
    while len(chosen) < min(n_train, len(train)):
        for i, c in enumerate(colors):
            p = f"a {c} {SHAPES[(i + 1 + shift) % 3]} moving {DIRECTIONS[(i + 2 + shift) % 4]}"
            if p in train and p not in chosen and len(chosen) < n_train:
                chosen.append(p)
        shift += 1
        if shift > 24:
            chosen += [p for p in train if p not in chosen][: n_train - len(chosen)]
    return chosen + list(HELD_OUT[:n_held])


class Text:
    """Tokenizer + encoder: captions -> (B, 77, hidden) hidden states (what SD's pipelines feed the UNet)."""

    def __init__(self, encoder) -> None:
        self.tok = tiny_tokenizer()
        self.encoder = encoder
        self._cache: dict[str, torch.Tensor] = {}

    def ids(self, prompts: list[str]) -> torch.Tensor:
        out = []
        for p in prompts:
            if p not in self._cache:
                self._cache[p] = self.tok(
                    p,
                    padding="max_length",
                    max_length=self.tok.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids[0]
            out.append(self._cache[p])
        return torch.stack(out)

    def __call__(self, prompts: list[str], encoder=None) -> torch.Tensor:
        return (encoder or self.encoder)(self.ids(prompts))[0]


# ----------------------------------------------------------------------------------------------------------
# Stage 1: VAE
# ----------------------------------------------------------------------------------------------------------


def _vae_frames(world: ShapeWorld, step: int, n_frames: int, seed: int) -> torch.Tensor:
    """``n_frames`` frames for VAE step ``step``: 4 random frames of each of n/4 clips."""
    per = 4
    n_clips = max(1, n_frames // per)
    g = np.random.default_rng([seed, 0xFAE, step])
    frames = []
    for k in range(n_clips):
        clip = world.clip(step * n_clips + k)
        idx = g.choice(clip.shape[1], size=per, replace=False)
        frames.append(clip[:, idx].permute(1, 0, 2, 3))
    return torch.cat(frames)


@torch.no_grad()
def evaluate_vae(vae, cfg: ShapeWorldConfig, seed: int, n_clips: int = 24) -> dict:
    """PSNR (0..1 scale) of reconstructions of held-aside clips, latent std, probe accuracy on recons."""
    world = ShapeWorld("all", seed=seed + 7919, config=cfg)
    mses, lat, recons, prompts = [], [], [], []
    for i in range(n_clips):
        clip = world.clip(i)  # (3, F, H, W)
        x = clip.permute(1, 0, 2, 3)
        post = vae.encode(x).latent_dist
        z = post.sample(generator=_gen(seed, 0xE7A1, i))
        rec = vae.decode(z).sample.clamp(-1, 1)
        mses.append(((rec - x) / 2).pow(2).mean().item())
        lat.append(z)
        recons.append(rec.permute(1, 0, 2, 3))
        prompts.append(world.spec(i).prompt)
    mse = float(np.mean(mses))
    z = torch.cat(lat)
    acc = probe_accuracy(recons, prompts)
    return {
        "psnr": 10 * math.log10(1.0 / max(mse, 1e-12)),
        "latent_std": float(z.std()),
        "latent_mean": float(z.mean()),
        "probe_on_recon": {k: acc[k] for k in (*ATTRIBUTES, "all")},
    }


def fit_vae(args, arch: TeacherArch, cfg: ShapeWorldConfig, train_dir: Path, metrics: Path):
    """Stage 1 (resumable). Returns the fitted VAE (eval mode, ``scaling_factor`` set)."""
    final = train_dir / "vae"
    if (final / "config.json").exists():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(final).eval()
        print(f"VAE: loaded {final} (scaling_factor {vae.config.scaling_factor:.4f})", flush=True)
        return vae
    vae = teacher_vae(arch, seed=args.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    ckpt_path = train_dir / "vae_checkpoint.pt"
    step = 0
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        vae.load_state_dict(ck["vae"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        print(f"VAE: resumed at step {step}", flush=True)
    world = ShapeWorld("all", seed=args.seed + 101, config=cfg)
    vae.train()
    last_ckpt, t0, losses = time.time(), time.time(), []
    bar = tqdm(total=args.vae_steps, initial=step, desc="vae", mininterval=10 if sys.stderr.isatty() else 60)
    while step < args.vae_steps and not _STOP["requested"]:
        if args.max_minutes and time.time() - T0 > args.max_minutes * 60:
            break
        lr = args.vae_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.vae_steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        x = _vae_frames(world, step, args.vae_batch_frames, args.seed)
        post = vae.encode(x).latent_dist
        z = post.sample(generator=_gen(args.seed, 0xFAE2, step))
        rec = vae.decode(z).sample
        rec_loss = F.mse_loss(rec, x)
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = rec_loss + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(rec_loss.item())
        bar.update(1)
        if step % args.log_every == 0:
            psnr = 10 * math.log10(4.0 / max(np.mean(losses), 1e-12))  # [-1, 1] MSE -> 0..1 PSNR
            bar.set_postfix(mse=f"{np.mean(losses):.5f}", psnr=f"{psnr:.1f}")
            _append_jsonl(
                metrics,
                {
                    "kind": "vae_loss",
                    "step": step,
                    "mse": float(np.mean(losses)),
                    "train_psnr": psnr,
                    "kl": float(kl.detach()),
                    "lr": lr,
                    "time": time.time(),
                },
            )
            losses = []
        if time.time() - last_ckpt > args.checkpoint_minutes * 60 or _STOP["requested"]:
            _save_torch_atomic({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt_path)
            last_ckpt = time.time()
    bar.close()
    if step < args.vae_steps:  # stopped by a signal / time limit
        _save_torch_atomic({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt_path)
        return None
    vae.eval()
    stats = evaluate_vae(vae, cfg, args.seed)
    vae.register_to_config(scaling_factor=round(1.0 / stats["latent_std"], 4))
    stats.update(step=step, scaling_factor=vae.config.scaling_factor, minutes=(time.time() - t0) / 60)
    print(f"VAE: {json.dumps(stats)}", flush=True)
    _append_jsonl(metrics, {"kind": "vae_eval", **stats, "time": time.time()})
    tmp = train_dir / ".vae.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    vae.save_pretrained(tmp, safe_serialization=True)
    _replace_dir(tmp, final)
    (train_dir / "vae_eval.json").write_text(json.dumps(stats, indent=2) + "\n")
    ckpt_path.unlink(missing_ok=True)
    return vae


# ----------------------------------------------------------------------------------------------------------
# Stage 2: teacher
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_clips(vae, clips: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(B, 3, F, H, W) pixels -> (B, 4, F, h, w) scaled latents (posterior samples)."""
    b, _, f, h, w = clips.shape
    x = clips.permute(0, 2, 1, 3, 4).reshape(b * f, 3, h, w)
    z = vae.encode(x).latent_dist.sample(generator=gen) * vae.config.scaling_factor
    return z.reshape(b, f, *z.shape[1:]).permute(0, 2, 1, 3, 4)


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """(B, 4, F, h, w) scaled latents -> (B, 3, F, H, W) pixels in [-1, 1]."""
    b, c, f, h, w = z.shape
    x = vae.decode(z.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w) / vae.config.scaling_factor).sample
    x = x.clamp(-1, 1)
    return x.reshape(b, f, *x.shape[1:]).permute(0, 2, 1, 3, 4)


@torch.no_grad()
def sample(
    unet,
    text: Text,
    encoder,
    prompts: list[str],
    arch: TeacherArch,
    num_frames: int,
    steps: int,
    cfg: float,
    seed: int,
    schedule: str,
) -> torch.Tensor:
    """DDIM (``steps``, on the teacher's ``schedule``) with classifier-free guidance on the UNet's output
    (epsilon or v); returns scaled latents (B, 4, F, h, w)."""
    sched = teacher_scheduler(schedule)
    sched.set_timesteps(steps)
    n = len(prompts)
    s = arch.latent_size
    x = torch.stack(
        [
            torch.randn(arch.latent_channels, num_frames, s, s, generator=_gen(seed, 0x5A4, i))
            for i in range(n)
        ]
    )
    cond = text(prompts + [""] * n, encoder).repeat_interleave(num_frames, dim=0)
    for t in sched.timesteps:
        eps = unet(torch.cat([x, x]), t, encoder_hidden_states=cond).sample
        e_c, e_u = eps.chunk(2)
        x = sched.step(e_u + cfg * (e_c - e_u), t, x).prev_sample
    return x


@torch.no_grad()
def text_use(unet, encoder, vae, text: Text, args, cfg: ShapeWorldConfig, n: int = 8) -> dict:
    """How much the denoiser uses the caption: the training loss (epsilon or v) on a fixed validation batch (held-aside seed,
    t = 100 .. 900) with the right captions, with captions of *other* clips, with the opposite direction word, and "".
    A model that ignores text scores the same three; the gap right -> wrong is what prompt binding buys."""
    world = ShapeWorld("all", seed=args.seed + 4242, config=cfg)
    clips, _ = world.batch(0, n)
    right = [world.spec(i).prompt for i in range(n)]
    wrong = right[1:] + right[:1]
    wrong_direction = [" ".join([*p.split()[:-1], OPPOSITE[p.split()[-1]]]) for p in right]
    gen = _gen(args.seed, 0x7A1, 0)
    z0 = encode_clips(vae, clips, gen)
    noise = torch.randn(z0.shape, generator=gen)
    t = torch.linspace(100, 900, n).round().long()
    sched = teacher_scheduler(args.schedule)
    alphas, prediction_type = sched.alphas_cumprod, sched.config.prediction_type
    out = {}
    variants = (("right", right), ("wrong", wrong), ("wrong_direction", wrong_direction), ("empty", [""] * n))
    for name, caps in variants:
        hidden = text(caps, encoder).repeat_interleave(args.num_frames, dim=0)
        errors = prediction_errors(unet, z0, noise, t, hidden, alphas, prediction_type)
        out[name] = round(errors.mean().item(), 5)
    return out


def evaluate_teacher(
    unet,
    encoder,
    vae,
    text: Text,
    args,
    arch: TeacherArch,
    prompts: list[str],
    step: int,
    samples_dir: Path,
    cfg: ShapeWorldConfig,
) -> dict:
    unet.eval()
    encoder.eval()
    t0 = time.time()
    val = text_use(unet, encoder, vae, text, args, cfg)
    steps, schedule = args.eval_steps, args.schedule
    z = sample(unet, text, encoder, prompts, arch, args.num_frames, steps, args.cfg, args.seed, schedule)
    clips = list(decode_latents(vae, z))
    held = [p in HELD_OUT for p in prompts]
    out: dict = {"kind": "eval", "step": step, "val_loss": val}
    for name, keep in (("train", [not h for h in held]), ("held_out", held)):
        cs = [c for c, k in zip(clips, keep, strict=True) if k]
        ps = [p for p, k in zip(prompts, keep, strict=True) if k]
        if cs:
            acc = probe_accuracy(cs, ps)
            out[name] = {k: round(acc[k], 4) for k in (*ATTRIBUTES, "all")} | {
                "axis": round(axis_accuracy(cs, ps), 4)
            }
    probes = [probe_clip(c) for c in clips]
    out["mean_speed_px_per_frame"] = round(float(np.mean([r.speed for r in probes])), 3)
    out["read"] = [f"{r.color} {r.shape} {r.direction}" for r in probes]
    out["prompts"] = prompts
    out["eval_seconds"] = round(time.time() - t0, 1)
    _save_strip(clips, samples_dir / f"step{step:06d}.png")
    return out


def export_teacher(
    folder: Path,
    vae,
    encoder,
    unet_motion,
    arch: TeacherArch,
    step: int,
    schedule: str,
    world: ShapeWorldConfig,
) -> None:
    """Writes a diffusers-layout teacher folder (safetensors, the ``schedule``'s DDIM config) at ``folder``
    via a temporary sibling; its ``teacher_info.json`` records the step, architecture, schedule and the
    trail of the ``world`` it was trained in."""
    from diffusers import StableDiffusionPipeline

    tmp = folder.with_name(f".{folder.name}.tmp") if folder.name else folder / ".tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    unet2d, adapter = split_unet_motion(unet_motion, arch)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=encoder,
        tokenizer=tiny_tokenizer(),
        unet=unet2d,
        scheduler=teacher_scheduler(schedule),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    adapter.save_pretrained(tmp / "motion_adapter", safe_serialization=True)
    (tmp / "teacher_info.json").write_text(
        json.dumps(
            {"step": step, "arch": arch.to_json(), "schedule": schedule, "world": world.trail_record()},
            indent=2,
        )
        + "\n"
    )
    _replace_dir(tmp, folder)


def export_final(
    out: Path, vae, encoder, unet_motion, arch: TeacherArch, step: int, schedule: str, world: ShapeWorldConfig
) -> None:
    """The final teacher goes to ``out/`` itself: each component folder is swapped in from a temp copy."""
    staging = out / ".final.tmp"
    export_teacher(staging, vae, encoder, unet_motion, arch, step, schedule, world)
    for name in sorted(os.listdir(staging)):
        src, dst = staging / name, out / name
        if src.is_dir():
            _replace_dir(src, dst)
        else:
            os.replace(src, dst)
    shutil.rmtree(staging)


def tied_image_unet(unet_motion, arch: TeacherArch):
    """The ``UNet2DConditionModel`` whose parameters *are* the video UNet's spatial ones (same objects)."""
    unet2d = teacher_unet(arch)
    for name, _ in list(unet2d.named_parameters()):
        module_name, _, leaf = name.rpartition(".")
        setattr(unet2d.get_submodule(module_name), leaf, unet_motion.get_parameter(name))
    return unet2d


def t_kind(args, step: int) -> str:
    return args.t_sampling if step >= args.t_sampling_start_step else "uniform"


def video_batch(world: ShapeWorld, start: int, args, step: int, gen: torch.Generator, n_train: int):
    """The step's clips, captions and timesteps; with --reversal-pairs, pairs share their timestep."""
    if not args.reversal_pairs:
        clips, captions = world.batch(start, args.batch_size)
        return clips, captions, draw_timesteps(args.batch_size, gen, t_kind(args, step), n_train)
    clips, captions = world.reversal_pairs(start, args.batch_size // 2)
    t = draw_timesteps(args.batch_size // 2, gen, t_kind(args, step), n_train)
    return clips, captions, t.repeat(2)


def image_loss(
    unet2d, vae, text: Text, world: ShapeWorld, step: int, args, alphas, prediction_type: str
) -> torch.Tensor:
    """The training loss (epsilon or v) of the spatial UNet on ``--image-batch`` frames, one random frame of each clip."""
    n = args.image_batch
    gen = _gen(args.seed, 0x1AA6E, step)
    clips, captions = world.batch(step * n, n)
    idx = torch.randint(0, clips.shape[2], (n,), generator=gen)
    frames = clips[torch.arange(n), :, idx]  # (n, 3, H, W)
    with torch.no_grad():
        z0 = vae.encode(frames).latent_dist.sample(generator=gen) * vae.config.scaling_factor
    noise = torch.randn(z0.shape, generator=gen)
    t = draw_timesteps(n, gen, t_kind(args, step), len(alphas))
    hidden = text(captions) if args.image_text_grad else text(captions).detach()
    return prediction_errors(unet2d, z0, noise, t, hidden, alphas, prediction_type).mean()


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(pm, 1.0 - decay)


@dataclass
class TeacherRun:
    """What the teacher stage trains and checkpoints: the models, their EMA, the optimizers, the read-out head,
    and where the run stands (``warm_start``: the step the warm-up counts from; ``clips_seen``: where the clip
    stream continues, since --batch-size may change on resume)."""

    unet: torch.nn.Module
    encoder: torch.nn.Module
    ema_unet: torch.nn.Module
    ema_text: torch.nn.Module
    opt: torch.optim.Optimizer
    groups: list[dict]
    head: CaptionAttributeHead
    head_opt: torch.optim.Optimizer
    train_text: bool
    step: int = 0
    clips_seen: int = 0
    warm_start: int = 0


def build_teacher_run(args, arch: TeacherArch) -> TeacherRun:
    import copy

    unet = teacher_unet_motion(arch, seed=args.seed)
    encoder = teacher_text_encoder(arch, seed=args.seed + 2)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(encoder).eval()
    for m in (ema_unet, ema_text):
        m.requires_grad_(False)
    train_text = args.text_lr > 0
    if not train_text:
        encoder.requires_grad_(False)
    groups = unet_param_groups(unet, args.lr, args.motion_lr)
    if train_text:
        groups.append({"params": list(encoder.parameters()), "lr": args.text_lr, "base_lr": args.text_lr})
    opt = torch.optim.AdamW(groups, weight_decay=args.weight_decay)
    with torch.random.fork_rng(devices=[]):  # seeded, and the global RNG left as it was
        torch.manual_seed(args.seed + 3)
        head = CaptionAttributeHead(arch.text_hidden, (len(COLORS), len(SHAPES), len(DIRECTIONS)))
    head_opt = torch.optim.AdamW(head.parameters(), lr=args.text_lr or args.lr, weight_decay=0.0)
    return TeacherRun(unet, encoder, ema_unet, ema_text, opt, groups, head, head_opt, train_text)


def resume_teacher(run: TeacherRun, ckpt_path: Path, args, arch: TeacherArch) -> None:
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if ck["arch"] != arch.to_json():
        raise SystemExit(f"{ckpt_path} was trained with another architecture: {ck['arch']}")
    trained_direction = ck["args"].get("direction", "")
    if trained_direction != args.direction:
        raise ConfigError(
            f"{ckpt_path} was trained with --direction '{trained_direction}', this run has --direction "
            f"'{args.direction}': resume with the same or start a new --out"
        )
    plain = ShapeWorldConfig()  # checkpoints from before --trail-frames: the trail-free world
    trained_trail = (
        ck["args"].get("trail_frames", plain.trail_frames),
        ck["args"].get("trail_opacity", plain.trail_opacity),
    )
    if trained_trail != (args.trail_frames, args.trail_opacity):
        raise ConfigError(
            f"{ckpt_path} was trained with --trail-frames {trained_trail[0]:g} --trail-opacity "
            f"{trained_trail[1]:g}, this run has {args.trail_frames:g} / {args.trail_opacity:g}: resume with "
            "the same trail or start a new --out"
        )
    trained_schedule = ck["args"].get("schedule", "animatediff")
    if trained_schedule != args.schedule:
        raise ConfigError(
            f"{ckpt_path} was trained with --schedule {trained_schedule}, this run has --schedule "
            f"{args.schedule}: resume with the same schedule or start a new --out"
        )
    run.unet.load_state_dict(ck["unet"])
    run.encoder.load_state_dict(ck["text_encoder"])
    run.ema_unet.load_state_dict(ck["ema_unet"])
    run.ema_text.load_state_dict(ck["ema_text_encoder"])
    if len(ck["opt"]["param_groups"]) != len(run.groups):
        raise ConfigError(
            f"{ckpt_path} was trained with --motion-lr {ck['args'].get('motion_lr', 0.0)} (its optimizer has "
            f"{len(ck['opt']['param_groups'])} groups), this run has --motion-lr {args.motion_lr}: "
            "resume with the same setting or start a new --out"
        )
    run.opt.load_state_dict(ck["opt"])
    for g, wanted in zip(run.opt.param_groups, run.groups, strict=True):
        g["base_lr"] = wanted["base_lr"]  # the command line's rates, not the checkpoint's
    if "text_head" in ck:  # absent in runs from before --text-attribute-loss: the read-outs start fresh
        run.head.load_state_dict(ck["text_head"])
        run.head_opt.load_state_dict(ck["text_head_opt"])
    run.step = ck["step"]
    run.clips_seen = ck.get("clips_seen", run.step * ck["args"]["batch_size"])
    run.warm_start = ck.get("warm_start", 0)
    print(f"teacher: resumed at step {run.step} ({run.clips_seen} clips seen)", flush=True)
    if args.init_from:
        print(f"teacher: --init-from {args.init_from} ignored (resuming {ckpt_path})", flush=True)


def init_teacher_from(run: TeacherRun, args, arch: TeacherArch, metrics: Path) -> None:
    step = load_teacher_weights(Path(args.init_from), arch, run.unet, run.encoder, args.schedule)
    if step >= args.steps:
        raise ConfigError(f"--steps {args.steps}: --init-from {args.init_from} is already at step {step}")
    run.step, run.clips_seen, run.warm_start = step, step * args.batch_size, step
    words = [w for w in args.separate_words.split(",") if w]
    if words:
        separate_word_embeddings(run.encoder, words, args.separate_norm, _gen(args.seed, 0x5E9))
    if args.reinit_motion:
        reinit_motion_modules(run.unet, arch, args.seed + 5)
    run.ema_unet.load_state_dict(run.unet.state_dict())
    run.ema_text.load_state_dict(run.encoder.state_dict())
    print(
        f"teacher: initialised from {args.init_from} (step {step}; re-drawn words: {words}; "
        f"fresh motion modules: {args.reinit_motion})",
        flush=True,
    )
    _append_jsonl(
        metrics,
        {
            "kind": "init_from",
            "folder": args.init_from,
            "step": step,
            "words": words,
            "reinit_motion": args.reinit_motion,
        },
    )


def save_teacher_checkpoint(run: TeacherRun, args, arch: TeacherArch, path: Path) -> None:
    _save_torch_atomic(
        {
            "step": run.step,
            "clips_seen": run.clips_seen,
            "warm_start": run.warm_start,
            "arch": arch.to_json(),
            "args": vars(args)
            | {"vae_channels": list(args.vae_channels), "unet_channels": list(args.unet_channels)},
            "unet": run.unet.state_dict(),
            "text_encoder": run.encoder.state_dict(),
            "ema_unet": run.ema_unet.state_dict(),
            "ema_text_encoder": run.ema_text.state_dict(),
            "opt": run.opt.state_dict(),
            "text_head": run.head.state_dict(),
            "text_head_opt": run.head_opt.state_dict(),
        },
        path,
    )


@dataclass
class TeacherData:
    """The teacher stage's fixed inputs: the VAE, the clip streams, the schedule, the text and the read-out
    targets (the 66 training prompts with their attribute labels)."""

    vae: torch.nn.Module
    world: ShapeWorld
    image_world: ShapeWorld
    unet2d: torch.nn.Module | None
    alphas: torch.Tensor
    prediction_type: str  # the schedule's: epsilon (animatediff) or v_prediction (zero-snr-v)
    text: Text
    attr_prompts: list[str]
    attr_labels: torch.Tensor


def teacher_data(args, arch: TeacherArch, cfg: ShapeWorldConfig, vae, run: TeacherRun) -> TeacherData:
    attr_prompts = [p for p in ALL_PROMPTS if p not in HELD_OUT]
    schedule = teacher_scheduler(args.schedule)
    return TeacherData(
        vae=vae,
        world=ShapeWorld("train", args.seed, cfg, args.drop_prompt, args.direction or None),
        image_world=ShapeWorld("train", args.seed + 0x1AA6E, cfg, args.drop_prompt, args.direction or None),
        unet2d=tied_image_unet(run.unet, arch) if args.image_batch > 0 else None,
        alphas=schedule.alphas_cumprod,
        prediction_type=schedule.config.prediction_type,
        text=Text(run.encoder),
        attr_prompts=attr_prompts,
        attr_labels=torch.tensor([attribute_labels(p) for p in attr_prompts]),
    )


def teacher_step(run: TeacherRun, data: TeacherData, args) -> dict[str, float]:
    """One optimizer step of the teacher (and the read-out head); returns its losses."""
    step = run.step
    for g in run.opt.param_groups:
        g["lr"] = g["base_lr"] * min(1.0, (step + 1 - run.warm_start) / max(args.warmup, 1))
    gen = _gen(args.seed, 0x7EAC, step)
    clips, captions, t = video_batch(data.world, run.clips_seen, args, step, gen, len(data.alphas))
    z0 = encode_clips(data.vae, clips, gen)
    noise = torch.randn(z0.shape, generator=gen)
    hidden = data.text(captions).repeat_interleave(args.num_frames, dim=0)
    per_clip = prediction_errors(run.unet, z0, noise, t, hidden, data.alphas, data.prediction_type)
    losses = {"loss": per_clip.mean().item()}
    total = (video_loss_weights(t, data.alphas, args.x0_weight_max) * per_clip).mean()
    if args.terminal_loss > 0:  # the same clips and captions, the input pure noise near t = T
        t_end = torch.randint(len(data.alphas) * 19 // 20, len(data.alphas), (len(captions),), generator=gen)
        pure = torch.randn(z0.shape, generator=gen)
        terminal = terminal_x0_errors(run.unet, z0, pure, t_end, hidden, data.alphas).mean()
        losses["terminal_loss"] = terminal.item()
        total = total + args.terminal_loss * terminal
    if args.text_attribute_loss > 0:
        attr = caption_attribute_loss(
            run.head, data.text(data.attr_prompts), data.attr_labels, DIRECTION_POSITION
        )
        losses["text_attribute_loss"] = attr.item()
        total = total + args.text_attribute_loss * attr
    if data.unet2d is not None and step >= args.image_start_step:
        img_loss = image_loss(
            data.unet2d, data.vae, data.text, data.image_world, step, args, data.alphas, data.prediction_type
        )
        losses["image_loss"] = img_loss.item()
        total = total + img_loss
    run.opt.zero_grad(set_to_none=True)
    run.head_opt.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_([p for g in run.opt.param_groups for p in g["params"]], args.grad_clip)
    run.opt.step()
    run.head_opt.step()
    decay = min(args.ema, (1 + step) / (10 + step))  # warm EMA: early snapshots are not the init
    _ema_update(run.ema_unet, run.unet, decay)
    if run.train_text:
        _ema_update(run.ema_text, run.encoder, decay)
    run.step += 1
    run.clips_seen += args.batch_size // 2 if args.reversal_pairs else args.batch_size
    return losses


def loss_record(run: TeacherRun, window: list[dict[str, float]], seconds: float) -> dict:
    """The metrics.jsonl line of the last --log-every steps: mean of each loss, lr, seconds per step."""
    rec = {
        "kind": "loss",
        "step": run.step,
        "loss": float(np.mean([w["loss"] for w in window])),
        "lr": run.opt.param_groups[0]["lr"],
        "sec_per_step": seconds / len(window),
        "time": time.time(),
    }
    for name in ("image_loss", "text_attribute_loss", "terminal_loss"):
        values = [w[name] for w in window if name in w]
        if values:
            rec[name] = float(np.mean(values))
    return rec


def evaluate_and_snapshot(
    run: TeacherRun,
    data: TeacherData,
    args,
    arch: TeacherArch,
    cfg: ShapeWorldConfig,
    out: Path,
    metrics: Path,
) -> None:
    """Samples and probes the EMA teacher, logs it, and writes it to ``<out>/snapshot``."""
    prompts = eval_prompts(args.eval_train_prompts, args.eval_held_out, args.direction)
    ev = evaluate_teacher(
        run.ema_unet,
        run.ema_text,
        data.vae,
        data.text,
        args,
        arch,
        prompts,
        run.step,
        out / "training" / "samples",
        cfg,
    )
    ev["time"] = time.time()
    _append_jsonl(metrics, ev)
    print(
        f"\neval step {run.step}: train {ev.get('train')} held_out {ev.get('held_out')} "
        f"speed {ev['mean_speed_px_per_frame']} val_loss {ev['val_loss']} ({ev['eval_seconds']} s)",
        flush=True,
    )
    export_teacher(out / "snapshot", data.vae, run.ema_text, run.ema_unet, arch, run.step, args.schedule, cfg)
    run.unet.train()
    run.encoder.train(run.train_text)


def train_teacher(
    args, arch: TeacherArch, cfg: ShapeWorldConfig, vae, out: Path, train_dir: Path, metrics: Path
) -> int:
    run = build_teacher_run(args, arch)
    ckpt_path = train_dir / "checkpoint.pt"
    if ckpt_path.exists():
        resume_teacher(run, ckpt_path, args, arch)
        _append_jsonl(metrics, {"kind": "resume", "step": run.step, "time": time.time()})
    elif args.init_from:
        init_teacher_from(run, args, arch, metrics)
    models = (("UNetMotionModel", run.unet), ("CLIPTextModel", run.encoder), ("AutoencoderKL", vae))
    sizes = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in models}
    print("teacher: " + ", ".join(f"{k} {v:.3f} M" for k, v in sizes.items()) + " params", flush=True)
    data = teacher_data(args, arch, cfg, vae, run)
    run.unet.train()
    run.encoder.train(run.train_text)
    t_start, last_ckpt, t_log, window = time.time(), time.time(), time.time(), []
    bar = tqdm(
        total=args.steps, initial=run.step, desc="teacher", mininterval=10 if sys.stderr.isatty() else 60
    )
    while run.step < args.steps:
        if _STOP["requested"] or (args.max_minutes and time.time() - T0 > args.max_minutes * 60):
            break
        window.append(teacher_step(run, data, args))
        bar.update(1)
        if run.step % args.log_every == 0:
            rec = loss_record(run, window, time.time() - t_log)
            _append_jsonl(metrics, rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            window, t_log = [], time.time()
        if run.step % args.eval_every == 0 or run.step == args.steps:
            evaluate_and_snapshot(run, data, args, arch, cfg, out, metrics)
            t_log = time.time()
        if time.time() - last_ckpt > args.checkpoint_minutes * 60:
            save_teacher_checkpoint(run, args, arch, ckpt_path)
            last_ckpt = time.time()
    bar.close()
    save_teacher_checkpoint(run, args, arch, ckpt_path)
    if run.step >= args.steps and not args.no_final_export:
        export_final(out, vae, run.ema_text, run.ema_unet, arch, run.step, args.schedule, cfg)
        print(f"teacher: final EMA teacher written to {out} (step {run.step})", flush=True)
    print(f"teacher: stopped at step {run.step} after {(time.time() - t_start) / 60:.1f} min", flush=True)
    return run.step


T0 = time.time()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.reversal_pairs and args.batch_size % 2:
        parser.error(f"--reversal-pairs needs an even --batch-size, got {args.batch_size}")
    if args.separate_words and not args.init_from:
        parser.error("--separate-words re-draws embeddings of an --init-from teacher; give --init-from")
    if args.reinit_motion and not args.init_from:
        parser.error(
            "--reinit-motion replaces the motion modules of an --init-from teacher; give --init-from"
        )
    if args.separate_norm <= 0:
        parser.error(f"--separate-norm must be > 0, got {args.separate_norm}")
    if args.direction and args.reversal_pairs:
        parser.error("--reversal-pairs adds clips moving the opposite way; a --direction run cannot use it")
    if args.trail_frames < 0 or not 0 < args.trail_opacity <= 1:
        parser.error(
            f"--trail-frames must be >= 0 and --trail-opacity in (0, 1], got {args.trail_frames:g} and "
            f"{args.trail_opacity:g}"
        )
    if args.trail_frames > 0 and args.reversal_pairs:
        parser.error("--reversal-pairs plays clips backwards, and a reversed trail points ahead: drop one")
    if args.schedule == "zero-snr-v" and args.x0_weight_max != 1:
        parser.error(
            "--x0-weight-max weights the epsilon loss; --schedule zero-snr-v trains v, whose loss already is "
            "the x0 error where the noise dominates (|v err|^2 = |eps err|^2 + |x0 err|^2): leave it at 1"
        )
    if args.schedule == "zero-snr-v" and args.terminal_loss > 0:
        parser.error(
            "--terminal-loss stands in for a zero terminal SNR; with --schedule zero-snr-v the data loss at "
            "t = 999 already is the x0 error from pure noise: leave it at 0"
        )
    if args.text_attribute_loss > 0 and args.text_lr <= 0:
        parser.error("--text-attribute-loss trains the text encoder; it needs --text-lr > 0")
    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    out = Path(args.out)
    train_dir = out / "training"
    train_dir.mkdir(parents=True, exist_ok=True)
    metrics = train_dir / "metrics.jsonl"
    arch = TeacherArch(
        frame_size=args.frame_size,
        vae_channels=tuple(args.vae_channels),
        unet_channels=tuple(args.unet_channels),
        cross_attn_levels=args.cross_attn_levels,
        unet_groups=args.unet_groups,
        unet_heads=args.unet_heads,
        motion_heads=args.motion_heads,
        text_hidden=args.text_hidden,
        text_layers=args.text_layers,
        max_frames=max(32, args.num_frames),
    )
    cfg = ShapeWorldConfig(
        size=args.frame_size,
        num_frames=args.num_frames,
        trail_frames=args.trail_frames,
        trail_opacity=args.trail_opacity,
    )
    _append_jsonl(
        metrics,
        {
            "kind": "start",
            "argv": sys.argv[1:] if argv is None else argv,
            "arch": arch.to_json(),
            "pid": os.getpid(),
            "time": time.time(),
        },
    )
    print(f"train_tiny_teacher: pid {os.getpid()}, out {out}, arch {json.dumps(arch.to_json())}", flush=True)
    if args.init_from and not (train_dir / "checkpoint.pt").exists():
        install_init_vae(parser, Path(args.init_from), arch, train_dir)
    vae = fit_vae(args, arch, cfg, train_dir, metrics)
    if vae is None:
        print("stopped during the VAE stage; run again to resume", flush=True)
        return 0
    vae.requires_grad_(False)

    def teacher_stage() -> int:
        train_teacher(args, arch, cfg, vae, out, train_dir, metrics)
        return 0

    return exit_status_of(teacher_stage, debug=False)


def install_init_vae(
    parser: argparse.ArgumentParser, folder: Path, arch: TeacherArch, train_dir: Path
) -> None:
    """Before a run starts from ``--init-from``: check the folder is a teacher of this architecture and make its
    VAE the run's (``training/vae``); a different VAE already there is an error, never silently kept."""
    info = folder / "teacher_info.json"
    needed = ("teacher_info.json", "vae/config.json", "unet/config.json", "motion_adapter/config.json",
              "text_encoder/config.json")  # fmt: skip
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        parser.error(
            f"--init-from {folder}: not a train_tiny_teacher.py folder (missing {', '.join(missing)})"
        )
    if json.loads(info.read_text()).get("arch") != arch.to_json():
        parser.error(f"--init-from {folder}: its architecture (teacher_info.json) is not this run's")
    mine = train_dir / "vae"
    if (mine / "config.json").exists():
        same = all(
            (mine / f.name).is_file() and (mine / f.name).read_bytes() == f.read_bytes()
            for f in (folder / "vae").iterdir()
        )
        if not same:
            parser.error(f"--init-from {folder}: {mine} holds another VAE; use a fresh --out")
        return
    tmp = train_dir / ".vae.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(folder / "vae", tmp)
    _replace_dir(tmp, mine)


if __name__ == "__main__":
    sys.exit(main())
