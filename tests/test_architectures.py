"""The shipped real-model configs build the published architectures (on the meta device: no memory)."""

from __future__ import annotations

import pytest
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from perflow_video.architectures import ARCHITECTURES, architecture_dir, component_config

# Parameter counts of the released checkpoints (the public model cards / state dicts).
UNETS = {"sd15": 859_520_964, "sd21": 865_910_724, "sdxl": 2_567_463_684}
TEXT_ENCODERS = {("sd15", "text_encoder"): 123_060_480, ("sd21", "text_encoder"): 340_387_840,
                 ("sdxl", "text_encoder"): 123_060_480, ("sdxl", "text_encoder_2"): 694_659_840}  # fmt: skip
VAE = 83_653_863


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(UNETS))
def test_unet_and_vae_have_the_published_sizes(name):
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(component_config(name, "unet"))
        vae = AutoencoderKL.from_config(component_config(name, "vae"))
    assert n_params(unet) == UNETS[name]
    assert n_params(vae) == VAE


@pytest.mark.parametrize("name,component", sorted(TEXT_ENCODERS))
def test_text_encoders_have_the_published_sizes(name, component):
    config = CLIPTextConfig(**component_config(name, component))
    cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
    with init_empty_weights():
        model = cls(config)
    assert n_params(model) == TEXT_ENCODERS[(name, component)]


@pytest.mark.parametrize(
    "name,positions,mid_block",
    [
        ("motion_adapter_v1_5", 24, False),
        ("motion_adapter_v1_5_2", 32, True),
        ("motion_adapter_v1_5_3", 32, False),
    ],
)
def test_motion_adapters_have_the_version_markers_tools_read(name, positions, mid_block):
    """ComfyUI-AnimateDiff-Evolved tells v2 by a mid block and v1 / v3 by 24 / 32 positions."""
    with init_empty_weights():
        adapter = MotionAdapter.from_config(component_config(name))
    pe = [b for k, b in adapter.named_buffers() if k.endswith("pos_embed.pe")]
    assert pe and all(b.shape[1] == positions for b in pe)
    assert (adapter.mid_block is not None) == mid_block
    # Every motion module fits the SD1.5 UNet it plugs into: 4 down levels at SD1.5 widths.
    assert list(adapter.config.block_out_channels) == list(
        component_config("sd15", "unet")["block_out_channels"]
    )


def test_v2_adapter_size_and_scheduler_configs():
    with init_empty_weights():
        adapter = MotionAdapter.from_config(component_config("motion_adapter_v1_5_2"))
    assert n_params(adapter) == 453_209_280
    assert component_config("sd21", "scheduler")["prediction_type"] == "v_prediction"
    assert component_config("sd15", "scheduler")["beta_schedule"] == "scaled_linear"


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="choose one of"):
        architecture_dir("sd3")
    with pytest.raises(FileNotFoundError, match="components"):
        component_config("sd15", "transformer")
    assert {"sd15", "sd21", "sdxl", "motion_adapter_v1_5_2"} <= set(ARCHITECTURES)
