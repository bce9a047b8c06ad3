"""Key conversion between diffusers and the original AnimateDiff motion-module layout, on real modules."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.loaders.single_file_utils import (
    convert_animatediff_checkpoint_to_diffusers,
    infer_diffusers_model_type,
)
from safetensors import safe_open
from safetensors.torch import load_file

from perflow_video.tiny.tiny_models import tiny_unet
from perflow_video.weights.animatediff_keys import (
    diffusers_to_original,
    export_motion_module_original,
    is_diffusers_motion_key,
    is_original_motion_key,
    original_to_diffusers,
)


def _tiny_unet() -> UNet2DConditionModel:
    return tiny_unet("sd15")


def _tiny_adapter(use_mid_block: bool = True) -> MotionAdapter:
    return MotionAdapter(
        block_out_channels=(32, 64),
        motion_layers_per_block=1,
        motion_norm_num_groups=8,
        motion_num_attention_heads=2,
        motion_max_seq_length=32,
        use_motion_mid_block=use_mid_block,
    )


def _randomize(module: torch.nn.Module, seed: int) -> None:
    # Fresh modules zero-init proj_out etc.; random values make every key distinguishable.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def adapter() -> MotionAdapter:
    torch.manual_seed(0)
    a = _tiny_adapter()
    _randomize(a, 1)
    return a


@pytest.fixture(scope="module")
def unet_motion(adapter: MotionAdapter) -> UNetMotionModel:
    torch.manual_seed(0)
    return UNetMotionModel.from_unet2d(_tiny_unet(), adapter)


def test_unet_motion_and_adapter_share_motion_key_names(adapter, unet_motion):
    motion_keys = {k for k in unet_motion.state_dict() if "motion_modules" in k}
    assert motion_keys == set(adapter.state_dict())
    assert all(is_diffusers_motion_key(k) for k in motion_keys)
    assert not any(is_original_motion_key(k) for k in motion_keys)


def test_diffusers_to_original_names(adapter):
    original = diffusers_to_original(adapter.state_dict())
    prefix = "down_blocks.0.motion_modules.0.temporal_transformer."
    block = prefix + "transformer_blocks.0."
    for key in [
        prefix + "norm.weight",
        prefix + "proj_in.weight",
        prefix + "proj_out.bias",
        block + "attention_blocks.0.to_q.weight",
        block + "attention_blocks.1.to_out.0.bias",
        block + "norms.0.weight",
        block + "norms.1.bias",
        block + "ff_norm.weight",
        block + "ff.net.0.proj.weight",
        block + "ff.net.2.bias",
        block + "attention_blocks.0.pos_encoder.pe",
        block + "attention_blocks.1.pos_encoder.pe",
        "mid_block.motion_modules.0.temporal_transformer.norm.bias",
    ]:
        assert key in original, key
    assert all("temporal" in k for k in original)
    pe = original[block + "attention_blocks.0.pos_encoder.pe"]
    assert pe.shape == (1, 32, 32)
    assert torch.equal(pe, original[block + "attention_blocks.1.pos_encoder.pe"])
    # The two pe entries must not share storage, or safetensors refuses to save them.
    assert pe.data_ptr() != original[block + "attention_blocks.1.pos_encoder.pe"].data_ptr()


def test_round_trip_is_identity(adapter):
    state = adapter.state_dict()
    trainable = {k: v for k, v in state.items() if not k.endswith("pos_embed.pe")}
    back = original_to_diffusers(diffusers_to_original(trainable))
    assert back.keys() == trainable.keys()
    assert all(torch.equal(back[k], trainable[k]) for k in trainable)
    # With the position tables too.
    full_back = original_to_diffusers(diffusers_to_original(state), include_pos_embed=True)
    assert full_back.keys() == state.keys()
    assert all(torch.equal(full_back[k], state[k]) for k in state)


def test_original_to_diffusers_matches_diffusers_own_conversion(adapter):
    original = diffusers_to_original(adapter.state_dict())
    ours = original_to_diffusers(original)
    theirs = convert_animatediff_checkpoint_to_diffusers(original)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_conversion_errors_name_the_key():
    with pytest.raises(ValueError, match="conv_in.weight"):
        diffusers_to_original({"conv_in.weight": torch.zeros(1)})
    blk = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks"
    with pytest.raises(ValueError, match=r"attention_blocks\.2"):
        original_to_diffusers({f"{blk}.2.to_q.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="down_blocks.0.motion_modules.0.norm.weight"):
        original_to_diffusers({"down_blocks.0.motion_modules.0.norm.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"attention_blocks\.1\.pos_encoder\.pe"):
        original_to_diffusers(
            {f"{blk}.0.pos_encoder.pe": torch.zeros(1, 4, 2), f"{blk}.1.pos_encoder.pe": torch.ones(1, 4, 2)},
            include_pos_embed=True,
        )


def test_export_loads_with_from_single_file_offline(tmp_path, adapter, unet_motion):
    config_dir = tmp_path / "adapter_config"
    _tiny_adapter().save_pretrained(config_dir)  # any tiny adapter: only its config.json is read
    path = tmp_path / "mm_original.safetensors"
    exported = export_motion_module_original(unet_motion, path)

    on_disk = load_file(path)
    assert on_disk.keys() == exported.keys()
    assert all("temporal" in k for k in on_disk)
    assert any(k.startswith("mid_block.") for k in on_disk)
    pe_keys = [k for k in on_disk if k.endswith("pos_encoder.pe")]
    assert len(pe_keys) == 2 * sum(1 for k in adapter.state_dict() if k.endswith("pos_embed.pe"))
    with safe_open(path, framework="pt") as fh:
        assert fh.metadata()["format"] == "pt"
    # What diffusers' auto-detection (and, by the same keys, ComfyUI) sees: AnimateDiff with a mid block.
    assert infer_diffusers_model_type(on_disk) == "animatediff_v2"

    loaded = MotionAdapter.from_single_file(str(path), config=str(config_dir), local_files_only=True)
    expected = adapter.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_export_without_mid_block_and_from_adapter(tmp_path):
    a = _tiny_adapter(use_mid_block=False)
    _randomize(a, 2)
    exported = export_motion_module_original(a, tmp_path / "mm.safetensors")
    assert not any(k.startswith("mid_block.") for k in exported)
    back = original_to_diffusers(exported, include_pos_embed=True)
    expected = a.state_dict()
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], expected[k]) for k in expected)


def test_export_refuses_module_without_motion(tmp_path):
    with pytest.raises(ValueError, match="no motion-module keys"):
        export_motion_module_original(copy.deepcopy(torch.nn.Linear(2, 2)), tmp_path / "x.safetensors")
    assert not os.listdir(tmp_path)
