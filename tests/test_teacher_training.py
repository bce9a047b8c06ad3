"""The tiny teacher's recipe pieces (perflow_video/tiny/teacher_training.py) and the training script's
--init-from / --separate-words / --x0-weight-max path."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from perflow_video.errors import ConfigError
from perflow_video.method.teacher_solver import eps_from_model_output, x0_from_model_output
from perflow_video.tiny.embedded_teacher import tiny_teacher_folder
from perflow_video.tiny.teacher_models import (
    TeacherArch,
    teacher_motion_adapter,
    teacher_scheduler,
    teacher_text_encoder,
    teacher_unet_motion,
)
from perflow_video.tiny.teacher_training import (
    CaptionAttributeHead,
    caption_attribute_loss,
    draw_timesteps,
    load_teacher_weights,
    prediction_errors,
    prediction_target,
    reinit_motion_modules,
    separate_word_embeddings,
    terminal_x0_errors,
    unet_param_groups,
    video_loss_weights,
)
from perflow_video.tiny.tiny_tokenizer import tiny_tokenizer

ALPHAS = teacher_scheduler().alphas_cumprod


def test_weighted_epsilon_loss_is_the_x0_error_where_the_snr_is_below_one():
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([50, 400, 700, 999])
    x0, eps, eps_hat = (torch.randn(4, 4, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    a = ALPHAS[t].double().view(-1, 1, 1, 1, 1)
    z_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    x0_hat = (z_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
    eps_err = (eps_hat - eps).pow(2).mean(dim=(1, 2, 3, 4))
    x0_err = (x0_hat - x0).pow(2).mean(dim=(1, 2, 3, 4))
    w = video_loss_weights(t, ALPHAS, cap=1e9).double()
    snr = (a / (1 - a)).flatten()
    for i in range(4):
        if snr[i] < 1:
            torch.testing.assert_close(w[i] * eps_err[i], x0_err[i], rtol=1e-5, atol=0)
        else:
            assert w[i] == 1.0
    capped = video_loss_weights(t, ALPHAS, cap=20.0)
    assert capped[-1] == 20.0 and capped[0] == 1.0
    assert torch.equal(video_loss_weights(t, ALPHAS, cap=1.0), torch.ones(4))
    with pytest.raises(ConfigError, match="cap"):
        video_loss_weights(t, ALPHAS, cap=0.5)


class _Oracle(torch.nn.Module):
    """Returns the exact noise of z_t for a known z0: its epsilon error is 0 iff z_t was built right."""

    def __init__(self, z0: torch.Tensor, alphas: torch.Tensor) -> None:
        super().__init__()
        self.z0, self.alphas = z0, alphas

    def forward(self, z_t, t, encoder_hidden_states):  # noqa: ARG002
        a = self.alphas[t].view(-1, *([1] * (z_t.dim() - 1)))
        return type("Out", (), {"sample": (z_t - a.sqrt() * self.z0) / (1 - a).sqrt()})()


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (3, 4, 5, 8, 8)])
def test_epsilon_prediction_errors_vanish_for_the_true_noise_and_are_per_sample(shape):
    g = torch.Generator().manual_seed(2)
    z0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.tensor([3, 500, 990])
    hidden = torch.zeros(3, 77, 32)
    errors = prediction_errors(_Oracle(z0, ALPHAS), z0, noise, t, hidden, ALPHAS, "epsilon")
    assert errors.abs().max() < 1e-4
    off = prediction_errors(_Oracle(z0 + 1.0, ALPHAS), z0, noise, t, hidden, ALPHAS, "epsilon")
    a = ALPHAS[t]
    torch.testing.assert_close(
        off, a / (1 - a), rtol=1e-4, atol=0
    )  # shifted x0 by 1 -> eps off by sqrt(a/(1-a))


ZERO_SNR = teacher_scheduler("zero-snr-v").alphas_cumprod


class _VOracle(_Oracle):
    """Returns the exact v = sqrt(abar) eps - sqrt(1 - abar) z0 of z_t for a known z0 (defined at abar = 0)."""

    def forward(self, z_t, t, encoder_hidden_states):  # noqa: ARG002
        a = self.alphas[t].view(-1, *([1] * (z_t.dim() - 1)))
        eps = (z_t - a.sqrt() * self.z0) / (1 - a).sqrt()
        return type("Out", (), {"sample": a.sqrt() * eps - (1 - a).sqrt() * self.z0})()


def test_zero_snr_v_schedule_ends_in_pure_noise_and_its_v_objective_is_eps_plus_x0_error():
    assert ZERO_SNR[-1] == 0 and ALPHAS[-1] > 1e-3  # AnimateDiff's keeps sqrt(0.0016) = 4 % of the clip
    torch.testing.assert_close(ZERO_SNR[0], ALPHAS[0], rtol=1e-3, atol=0)  # the low-noise end is kept
    g = torch.Generator().manual_seed(4)
    z0, noise = torch.randn(3, 4, 5, 8, 8, generator=g), torch.randn(3, 4, 5, 8, 8, generator=g)
    t, hidden = torch.tensor([3, 500, 999]), torch.zeros(3, 77, 32)
    errors = prediction_errors(_VOracle(z0, ZERO_SNR), z0, noise, t, hidden, ZERO_SNR, "v_prediction")
    assert errors.abs().max() < 1e-4  # z_t built right, at t = 999 (abar = 0) too
    # an oracle off by 1 in x0 is off by |eps err|^2 + |x0 err|^2 = abar / (1 - abar) + 1 = 1 / (1 - abar) in v
    off = prediction_errors(_VOracle(z0 + 1.0, ZERO_SNR), z0, noise, t, hidden, ZERO_SNR, "v_prediction")
    torch.testing.assert_close(off, 1 / (1 - ZERO_SNR[t]), rtol=1e-4, atol=0)
    # the target's x0 and eps read back exactly, at abar = 0 too (where x0 = -v)
    a = ZERO_SNR[t]
    z_t = a.sqrt().view(-1, 1, 1, 1, 1) * z0 + (1 - a).sqrt().view(-1, 1, 1, 1, 1) * noise
    v = prediction_target(z0, noise, a, "v_prediction")
    torch.testing.assert_close(x0_from_model_output(v, z_t, a, "v_prediction"), z0, atol=1e-5, rtol=0)
    torch.testing.assert_close(eps_from_model_output(v, z_t, a, "v_prediction"), noise, atol=1e-5, rtol=0)
    assert torch.equal(prediction_target(z0, noise, a, "epsilon"), noise)
    with pytest.raises(ConfigError, match="prediction_type"):
        prediction_target(z0, noise, a, "sample")


def test_terminal_x0_errors_measure_the_prediction_from_pure_noise():
    g = torch.Generator().manual_seed(3)
    z0, noise = torch.randn(3, 4, 5, 8, 8, generator=g), torch.randn(3, 4, 5, 8, 8, generator=g)
    t, hidden = torch.tensor([950, 980, 999]), torch.zeros(3, 77, 32)
    # an oracle that knows z0 predicts it from any input; one that knows z0 + 0.5 is 0.25 off, per sample
    assert terminal_x0_errors(_Oracle(z0, ALPHAS), z0, noise, t, hidden, ALPHAS).abs().max() < 1e-3
    off = terminal_x0_errors(_Oracle(z0 + 0.5, ALPHAS), z0, noise, t, hidden, ALPHAS)
    torch.testing.assert_close(off, torch.full((3,), 0.25), rtol=1e-3, atol=0)
    # a UNet that outputs its input as the noise predicts x0 = z (1 - sqrt(1 - abar)) / sqrt(abar)
    echo = type(
        "Echo",
        (torch.nn.Module,),
        {"forward": lambda self, z, t, encoder_hidden_states: type("O", (), {"sample": z})()},
    )()
    a = ALPHAS[t].view(-1, 1, 1, 1, 1)
    expected = ((noise * (1 - (1 - a).sqrt()) / a.sqrt() - z0) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(terminal_x0_errors(echo, z0, noise, t, hidden, ALPHAS), expected)


def test_high_timesteps_put_three_quarters_above_the_middle():
    t = draw_timesteps(40_000, torch.Generator().manual_seed(1), "high")
    assert t.min() >= 0 and t.max() <= 999
    assert abs((t >= 500).float().mean().item() - 0.75) < 0.01
    u = draw_timesteps(40_000, torch.Generator().manual_seed(1), "uniform")
    assert abs((u >= 500).float().mean().item() - 0.5) < 0.01
    top = draw_timesteps(40_000, torch.Generator().manual_seed(1), "top")
    assert top.min() == 800 and top.max() == 999 and abs(top.float().mean().item() - 899.5) < 1
    with pytest.raises(ConfigError, match="uniform"):
        draw_timesteps(3, torch.Generator(), "low")


def test_separated_words_are_orthogonal_of_the_given_norm_and_nothing_else_moves():
    encoder = teacher_text_encoder(TeacherArch())
    before = encoder.get_input_embeddings().weight.detach().clone()
    words = ["left", "right", "up", "down"]
    separate_word_embeddings(encoder, words, 1.5, torch.Generator().manual_seed(3))
    after = encoder.get_input_embeddings().weight.detach()
    ids = [tiny_tokenizer()(w).input_ids[1] for w in words]
    rows = after[ids].double()
    torch.testing.assert_close(rows @ rows.T, 1.5**2 * torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    others = torch.ones(len(after), dtype=torch.bool)
    others[ids] = False
    assert torch.equal(after[others], before[others])
    # on the shipped teacher's encoder the hidden states at the direction word move >= 3x further apart
    from transformers import CLIPTextModel

    shipped = CLIPTextModel.from_pretrained(tiny_teacher_folder() / "text_encoder").eval()
    tok = tiny_tokenizer()

    def left_right_distance() -> float:
        with torch.no_grad():
            h = [
                shipped(tok(f"a red circle moving {w}", return_tensors="pt").input_ids)[0][0, 5]
                for w in words[:2]
            ]
        return (h[0] - h[1]).norm().item()

    before = left_right_distance()
    separate_word_embeddings(shipped, words, 1.0, torch.Generator().manual_seed(3))
    assert left_right_distance() > 3 * before
    with pytest.raises(ConfigError, match="tokens"):
        separate_word_embeddings(encoder, ["leftward-ish"], 1.0, torch.Generator())


def test_teacher_weights_load_into_the_same_architecture_and_refuse_another(tmp_path: Path):
    folder = tiny_teacher_folder()
    arch = TeacherArch()
    unet, encoder = teacher_unet_motion(arch, seed=5), teacher_text_encoder(arch, seed=6)
    step = load_teacher_weights(folder, arch, unet, encoder)
    assert step == json.loads((folder / "teacher_info.json").read_text())["step"]
    from transformers import CLIPTextModel

    ref = CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in encoder.state_dict().items())
    from safetensors.torch import load_file

    motion = load_file(folder / "motion_adapter" / "diffusion_pytorch_model.safetensors")
    state = unet.state_dict()
    for key, value in motion.items():  # adapter keys 'down_blocks.0.motion_modules...' are the UNet's own
        assert torch.equal(state[key], value), key
    other = TeacherArch(unet_channels=(32, 64, 96))
    with pytest.raises(ConfigError, match="architecture"):
        load_teacher_weights(folder, other, teacher_unet_motion(other), teacher_text_encoder(other))
    with pytest.raises(ConfigError, match="teacher_info.json"):
        load_teacher_weights(tmp_path, arch, unet, encoder)


def test_caption_attribute_loss_is_the_mean_cross_entropy_over_attributes_and_tail_positions():
    g = torch.Generator().manual_seed(4)
    head = CaptionAttributeHead(8, (6, 3, 4))
    hidden = torch.randn(5, 10, 8, generator=g)
    labels = torch.stack([torch.randint(0, n, (5,), generator=g) for n in (6, 3, 4)], dim=1)
    by_hand = []
    for a, linear in enumerate(head.heads):
        logits = linear(hidden[:, 7:])  # (5, 3, n)
        by_hand.append(
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, a].repeat_interleave(3))
        )
    torch.testing.assert_close(caption_attribute_loss(head, hidden, labels, 7), torch.stack(by_hand).mean())
    hidden.requires_grad_(True)
    caption_attribute_loss(head, hidden, labels, 7).backward()
    assert hidden.grad[:, :7].abs().max() == 0 and hidden.grad[:, 7:].abs().max() > 0


def test_the_attribute_loss_puts_the_direction_into_the_padding_of_a_tiny_clip_encoder():
    """What the loss is for: after 150 steps on the 66 training captions, the direction word can be read
    from the *last padding position* of the teacher's CLIPTextModel (it cannot at initialisation)."""
    from perflow_video.toy.shape_world import ALL_PROMPTS, DIRECTION_POSITION, HELD_OUT, attribute_labels

    torch.manual_seed(0)
    prompts = [p for p in ALL_PROMPTS if p not in HELD_OUT]
    labels = torch.tensor([attribute_labels(p) for p in prompts])
    tok = tiny_tokenizer()
    ids = tok(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    encoder = teacher_text_encoder(TeacherArch(), seed=2)
    head = CaptionAttributeHead(32, (6, 3, 4))

    def direction_accuracy() -> float:
        with torch.no_grad():
            last = encoder(ids)[0][:, -1]
            return (head(last)[2].argmax(-1) == labels[:, 2]).float().mean().item()

    assert direction_accuracy() < 0.6
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        caption_attribute_loss(head, encoder(ids)[0], labels, DIRECTION_POSITION).backward()
        opt.step()
    assert direction_accuracy() == 1.0


def _script():
    return _load_script("train_tiny_teacher")


def _load_script(name: str):
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: the script's dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_script_continues_from_a_teacher_folder_with_separated_words(tmp_path: Path, capsys):
    """Two steps from the packaged teacher: the step count continues from its teacher_info.json, the VAE
    is its own (no VAE stage), the exported teacher keeps the re-drawn direction words apart."""
    script = _script()
    out = tmp_path / "run"
    start = json.loads((tiny_teacher_folder() / "teacher_info.json").read_text())["step"]
    argv = [
        "--out", str(out), "--init-from", str(tiny_teacher_folder()), "--separate-words", "left,right",
        "--separate-norm", "2.0", "--x0-weight-max", "20", "--steps", str(start + 2), "--batch-size", "2",
        "--reversal-pairs", "--image-batch", "2", "--text-attribute-loss", "0.1", "--terminal-loss", "0.1", "--eval-every", "1000000", "--eval-train-prompts", "1", "--eval-held-out", "0",
        "--eval-steps", "2", "--checkpoint-minutes", "100", "--log-every", "1",
    ]  # fmt: skip
    assert script.main(argv) == 0
    assert json.loads((out / "teacher_info.json").read_text())["step"] == start + 2
    records = [json.loads(line) for line in (out / "training" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["kind"] == "loss"]
    assert lrs == pytest.approx([5e-4 * 1 / 300, 5e-4 * 2 / 300])  # the warm-up restarts at the folder's step
    # the x0 error from pure noise near T: about the latents' variance (1) for a teacher trained without it
    assert all(
        "text_attribute_loss" in r and 0.3 < r["terminal_loss"] < 3 for r in records if r["kind"] == "loss"
    )
    checkpoint = torch.load(out / "training" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert checkpoint["warm_start"] == start and "text_head" in checkpoint
    vae_src = tiny_teacher_folder() / "vae" / "diffusion_pytorch_model.safetensors"
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == vae_src.read_bytes()
    from transformers import CLIPTextModel

    emb = CLIPTextModel.from_pretrained(out / "text_encoder").get_input_embeddings().weight
    ids = [tiny_tokenizer()(w).input_ids[1] for w in ("left", "right")]
    assert abs(emb[ids[0]].norm().item() - 2.0) < 0.05  # two steps of lr warm-up barely move them
    assert abs(emb[ids[0]] @ emb[ids[1]]) < 0.05
    assert any(r["kind"] == "init_from" and r["step"] == start for r in records)
    # the same two steps with the plain epsilon loss end elsewhere: the weights reach the gradient
    plain = tmp_path / "plain"
    argv[argv.index("--x0-weight-max") + 1] = "1"
    argv[argv.index("--out") + 1] = str(plain)
    assert script.main(argv) == 0
    from safetensors.torch import load_file

    name = "motion_adapter/diffusion_pytorch_model.safetensors"
    weighted, unweighted = load_file(out / name), load_file(plain / name)
    assert any(not torch.equal(weighted[k], unweighted[k]) for k in weighted)
    # --motion-lr: its own warmed-up rate for the adapter's weights; a resume must keep the setting
    argv[argv.index("--out") + 1] = str(tmp_path / "motion")
    assert script.main([*argv, "--motion-lr", "2e-3"]) == 0
    groups = torch.load(tmp_path / "motion" / "training" / "checkpoint.pt", weights_only=False)["opt"][
        "param_groups"
    ]
    assert [g["lr"] for g in groups] == pytest.approx([5e-4 * 2 / 300, 2e-3 * 2 / 300, 1e-3 * 2 / 300])
    argv[argv.index("--steps") + 1] = str(start + 3)
    capsys.readouterr()
    assert script.main(argv) != 0
    assert "--motion-lr 0.002" in capsys.readouterr().err


def test_script_refuses_a_partial_folder_another_vae_and_flags_without_their_partner(tmp_path: Path, capsys):
    script = _script()
    partial = tmp_path / "not-a-teacher"
    shutil.copytree(tiny_teacher_folder() / "text_encoder", partial / "text_encoder")
    with pytest.raises(SystemExit):
        script.main(["--out", str(tmp_path / "run"), "--init-from", str(partial)])
    err = capsys.readouterr().err
    assert "--init-from" in err and "vae/config.json" in err and "unet/config.json" in err
    assert not (tmp_path / "run" / "training" / "vae").exists()  # nothing installed from a refused folder
    other = tmp_path / "other"
    shutil.copytree(tiny_teacher_folder() / "vae", other / "training" / "vae")
    (other / "training" / "vae" / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        script.main(["--out", str(other), "--init-from", str(tiny_teacher_folder())])
    assert "holds another VAE" in capsys.readouterr().err
    for flags, message in (
        (["--separate-words", "left"], "--init-from"),
        (["--reinit-motion"], "--init-from"),
        (["--text-attribute-loss", "0.1", "--text-lr", "0"], "--text-lr"),
        (["--schedule", "zero-snr-v", "--x0-weight-max", "20"], "--x0-weight-max"),
        (["--schedule", "zero-snr-v", "--terminal-loss", "0.1"], "--terminal-loss"),
        (["--direction", "left", "--reversal-pairs"], "a --direction run"),
    ):
        with pytest.raises(SystemExit):
            script.main(["--out", str(tmp_path / "x"), *flags])
        assert message in capsys.readouterr().err


def test_script_fine_tunes_into_the_zero_snr_v_schedule_and_a_resume_must_keep_it(tmp_path: Path, capsys):
    """One step from the packaged (epsilon) teacher into --schedule zero-snr-v: the loss it logs is the v
    objective (an epsilon teacher's v error is ~1, its epsilon error ~0.03), the exported scheduler is the
    zero-terminal-SNR v one, read by diffusers; resuming under the other schedule is refused by name."""
    from diffusers import DDIMScheduler

    script = _script()
    out = tmp_path / "zsnr"
    start = json.loads((tiny_teacher_folder() / "teacher_info.json").read_text())["step"]
    argv = [
        "--out", str(out), "--init-from", str(tiny_teacher_folder()), "--schedule", "zero-snr-v",
        "--steps", str(start + 1), "--batch-size", "2", "--eval-every", "1000000", "--eval-train-prompts", "1",
        "--eval-held-out", "0", "--eval-steps", "2", "--checkpoint-minutes", "100", "--log-every", "1",
    ]  # fmt: skip
    assert script.main(argv) == 0
    records = [json.loads(line) for line in (out / "training" / "metrics.jsonl").read_text().splitlines()]
    (loss,) = [r["loss"] for r in records if r["kind"] == "loss"]
    assert loss > 0.3
    scheduler = DDIMScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.alphas_cumprod[-1] == 0
    assert json.loads((out / "teacher_info.json").read_text())["schedule"] == "zero-snr-v"
    argv[argv.index("--steps") + 1] = str(start + 2)
    argv[argv.index("--schedule") + 1] = "animatediff"
    capsys.readouterr()
    assert script.main(argv) != 0
    assert "--schedule zero-snr-v" in capsys.readouterr().err
    # a v teacher is never continued as an epsilon one
    arch = TeacherArch()
    with pytest.raises(ConfigError, match="--schedule zero-snr-v"):
        load_teacher_weights(out, arch, teacher_unet_motion(arch), teacher_text_encoder(arch), "animatediff")


def test_script_trains_in_a_world_with_trails_and_a_resume_must_keep_the_trail(tmp_path: Path, capsys):
    """One step from the packaged teacher with --trail-frames; resuming without the trail is refused by name,
    and reversal pairs (whose reversed trail would point ahead) are refused up front."""
    script = _script()
    out = tmp_path / "trail"
    start = json.loads((tiny_teacher_folder() / "teacher_info.json").read_text())["step"]
    argv = [
        "--out", str(out), "--init-from", str(tiny_teacher_folder()), "--trail-frames", "4",
        "--steps", str(start + 1), "--batch-size", "2", "--eval-every", "1000000", "--eval-train-prompts", "1",
        "--eval-held-out", "0", "--eval-steps", "2", "--checkpoint-minutes", "100", "--log-every", "1",
    ]  # fmt: skip
    assert script.main(argv) == 0
    assert json.loads((out / "teacher_info.json").read_text())["world"]["trail_frames"] == 4
    diagnose = _load_script("diagnose_caption_use")  # measures in the world the teacher was trained in
    assert diagnose.teacher_world(str(out)).trail_frames == 4
    assert diagnose.teacher_world(str(tiny_teacher_folder())).trail_frames == 0
    argv[argv.index("--steps") + 1] = str(start + 2)
    argv[argv.index("--trail-frames") + 1] = "0"
    capsys.readouterr()
    assert script.main(argv) != 0
    assert "--trail-frames 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main([*argv[:-2], "--trail-frames", "4", "--reversal-pairs"])
    assert "reversed trail" in capsys.readouterr().err


def test_a_direction_runs_eval_prompts_are_that_directions_training_and_held_out_prompts():
    from perflow_video.toy.shape_world import HELD_OUT, parse_prompt

    prompts = _script().eval_prompts(16, 2, "left")
    assert len(set(prompts)) == 18 and {parse_prompt(p)[2] for p in prompts} == {"left"}
    assert [p in HELD_OUT for p in prompts] == [False] * 16 + [True] * 2


def test_caption_token_positions_hold_for_every_prompt():
    from perflow_video.toy.shape_world import ALL_PROMPTS, DIRECTION_POSITION, EOS_POSITION, parse_prompt

    tok = tiny_tokenizer()
    for prompt in ALL_PROMPTS:
        ids = tok(prompt).input_ids
        assert ids[DIRECTION_POSITION] == tok(parse_prompt(prompt)[2]).input_ids[1]
        assert ids[EOS_POSITION] == tok.eos_token_id and len(ids) == EOS_POSITION + 1


def test_unet_param_groups_put_exactly_the_adapters_weights_in_the_motion_group():
    unet = teacher_unet_motion(TeacherArch(), seed=0)
    (single,) = unet_param_groups(unet, 5e-4, 0.0)
    assert len(single["params"]) == len(list(unet.parameters())) and single["base_lr"] == 5e-4
    spatial, motion = unet_param_groups(unet, 5e-4, 2e-3)
    assert (spatial["lr"], motion["lr"], motion["base_lr"]) == (5e-4, 2e-3, 2e-3)
    adapter_keys = {n for n, _ in teacher_motion_adapter(TeacherArch()).named_parameters()}  # what users load
    by_id = {id(p): n for n, p in unet.named_parameters()}
    assert {by_id[id(p)] for p in motion["params"]} == adapter_keys
    assert len(spatial["params"]) + len(motion["params"]) == len(list(unet.parameters()))
    assert not {id(p) for p in spatial["params"]} & {id(p) for p in motion["params"]}


def test_fresh_motion_modules_make_the_video_unet_the_image_unet_frame_by_frame():
    """AnimateDiff's initialisation: with reinit_motion_modules, the shipped teacher's video UNet gives, for
    every frame, what its spatial UNet alone gives for that frame (and the spatial weights are untouched)."""
    arch = TeacherArch()
    unet = teacher_unet_motion(arch)
    load_teacher_weights(tiny_teacher_folder(), arch, unet, teacher_text_encoder(arch))
    spatial_before = {k: v.clone() for k, v in unet.state_dict().items() if "motion_modules" not in k}
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 6, arch.latent_size, arch.latent_size, generator=g)
    hidden = torch.randn(12, 77, arch.text_hidden, generator=g)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        trained = unet(z, t, encoder_hidden_states=hidden).sample
        reinit_motion_modules(unet, arch, seed=5)
        video = unet(z, t, encoder_hidden_states=hidden).sample
    unet2d = UNet2DConditionModel.from_pretrained(tiny_teacher_folder() / "unet").eval()
    frames = z.permute(0, 2, 1, 3, 4).flatten(0, 1)
    with torch.no_grad():
        image = unet2d(frames, t.repeat_interleave(6), encoder_hidden_states=hidden).sample
    assert torch.allclose(video, image.unflatten(0, (2, 6)).permute(0, 2, 1, 3, 4), atol=1e-5)
    assert (trained - video).abs().max() > 1e-2  # the trained modules did move it
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in spatial_before.items())
