"""LoRA / full-patch export of the spatial ΔW, checked against the clients' own loaders.

The PEFT and kohya files are read back by diffusers' ``load_lora_weights`` + ``fuse_lora`` and compared with
``W + truncated SVD of ΔW`` computed here independently (float64). The ``.diff`` file is applied with a
restatement of ComfyUI's key mapping (``comfy/lora.py``: ``model_lora_keys_unet`` and ``load_lora``).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from perflow_video.errors import ConfigError
from perflow_video.tiny.tiny_models import tiny_pipeline, tiny_unet
from perflow_video.weights.lora_export import (
    export_diff_patches,
    export_lora_kohya,
    export_lora_peft,
    factorize,
    kohya_name,
    lora_fidelity,
    lora_target_keys,
)

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _random_delta(module: torch.nn.Module, seed: int = 1, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    """A ΔW of fine-tuning magnitude on every parameter of ``module``."""
    gen = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(p.shape, generator=gen) for k, p in module.named_parameters()}


def _with_singular_values(out: int, inner: int, values: list[float], seed: int = 0) -> torch.Tensor:
    """An (out, inner) matrix whose singular values are exactly ``values`` (float64)."""
    gen = torch.Generator().manual_seed(seed)
    k = len(values)
    u, _ = torch.linalg.qr(torch.randn(out, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inner, k, generator=gen, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T


def _truncated(delta_w: torch.Tensor, rank: int) -> torch.Tensor:
    """U_r S_r V_rᵀ of the flattened weight, in float64, reshaped back."""
    matrix = delta_w.double().reshape(delta_w.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def _fused_unet_state(pipe, path) -> dict[str, torch.Tensor]:
    """The UNet weights after diffusers loads ``path`` with its own loader and fuses it at scale 1."""
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}


def _check_merged(before, after, delta, ranks: dict[str, int], atol: float = 1e-6) -> None:
    """LoRA'd weights are W + truncated ΔW at the given rank; every other parameter is untouched."""
    assert before.keys() == after.keys()
    for key, w in before.items():
        if key in ranks:
            expected = w.double() + _truncated(delta[key], ranks[key]).reshape(w.shape)
            torch.testing.assert_close(after[key].double(), expected, rtol=0, atol=atol, msg=key)
        else:
            assert torch.equal(after[key], w), f"{key} changed but has no LoRA"


def _full_rank(shape: torch.Size) -> int:
    return min(shape[0], math.prod(shape[1:]))


# --------------------------------------------------------------------------------------------------
# SVD
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(24, 40), (16, 8, 3, 3), (12, 12, 1, 1)])
def test_full_rank_reconstructs_delta(shape):
    delta_w = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 1e-3
    f = factorize(delta_w, rank=10_000)
    assert f.rank == _full_rank(delta_w.shape)
    approx = (f.up.reshape(shape[0], -1) @ f.down.reshape(f.rank, -1)).reshape(shape)
    assert float((approx - delta_w).norm() / delta_w.norm()) < 1e-6
    assert f.relative_error < 1e-6


def test_conv_factor_shapes_follow_kohya():
    f = factorize(torch.randn(16, 8, 3, 3), rank=5)
    assert f.down.shape == (5, 8, 3, 3) and f.up.shape == (16, 5, 1, 1)
    f = factorize(torch.randn(16, 8), rank=5)
    assert f.down.shape == (5, 8) and f.up.shape == (16, 5)


def test_singular_values_are_split_evenly():
    values = [3.0, 2.0, 1.0, 0.5]
    f = factorize(_with_singular_values(10, 7, values).float(), rank=4)
    # up = U sqrt(S), down = sqrt(S) Vᵀ: the column norms of up equal the row norms of down, sqrt(S).
    expected = torch.tensor(values).sqrt()
    torch.testing.assert_close(f.up.norm(dim=0), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(f.down.norm(dim=1), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("rank", [1, 2, 3, 5])
def test_rank_r_error_is_the_dropped_singular_values(rank):
    values = [5.0, 3.0, 2.0, 1.0, 0.5, 0.25]
    delta_w = _with_singular_values(20, 9, values).float()
    expected = math.sqrt(sum(s * s for s in values[rank:]) / sum(s * s for s in values))
    f = factorize(delta_w, rank=rank)
    assert f.rank == rank
    assert f.relative_error == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_rank_is_capped_at_the_matrix_rank():
    assert factorize(torch.randn(4, 32, 3, 3), rank=64).rank == 4
    assert factorize(torch.randn(30, 3), rank=64).rank == 3
    # A rank-3 ΔW stored in float32: the other singular values are round-off, not directions to keep.
    low = _with_singular_values(40, 30, [1e-2, 5e-3, 1e-3]).float()
    assert factorize(low, rank=64).rank == 3
    assert factorize(low, energy=1.0).rank == 3


@pytest.mark.parametrize("energy", [0.05, 0.5, 0.7, 0.75, 0.9, 0.99, 0.999999, 1.0])
def test_energy_threshold_picks_smallest_sufficient_rank(energy):
    values = [4.0, 2.0, 2.0, 1.0, 0.5, 0.1]
    power = [s * s for s in values]
    expected = next(r for r in range(1, 7) if sum(power[:r]) / sum(power) >= energy - 1e-12)
    f = factorize(_with_singular_values(12, 10, values).float(), energy=energy)
    assert f.rank == expected
    kept = sum(power[: f.rank]) / sum(power)
    assert kept >= energy - 1e-6
    assert f.rank == 1 or sum(power[: f.rank - 1]) / sum(power) < energy


def test_energy_and_rank_together_take_the_smaller():
    delta_w = _with_singular_values(12, 10, [4.0, 2.0, 2.0, 1.0, 0.5, 0.1]).float()
    assert factorize(delta_w, rank=2, energy=0.99).rank == 2
    assert factorize(delta_w, rank=6, energy=0.5).rank == 1


def test_zero_delta_has_rank_zero():
    f = factorize(torch.zeros(8, 6), rank=3)
    assert f.rank == 0 and f.relative_error == 0.0 and f.up.shape == (8, 0)


# --------------------------------------------------------------------------------------------------
# diffusers reads the PEFT and kohya files
# --------------------------------------------------------------------------------------------------


def test_lora_targets_are_all_linear_and_conv_weights():
    unet = tiny_unet("sd15", 0)
    delta = _random_delta(unet)
    expected = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert lora_target_keys(delta) == [f"{n}.weight" for n in expected]


def test_peft_file_loads_in_diffusers_and_fuses_to_truncated_delta(tmp_path):
    pipe = tiny_pipeline("sd15", 0)
    before = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    delta = _random_delta(pipe.unet)
    report = export_lora_peft(delta, tmp_path / "peft.safetensors", rank=12, energy=0.6, dtype=torch.float32)
    ranks = {fit.key: fit.rank for fit in report.layers}
    assert len(set(ranks.values())) > 1  # per-layer ranks: exercises rank_pattern / alpha_pattern
    assert set(ranks) == set(lora_target_keys(delta))
    names = set(load_file(tmp_path / "peft.safetensors"))
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in names
    assert "unet.conv_in.lora_B.weight" in names
    _check_merged(before, _fused_unet_state(pipe, tmp_path / "peft.safetensors"), delta, ranks)


def test_kohya_file_loads_in_diffusers_with_one_alpha(tmp_path):
    pipe = tiny_pipeline("sd15", 0)
    before = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    delta = _random_delta(pipe.unet)
    path = tmp_path / "kohya.safetensors"
    report = export_lora_kohya(delta, path, rank=16, dtype=torch.float32)
    ranks = {key: min(16, _full_rank(delta[key].shape)) for key in lora_target_keys(delta)}
    assert {fit.key: fit.rank for fit in report.layers} == ranks
    assert report.alpha == 16.0 and min(ranks.values()) == 4  # conv_out is capped at rank 4
    _check_merged(before, _fused_unet_state(pipe, path), delta, ranks)


def test_kohya_keys_and_comfyui_formula(tmp_path):
    delta = _random_delta(tiny_unet("sd15", 0))
    path = tmp_path / "kohya.safetensors"
    report = export_lora_kohya(delta, path, energy=0.5, dtype=torch.float32)
    sd = load_file(path)
    modules = [k[: -len(".weight")] for k in lora_target_keys(delta)]
    names = {"lora_unet_" + m.replace(".", "_") for m in modules}
    assert set(sd) == {f"{n}.{p}" for n in names for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in sd
    assert sd["lora_unet_conv_in.lora_down.weight"].shape[1:] == (4, 3, 3)
    assert sd["lora_unet_conv_in.lora_up.weight"].shape[2:] == (1, 1)
    assert {fit.key: fit.rank for fit in report.layers} == {
        k: factorize(delta[k], energy=0.5).rank for k in lora_target_keys(delta)
    }
    assert (
        len({fit.rank for fit in report.layers}) > 1
    )  # ranks differ, one alpha: factors carry sqrt(r / alpha)
    for module in modules:
        name = kohya_name(module)
        up, down, alpha = sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"], sd[f"{name}.alpha"]
        assert alpha.ndim == 0 and alpha.item() == report.alpha
        # ComfyUI comfy/lora.py calculate_weight: alpha / lora_down.shape[0] * mm(up.flatten(1), down.flatten(1))
        patch = (alpha.item() / down.shape[0]) * (up.flatten(1).double() @ down.flatten(1).double())
        f = factorize(delta[f"{module}.weight"], energy=0.5)
        expected = f.up.flatten(1).double() @ f.down.flatten(1).double()
        torch.testing.assert_close(patch, expected, rtol=1e-5, atol=1e-9, msg=module)


def test_diffusers_honours_kohya_alpha(tmp_path):
    delta = _random_delta(tiny_unet("sd15", 0))
    export_lora_kohya(delta, tmp_path / "a.safetensors", rank=4, dtype=torch.float32)
    sd = load_file(tmp_path / "a.safetensors")
    save_file({k: v * 2 if k.endswith(".alpha") else v for k, v in sd.items()}, tmp_path / "b.safetensors")
    pipe = tiny_pipeline("sd15", 0)
    before = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    after = _fused_unet_state(pipe, tmp_path / "b.safetensors")
    key = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    expected = before[key].double() + 2 * _truncated(delta[key], 4)
    torch.testing.assert_close(after[key].double(), expected, rtol=0, atol=1e-6)


def test_animatediff_pipeline_loads_peft_file_and_only_spatial_weights_change(tmp_path):
    pipe = tiny_pipeline("animatediff", 0)
    before = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    delta = _random_delta(pipe.unet)  # UNetMotionModel: spatial + motion keys
    report = export_lora_peft(delta, tmp_path / "ad.safetensors", rank=3, dtype=torch.float32)
    motion = [k for k in delta if "motion_modules" in k]
    assert motion and report.motion_keys_skipped == len(motion)
    ranks = {fit.key: fit.rank for fit in report.layers}
    assert not any("motion_modules" in k for k in ranks)
    _check_merged(before, _fused_unet_state(pipe, tmp_path / "ad.safetensors"), delta, ranks)


def test_report_counts_what_the_lora_drops(tmp_path):
    delta = _random_delta(tiny_unet("sd15", 0))
    report = export_lora_peft(delta, tmp_path / "p.safetensors", rank=4)
    one_d = [k for k, v in delta.items() if v.ndim == 1]
    assert set(report.dropped) == set(one_d)
    dropped_sq = sum(float(delta[k].norm()) ** 2 for k in one_d)
    total_sq = sum(float(v.norm()) ** 2 for v in delta.values())
    assert report.dropped_share == pytest.approx(math.sqrt(dropped_sq / total_sq), rel=1e-6)
    lost_sq = dropped_sq + sum(
        float((delta[f.key].double().flatten(1) - _truncated(delta[f.key], 4)).norm()) ** 2
        for f in report.layers
    )
    assert report.relative_error == pytest.approx(math.sqrt(lost_sq / total_sq), rel=1e-4)
    assert report.file_bytes == (tmp_path / "p.safetensors").stat().st_size
    assert all(v.dtype == torch.float16 for v in load_file(tmp_path / "p.safetensors").values())


# --------------------------------------------------------------------------------------------------
# .diff patches, applied as ComfyUI does
# --------------------------------------------------------------------------------------------------


def _comfyui_key_map(unet_keys) -> dict[str, str]:
    """comfy/lora.py model_lora_keys_unet: for each diffusers UNet key k ending in '.weight',
    key_map['lora_unet_' + k[:-len('.weight')].replace('.', '_')] = (the model's tensor for) k."""
    return {
        "lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k in unet_keys if k.endswith(".weight")
    }


def _comfyui_apply(patches: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> set[str]:
    """comfy/lora.py load_lora: '<x>.diff' patches key_map[x], '<x>.diff_b' patches key_map[x] with '.weight'
    replaced by '.bias'; calculate_weight adds a 'diff' whose shape matches. Returns the file keys used."""
    loaded = set()
    for x, weight_key in _comfyui_key_map(state).items():
        for suffix, target in (("diff", weight_key), ("diff_b", weight_key[: -len(".weight")] + ".bias")):
            patch = patches.get(f"{x}.{suffix}")
            if patch is not None:
                assert patch.shape == state[target].shape, target
                state[target] = state[target] + patch
                loaded.add(f"{x}.{suffix}")
    return loaded


def test_diff_keys_are_kohya_names_of_the_spatial_keys(tmp_path):
    unet = tiny_pipeline("animatediff", 0).unet
    delta = _random_delta(unet)
    report = export_diff_patches(delta, tmp_path / "d.safetensors")
    sd = load_file(tmp_path / "d.safetensors")
    spatial = [k for k in delta if "motion_modules" not in k]
    expected = {
        "lora_unet_"
        + k.rpartition(".")[0].replace(".", "_")
        + (".diff" if k.endswith(".weight") else ".diff_b")
        for k in spatial
    }
    assert set(sd) == expected
    assert report.num_weight_patches + report.num_bias_patches == len(spatial)
    assert report.motion_keys_skipped == len(delta) - len(spatial) > 0
    assert report.bias_without_weight == ()


def test_diff_patches_reproduce_w_plus_delta_exactly(tmp_path):
    unet = tiny_unet("sd15", 0)
    delta = _random_delta(unet)
    export_diff_patches(delta, tmp_path / "d.safetensors")
    patches = load_file(tmp_path / "d.safetensors")
    state = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    loaded = _comfyui_apply(patches, state)
    assert loaded == set(patches)  # ComfyUI would warn "lora key not loaded" for any other key
    for key, w in unet.state_dict().items():
        assert torch.equal(state[key], w + delta[key]), key  # norms and biases included


def test_diffusers_does_not_read_diff_patches(tmp_path):
    pipe = tiny_pipeline("sd15", 0)
    export_diff_patches(_random_delta(pipe.unet), tmp_path / "d.safetensors")
    with pytest.raises(ValueError, match="not been correctly renamed"):
        pipe.load_lora_weights(str(tmp_path / "d.safetensors"))


# --------------------------------------------------------------------------------------------------
# fidelity table
# --------------------------------------------------------------------------------------------------


def test_fidelity_matches_the_exports(tmp_path):
    delta = _random_delta(tiny_unet("sd15", 0))
    table = lora_fidelity(delta, [1, 4, 10_000])
    assert list(table) == [1, 4, 10_000]
    export_lora_peft(delta, tmp_path / "p.safetensors", rank=4)
    payload = sum(v.numel() * v.element_size() for v in load_file(tmp_path / "p.safetensors").values())
    assert table[4].payload_bytes == payload
    for key, error in table[4].layer_errors.items():
        assert error == pytest.approx(factorize(delta[key], rank=4).relative_error, rel=1e-3, abs=1e-6), key
    full = table[10_000]
    assert all(full.layer_ranks[k] == _full_rank(delta[k].shape) for k in full.layer_ranks)
    assert full.lora_relative_error < 1e-6
    assert full.relative_error == pytest.approx(full.dropped_share, abs=1e-6)
    assert table[1].lora_relative_error > table[4].lora_relative_error > full.lora_relative_error


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------


def test_config_errors_name_the_key_or_argument(tmp_path):
    good = {"conv_in.weight": torch.randn(8, 4, 3, 3)}
    path = tmp_path / "x.safetensors"
    with pytest.raises(ConfigError, match="rank"):
        export_lora_peft(good, path, rank=0)
    with pytest.raises(ConfigError, match="energy"):
        export_lora_kohya(good, path, energy=0.0)
    with pytest.raises(ConfigError, match="energy"):
        export_lora_kohya(good, path, energy=1.5)
    with pytest.raises(ConfigError, match="rank.*energy"):
        export_lora_peft(good, path)
    with pytest.raises(ConfigError, match="rank"):
        lora_fidelity(good, [4, 0])
    with pytest.raises(ConfigError, match="text_model.encoder.layers.0.mlp.fc1.weight"):
        export_diff_patches({**good, "text_model.encoder.layers.0.mlp.fc1.weight": torch.randn(2, 2)}, path)
    with pytest.raises(ConfigError, match="unet.conv_in.weight"):
        export_lora_peft({"unet.conv_in.weight": torch.randn(8, 4, 3, 3)}, path, rank=2)
    motion_only = {"down_blocks.0.motion_modules.0.proj_in.weight": torch.randn(4, 4)}
    with pytest.raises(ConfigError, match="spatial"):
        export_diff_patches(motion_only, path)
    with pytest.raises(ConfigError, match="zero"):
        export_lora_peft({"conv_in.weight": torch.zeros(8, 4, 3, 3)}, path, rank=2)
    assert issubclass(ConfigError, ValueError)
    assert not path.exists()  # nothing written on error


def test_kohya_warns_about_sdxl_add_embedding(tmp_path, caplog):
    delta = {"add_embedding.linear_1.weight": torch.randn(16, 8), "conv_in.weight": torch.randn(8, 4, 3, 3)}
    with caplog.at_level(logging.WARNING, logger="perflow_video.weights.lora_export"):
        export_lora_kohya(delta, tmp_path / "k.safetensors", rank=2)
    assert "add_embedding" in caplog.text
