"""AnimateDiff v1 / v2 / v3 motion modules: the real block structure of each published adapter (shrunk widths,
random weights) exported in the original layout, checked against the rules the loaders use to tell the
versions apart and against the documented key layout, and loaded back bit-exactly by diffusers."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import MotionAdapter
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors.torch import load_file

from perflow_video.architectures import component_config
from perflow_video.weights.animatediff_keys import export_motion_module_original

# name of the architecture folder -> (version, positions, mid block), as published.
VERSIONS = {
    "motion_adapter_v1_5": ("v1", 24, False),
    "motion_adapter_v1_5_2": ("v2", 32, True),
    "motion_adapter_v1_5_3": ("v3", 32, False),
}
_WIDTH_DIVISOR = 20  # 320/640/1280/1280 -> 16/32/64/64
_NORM_GROUPS = 8


def _shrunk_config(name: str) -> dict:
    """The published adapter config with every width divided by 20: same blocks, layers, positions, heads."""
    real = component_config(name)
    config = {k: v for k, v in real.items() if not k.startswith("_")}
    config["block_out_channels"] = [c // _WIDTH_DIVISOR for c in real["block_out_channels"]]
    config["motion_norm_num_groups"] = _NORM_GROUPS
    return config


def _random_adapter(config: dict, seed: int) -> MotionAdapter:
    torch.manual_seed(seed)
    adapter = MotionAdapter(**config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in adapter.parameters():  # fresh modules zero proj_out; random values tell every key apart
            p.copy_(torch.randn(p.shape, generator=gen))
    return adapter


# ---- the original AnimateDiff layout, restated from the documented key pattern -----------------------
# One motion module (VanillaTemporalModule) is
#   <block>.motion_modules.<M>.temporal_transformer.{norm, proj_in, proj_out}.{weight,bias}
#   ….transformer_blocks.0.attention_blocks.{0,1}.{to_q,to_k,to_v}.weight        (no bias)
#   ….transformer_blocks.0.attention_blocks.{0,1}.to_out.0.{weight,bias}
#   ….transformer_blocks.0.attention_blocks.{0,1}.pos_encoder.pe                 [1, L, C]
#   ….transformer_blocks.0.norms.{0,1}.{weight,bias}, ….ff_norm.{weight,bias}
#   ….transformer_blocks.0.ff.net.0.proj.{weight,bias} (GEGLU, 2·4C × C), ….ff.net.2.{weight,bias}
# SD1.5: down_blocks.0-3 with 2 modules each, up_blocks.0-3 with 3, and (v2) mid_block with 1.


def _module_layout(prefix: str, c: int, positions: int) -> dict[str, tuple[int, ...]]:
    t = f"{prefix}.temporal_transformer"
    b = f"{t}.transformer_blocks.0"
    shapes = {
        f"{t}.norm.weight": (c,),
        f"{t}.norm.bias": (c,),
        f"{t}.proj_in.weight": (c, c),
        f"{t}.proj_in.bias": (c,),
        f"{t}.proj_out.weight": (c, c),
        f"{t}.proj_out.bias": (c,),
        f"{b}.ff_norm.weight": (c,),
        f"{b}.ff_norm.bias": (c,),
        f"{b}.ff.net.0.proj.weight": (8 * c, c),
        f"{b}.ff.net.0.proj.bias": (8 * c,),
        f"{b}.ff.net.2.weight": (c, 4 * c),
        f"{b}.ff.net.2.bias": (c,),
    }
    for a in (0, 1):
        att = f"{b}.attention_blocks.{a}"
        for proj in ("to_q", "to_k", "to_v"):
            shapes[f"{att}.{proj}.weight"] = (c, c)
        shapes[f"{att}.to_out.0.weight"] = (c, c)
        shapes[f"{att}.to_out.0.bias"] = (c,)
        shapes[f"{att}.pos_encoder.pe"] = (1, positions, c)
        shapes[f"{b}.norms.{a}.weight"] = (c,)
        shapes[f"{b}.norms.{a}.bias"] = (c,)
    return shapes


def _original_layout(channels: list[int], positions: int, mid_block: bool) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i, c in enumerate(channels):
        for m in range(2):
            shapes.update(_module_layout(f"down_blocks.{i}.motion_modules.{m}", c, positions))
    for i, c in enumerate(reversed(channels)):
        for m in range(3):
            shapes.update(_module_layout(f"up_blocks.{i}.motion_modules.{m}", c, positions))
    if mid_block:
        shapes.update(_module_layout("mid_block.motion_modules.0", channels[-1], positions))
    return shapes


# ---- ComfyUI-AnimateDiff-Evolved's recognition rules (animatediff/motion_module_ad.py), restated -------


def _comfy_recognise(state: dict[str, torch.Tensor]) -> dict:
    """What normalize_ad_state_dict / AnimateDiffModel conclude from a motion-module file."""
    down_blocks = [int(k.split(".")[1]) for k in state if "down_blocks" in k and k.split(".")[1].isdigit()]
    kept = {k: v for k, v in state.items() if "temporal" in k}  # non-temporal keys are deleted
    animatelcm = not any("pos_encoder" in k for k in kept)
    pe_len = (
        next(v.shape[1] for k, v in kept.items() if k.endswith("pos_encoder.pe")) if not animatelcm else 64
    )
    sd_type = {3: "SD1.5", 2: "SDXL"}.get(max(down_blocks, default=-1))
    if any(k.startswith("mid_block.") for k in kept):
        version = "v2"
    elif sd_type == "SD1.5" and pe_len == 32:
        version = "v3"
    else:
        version = "v1"
    attention_blocks = {
        int(k.split(".attention_blocks.")[1].split(".")[0]) for k in kept if ".attention_blocks." in k
    }
    return {
        "sd_type": sd_type,
        "format": "AnimateLCM" if animatelcm else "AnimateDiff",
        "version": version,
        "encoding_max_len": pe_len,
        "attention_blocks": len(attention_blocks),
        "dropped": sorted(set(state) - set(kept)),
    }


@pytest.fixture(scope="module", params=sorted(VERSIONS))
def exported(request, tmp_path_factory):
    name = request.param
    config = _shrunk_config(name)
    adapter = _random_adapter(config, seed=len(name))
    folder = tmp_path_factory.mktemp(name)
    config_dir = folder / "config"
    adapter.save_config(config_dir)  # only config.json: from_single_file reads nothing else from it
    path = folder / f"{name}.safetensors"
    returned = export_motion_module_original(adapter, path)
    return name, config, adapter, config_dir, path, returned


def test_published_configs_have_the_documented_structure():
    for name, (_, positions, mid_block) in VERSIONS.items():
        real = component_config(name)
        assert real["block_out_channels"] == [320, 640, 1280, 1280], name
        assert real["motion_max_seq_length"] == positions, name
        assert real["use_motion_mid_block"] is mid_block, name
        assert real["motion_layers_per_block"] == 2, name


def test_shrunk_adapter_keeps_the_block_structure(exported):
    name, config, adapter, *_ = exported
    _, positions, mid_block = VERSIONS[name]
    assert len(adapter.down_blocks) == 4 and len(adapter.up_blocks) == 4
    assert [len(b.motion_modules) for b in adapter.down_blocks] == [2, 2, 2, 2]
    assert [len(b.motion_modules) for b in adapter.up_blocks] == [3, 3, 3, 3]
    assert (adapter.mid_block is not None) is mid_block
    n_modules = 8 + 12 + (1 if mid_block else 0)
    pe = [v for k, v in adapter.state_dict().items() if k.endswith("pos_embed.pe")]
    assert len(pe) == n_modules and all(p.shape[1] == positions for p in pe)


def test_export_is_recognised_as_its_version(exported):
    name, _, _, _, path, returned = exported
    version, positions, _ = VERSIONS[name]
    on_disk = load_file(path)
    assert on_disk.keys() == returned.keys()
    seen = _comfy_recognise(on_disk)
    assert seen == {
        "sd_type": "SD1.5",
        "format": "AnimateDiff",
        "version": version,
        "encoding_max_len": positions,
        "attention_blocks": 2,
        "dropped": [],
    }
    # diffusers' own detection (single_file_utils.infer_diffusers_model_type) agrees.
    assert infer_diffusers_model_type(on_disk) == f"animatediff_{version}"


def test_export_has_exactly_the_original_layout(exported):
    name, config, _, _, path, _ = exported
    _, positions, mid_block = VERSIONS[name]
    expected = _original_layout(config["block_out_channels"], positions, mid_block)
    on_disk = load_file(path)
    missing = sorted(set(expected) - set(on_disk))
    unexpected = sorted(set(on_disk) - set(expected))
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    wrong = {k: (tuple(v.shape), expected[k]) for k, v in on_disk.items() if tuple(v.shape) != expected[k]}
    assert not wrong


def test_export_loads_back_bit_exactly(exported):
    name, config, adapter, config_dir, path, _ = exported
    assert json.loads((config_dir / "config.json").read_text())["motion_max_seq_length"] == VERSIONS[name][1]
    loaded = MotionAdapter.from_single_file(str(path), config=str(config_dir), local_files_only=True)
    assert list(loaded.config["block_out_channels"]) == config["block_out_channels"]
    for key in ("motion_max_seq_length", "use_motion_mid_block", "motion_layers_per_block"):
        assert loaded.config[key] == config[key], key
    expected = adapter.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    different = [
        k for k in expected if got[k].dtype != expected[k].dtype or not torch.equal(got[k], expected[k])
    ]
    assert not different, different[:5]
