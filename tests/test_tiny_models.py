"""Tiny embedded defaults: real diffusers/transformers classes at a CPU-friendly size."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub

import pytest
import torch
from diffusers import (
    AnimateDiffPipeline,
    AutoencoderKL,
    MotionAdapter,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNetMotionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer, CLIPTokenizerFast

from perflow_video.tiny.tiny_models import (
    save_tiny_model,
    tiny_pipeline,
    tiny_scheduler,
    tiny_unet,
    tiny_unet_motion,
    tiny_vae,
)
from perflow_video.tiny.tiny_tokenizer import (
    TINY_TOKENIZER_DIR,
    TINY_WORDS,
    tiny_tokenizer,
    write_tiny_tokenizer_files,
)

PROMPT = "a red circle moving left"


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _public(config) -> dict:
    """A diffusers config without its bookkeeping keys (``_class_name``, ``_use_default_values``, ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


# --- tokenizer ---------------------------------------------------------------------------------------------


def test_tokenizer_whole_words_and_padding():
    tok = tiny_tokenizer()
    assert isinstance(tok, CLIPTokenizer)
    assert tok.model_max_length == 77
    assert 512 < len(tok) <= 1100
    assert tok.pad_token == tok.eos_token == "<|endoftext|>" and tok.bos_token == "<|startoftext|>"
    assert tok.tokenize(PROMPT) == ["a</w>", "red</w>", "circle</w>", "moving</w>", "left</w>"]
    assert all(len(tok.tokenize(w)) == 1 for w in TINY_WORDS)
    ids = tok(PROMPT, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == tok.bos_token_id and ids[6:] == [tok.eos_token_id] * 71
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT
    # Unknown words still encode (byte-level base symbols), upper case is folded, truncation keeps 77.
    assert tok.decode(tok("Zebra, 42!").input_ids, skip_special_tokens=True) == "zebra , 4 2 !"
    assert len(tok("red " * 200, truncation=True, max_length=77).input_ids) == 77


def test_tokenizer_fast_alias_loads_same_folder():
    fast = CLIPTokenizerFast.from_pretrained(str(TINY_TOKENIZER_DIR))
    assert fast(PROMPT).input_ids == tiny_tokenizer()(PROMPT).input_ids


def test_tokenizer_files_are_reproducible(tmp_path):
    write_tiny_tokenizer_files(tmp_path)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (TINY_TOKENIZER_DIR / name).read_bytes(), name


# --- models ------------------------------------------------------------------------------------------------


def test_seeded_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a, b, c = tiny_unet("sd15", seed=0), tiny_unet("sd15", seed=0), tiny_unet("sd15", seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    _assert_same_state(a, b)
    assert not torch.equal(a.conv_in.weight, c.conv_in.weight)


def test_vae_downsamples_by_8():
    vae = tiny_vae()
    assert isinstance(vae, AutoencoderKL) and vae.config.scaling_factor == pytest.approx(1 / 0.27, abs=1e-3)
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
        assert z.shape == (1, 4, 4, 4)
        assert vae.decode(z).sample.shape == (1, 3, 32, 32)


def test_unet_motion_forward_shape():
    unet = tiny_unet_motion(seed=0)
    assert isinstance(unet, UNetMotionModel)
    b, f = 2, 16
    sample = torch.randn(b, 4, f, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(b, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = unet(sample, torch.tensor([999, 10]), encoder_hidden_states=text.repeat_interleave(f, 0)).sample
    assert out.shape == sample.shape and torch.isfinite(out).all()
    assert 0.5e6 < sum(p.numel() for p in unet.parameters()) < 2.5e6


def test_scheduler_configs():
    assert tiny_scheduler("sd15").config.beta_schedule == "scaled_linear"
    assert tiny_scheduler("sd21").config.prediction_type == "v_prediction"
    ad = tiny_scheduler("animatediff").config
    assert (ad.beta_schedule, ad.timestep_spacing, ad.steps_offset, ad.clip_sample) == (
        "linear",
        "linspace",
        1,
        False,
    )


# --- pipelines ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, cls",
    [
        ("sd15", StableDiffusionPipeline),
        ("sd21", StableDiffusionPipeline),
        ("sdxl", StableDiffusionXLPipeline),
    ],
)
def test_image_pipelines_generate(family, cls):
    pipe = tiny_pipeline(family)
    assert isinstance(pipe, cls) and pipe.vae_scale_factor == 8
    out = pipe(
        [PROMPT, "a blue square"],
        negative_prompt=["blurry", "blurry"],
        num_inference_steps=2,
        height=32,
        width=48,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (2, 3, 32, 48) and torch.isfinite(out).all()


def test_animatediff_pipeline_generates():
    pipe = tiny_pipeline("animatediff")
    assert isinstance(pipe, AnimateDiffPipeline) and isinstance(pipe.unet, UNetMotionModel)
    _assert_same_state(pipe.unet, tiny_unet_motion(seed=0))
    frames = pipe(
        PROMPT,
        num_frames=4,
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert frames.shape == (1, 4, 3, 32, 32) and torch.isfinite(frames).all()


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_save_and_load_roundtrip(family, tmp_path):
    save_tiny_model(family, tmp_path, seed=3)
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    loaded = cls.from_pretrained(tmp_path)
    ref = tiny_pipeline(family, seed=3)
    for name, module in ref.components.items():
        if isinstance(module, torch.nn.Module):
            _assert_same_state(module, getattr(loaded, name))
    assert _public(loaded.scheduler.config) == _public(ref.scheduler.config)
    assert loaded.tokenizer(PROMPT).input_ids == ref.tokenizer(PROMPT).input_ids
    _assert_same_state(UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet"), ref.unet)


def test_animatediff_folder_roundtrip(tmp_path):
    save_tiny_model("animatediff", tmp_path, seed=0)
    assert (tmp_path / "motion_adapter" / "diffusion_pytorch_model.safetensors").is_file()
    assert isinstance(UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet"), UNet2DConditionModel)
    adapter = MotionAdapter.from_pretrained(tmp_path / "motion_adapter")
    pipe = AnimateDiffPipeline.from_pretrained(tmp_path, motion_adapter=adapter)
    ref = tiny_pipeline("animatediff", seed=0)
    for name in ("unet", "vae", "text_encoder", "motion_adapter"):
        _assert_same_state(getattr(pipe, name), getattr(ref, name))
    assert pipe.scheduler.config.beta_schedule == "linear"
    # The same folder is also a plain SD1.5 pipeline.
    sd = StableDiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(sd.text_encoder, CLIPTextModel)
