"""The original (LDM) SD single-file layout: export, diffusers' ``from_single_file`` round trip, the real SD1.5
block structure, and training from a community-style single file through the real CLI."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from perflow_video.families import FamilySpec, get_family
from perflow_video.families.stable_diffusion import load_sd_parts
from perflow_video.tiny.tiny_models import save_tiny_model, tiny_unet
from perflow_video.weights.delta_weights import load_delta_weights
from perflow_video.weights.sd_original_layout import (
    UNET_PREFIX,
    VAE_PREFIX,
    diffusers_to_original_sd,
    save_original_sd_checkpoint,
    text_encoder_to_original,
    unet_to_original,
    vae_to_original,
)

REPO = Path(__file__).resolve().parent.parent
PARTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory):
    return save_tiny_model("sd15", tmp_path_factory.mktemp("sd15") / "model")


@pytest.fixture(scope="module")
def single_file(sd15_folder, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "tiny-sd15.safetensors"
    save_original_sd_checkpoint(sd15_folder, path)
    return path


def load_single(path, config):
    return StableDiffusionPipeline.from_single_file(
        str(path), config=str(config), safety_checker=None, requires_safety_checker=False
    )


def spec(path, config):
    return FamilySpec(
        pretrained_model_name_or_path=str(path), motion_adapter=None, single_file_config=config, revision=None,
        variant=None, resolution=64, num_frames=4,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Round trip through diffusers' single-file reader
# ---------------------------------------------------------------------------------------------------------


def test_from_single_file_gives_back_every_weight_exactly_and_the_same_image(sd15_folder, single_file):
    ref = StableDiffusionPipeline.from_pretrained(
        sd15_folder, safety_checker=None, requires_safety_checker=False
    )
    pipe = load_single(single_file, sd15_folder)
    for name in PARTS:
        expected, got = getattr(ref, name).state_dict(), getattr(pipe, name).state_dict()
        assert set(got) == set(expected), name
        mismatched = [k for k in expected if not torch.equal(got[k], expected[k])]
        assert not mismatched, f"{name}: {mismatched[:5]}"
    # Buffers outside the state dict too (position_ids is stored in the file, as in real SD1.5 files).
    assert torch.equal(pipe.text_encoder.embeddings.position_ids, torch.arange(77)[None])

    def one_step(p):
        p.set_progress_bar_config(disable=True)
        out = p(
            "a red circle", num_inference_steps=1, height=64, width=64, output_type="np",
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        return out.images

    image = one_step(pipe)
    assert image.std() > 0
    np.testing.assert_array_equal(image, one_step(ref))


def test_file_uses_the_original_key_names(single_file):
    with safe_open(str(single_file), "pt") as fh:
        keys = set(fh.keys())
        attn_q = fh.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight")
        proj_in = fh.get_tensor("model.diffusion_model.input_blocks.1.1.proj_in.weight")
    for key in (
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",  # tiny: 1 layer per block, so the downsample is 2
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",  # UpBlock2D: upsampler in slot 1
        "model.diffusion_model.output_blocks.3.1.proj_out.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.quant_conv.weight",
        "first_stage_model.encoder.down.0.block.0.norm1.weight",
        "first_stage_model.decoder.up.3.block.0.conv1.weight",
        "first_stage_model.decoder.mid.block_2.conv2.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert key in keys, key
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in keys)
    assert not any("down_blocks" in k or "up_blocks" in k or "resnets" in k for k in keys)
    assert attn_q.shape == (16, 16, 1, 1)  # LDM AttnBlock: 1x1 conv
    assert proj_in.shape == (32, 32, 1, 1)


# ---------------------------------------------------------------------------------------------------------
# The real SD1.5 structure (4 levels, 2 layers per block), not only the tiny 2-level UNet
# ---------------------------------------------------------------------------------------------------------

# Block-level modules of SD1.5's UNet in the original file (v1-inference.yaml: channel_mult 1,2,4,4,
# num_res_blocks 2, attention_resolutions 4,2,1).
SD15_UNET_BLOCKS = (
    {"time_embed.0", "time_embed.2", "input_blocks.0.0", "out.0", "out.2"}
    | {f"input_blocks.{n}.{m}" for n in (1, 2, 4, 5, 7, 8) for m in (0, 1)}
    | {
        "input_blocks.3.0.op",
        "input_blocks.6.0.op",
        "input_blocks.9.0.op",
        "input_blocks.10.0",
        "input_blocks.11.0",
    }
    | {"middle_block.0", "middle_block.1", "middle_block.2"}
    | {"output_blocks.0.0", "output_blocks.1.0", "output_blocks.2.0", "output_blocks.2.1.conv"}
    | {f"output_blocks.{n}.{m}" for n in range(3, 12) for m in (0, 1)}
    | {"output_blocks.5.2.conv", "output_blocks.8.2.conv"}
)
SD15_LIKE = {
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "layers_per_block": 2,
}


def unet_blocks(keys) -> set[str]:
    """``model.diffusion_model.input_blocks.3.0.op.weight`` -> ``input_blocks.3.0.op`` (block-level module)."""
    blocks = set()
    for key in keys:
        parts = key.removeprefix(UNET_PREFIX).split(".")
        if parts[0] in ("input_blocks", "output_blocks"):
            depth = 4 if parts[3] in ("op", "conv") else 3
        else:
            depth = 2
        blocks.add(".".join(parts[:depth]))
    return blocks


@pytest.fixture(scope="module")
def sd15_structured_unet():
    """Random UNet with SD1.5's block structure and tiny channels."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        **SD15_LIKE, block_out_channels=(32, 32, 64, 64), norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=2, sample_size=8,
    ).eval()  # fmt: skip


def test_unet_with_sd15_structure_has_sd15_blocks_and_diffusers_reads_it_back(sd15_structured_unet):
    unet = sd15_structured_unet
    state = unet.state_dict()
    original = unet_to_original(state, unet.config)
    assert unet_blocks(original) == SD15_UNET_BLOCKS
    assert len(original) == len(state)
    back = convert_ldm_unet_checkpoint(original, dict(unet.config))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_real_size_sd15_shapes_on_the_meta_device():
    """The full-width SD1.5 UNet / VAE / CLIP ViT-L (no memory: meta tensors) against known file shapes."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_LIKE, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        )  # fmt: skip
        text = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
            )
        )
    state = diffusers_to_original_sd(
        unet.state_dict(), unet.config, vae.state_dict(), vae.config, text.state_dict(), 77
    )
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    counts = [
        sum(k.startswith(p) for k in state) for p in ("model.", "first_stage_model.", "cond_stage_model.")
    ]
    assert counts == [686, 248, 197]  # as in v1-5-pruned-emaonly.safetensors
    expected = {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
    }
    assert {k: shapes.get(k) for k in expected} == expected
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in shapes  # highest level: no upsample


def test_vae_with_two_layers_per_block_and_the_text_encoder_read_back_through_diffusers():
    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=2, latent_channels=4, norm_num_groups=4,
    )  # fmt: skip
    state = vae.state_dict()
    back = convert_ldm_vae_checkpoint(vae_to_original(state, vae.config), dict(vae.config))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], v) for k, v in state.items())

    text = CLIPTextModel(
        CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    )
    text_state = text.state_dict()
    stripped = convert_ldm_clip_checkpoint(text_encoder_to_original(text_state))
    back = {k.removeprefix("text_model."): v for k, v in stripped.items()}
    assert set(back) == set(text_state)
    assert all(torch.equal(back[k], v) for k, v in text_state.items())


def test_a_unet_the_layout_does_not_describe_fails_loudly():
    sdxl = tiny_unet("sdxl")  # add_embedding has no SD1.x name
    with pytest.raises(ValueError, match="add_embedding"):
        unet_to_original(sdxl.state_dict(), sdxl.config)
    with pytest.raises(ValueError, match="down_block_types"):
        unet_to_original({}, {**SD15_LIKE, "down_block_types": ("AttnDownBlock2D",)})


# ---------------------------------------------------------------------------------------------------------
# Loading errors in the family
# ---------------------------------------------------------------------------------------------------------


def test_single_file_without_or_with_a_wrong_config_names_the_file_and_the_key(
    single_file, sd15_folder, tmp_path
):
    with pytest.raises(ValueError, match="model.single_file_config") as err:
        load_sd_parts(spec(single_file, None), "sd15")
    assert str(single_file) in str(err.value)

    other = tmp_path / "other"  # an SD folder of another architecture (2 layers per block)
    shutil.copytree(sd15_folder, other)
    config = json.loads((other / "unet" / "config.json").read_text())
    (other / "unet" / "config.json").write_text(json.dumps({**config, "layers_per_block": 2}))
    for wrong in (other, tmp_path / "nowhere", tmp_path):
        with pytest.raises(ValueError, match="model.single_file_config") as err:
            load_sd_parts(spec(single_file, str(wrong)), "sd15")
        assert str(single_file) in str(err.value) and str(wrong) in str(err.value)


def test_family_loads_the_single_file_offline_like_the_folder(single_file, sd15_folder):
    unet, vae, text_encoder, tokenizer, sched, source = load_sd_parts(
        spec(single_file, str(sd15_folder)), "sd15"
    )
    assert source == str(single_file)
    assert sched["beta_schedule"] == "scaled_linear" and tokenizer.model_max_length == 77
    ref = UNet2DConditionModel.from_pretrained(sd15_folder, subfolder="unet")
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in ref.state_dict().items())


# ---------------------------------------------------------------------------------------------------------
# End to end: the trainer from a single file
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e["PERFLOW_VIDEO_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    e["HF_HUB_OFFLINE"] = "1"
    return e


def run_script(env, cmd):
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"


def test_sd15_trains_from_a_community_style_single_file(env, tmp_path, single_file, sd15_folder):
    script = [sys.executable, str(REPO / "scripts" / "train_image.py"), "--model", "sd15", "--tiny"]
    run_script(
        env,
        script + [
            "--output_dir", str(tmp_path), "--max_train_steps", "2", "run.validation_steps=0",
            "optim.lr_warmup_steps=1", f"model.pretrained_model_name_or_path={single_file}",
            f"model.single_file_config={sd15_folder}",
        ],
    )  # fmt: skip
    assert json.loads((tmp_path / "train_summary.json").read_text())["global_step"] == 2
    delta, meta = load_delta_weights(tmp_path / "delta_weights.safetensors")
    assert meta.family == "sd15" and meta.base_model == str(single_file)
    assert delta and any(v.abs().sum() > 0 for v in delta.values())


def test_animatediff_family_builds_its_teacher_on_a_single_file_sd15_base(tmp_path, tmp_path_factory):
    """The AnimateDiff family reuses load_sd_parts; in-process (a CLI run costs ~15-40 s on 2 cores)."""
    folder = save_tiny_model("animatediff", tmp_path_factory.mktemp("ad") / "model")
    base = tmp_path / "base.safetensors"
    save_original_sd_checkpoint(folder, base)
    ad_spec = replace(spec(base, str(folder)), motion_adapter=str(folder / "motion_adapter"))
    models = get_family("animatediff").load(ad_spec)
    assert models.base_model == str(base) and models.scheduler_config["beta_schedule"] == "linear"
    ref = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict()
    teacher = models.teacher.state_dict()
    assert all(torch.equal(teacher[k], v) for k, v in ref.items())  # spatial layers keep diffusers' names


def test_export_writes_a_given_dtype_and_leaves_nothing_behind_on_a_bad_name(sd15_folder, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(
        sd15_folder, safety_checker=None, requires_safety_checker=False
    )
    tensors = save_original_sd_checkpoint(pipe, tmp_path / "half.safetensors", dtype=torch.float16)
    assert tensors["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    assert tensors[VAE_PREFIX + "quant_conv.weight"].dtype == torch.float16
    with pytest.raises(ValueError, match="safetensors"):
        save_original_sd_checkpoint(pipe, tmp_path / "model.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half.safetensors"]


def test_sd21_is_refused_rather_than_written_in_the_sd1_layout(tmp_path):
    sd21 = save_tiny_model("sd21", tmp_path / "sd21")
    with pytest.raises(ValueError, match="SD 2.x"):
        save_original_sd_checkpoint(sd21, tmp_path / "sd21.safetensors")
    assert not (tmp_path / "sd21.safetensors").exists()
