"""A motion ΔW as a motion LoRA: diffusers' loader applies exactly the truncated SVD to the motion attention
projections of a real (tiny) AnimateDiff pipeline, and the ComfyUI-AnimateDiff-Evolved layout, applied by the
loader rule restated here, reproduces it on the original-layout motion module."""

from __future__ import annotations

import math
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from perflow_video.errors import ConfigError
from perflow_video.tiny.tiny_models import tiny_pipeline
from perflow_video.weights.animatediff_keys import export_motion_module_original
from perflow_video.weights.motion_lora import (
    captured_share_by_rank,
    export_motion_lora,
    motion_delta_to_lora,
    motion_lora_comfyui_state_dict,
    motion_lora_diffusers_state_dict,
    save_motion_lora_comfyui,
    save_motion_lora_diffusers,
)

PROJECTION = re.compile(
    r"\.motion_modules\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$"
)
ZERO_KEY = "up_blocks.1.motion_modules.1.transformer_blocks.0.attn2.to_v.weight"


def _truncated(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """Best rank-k approximation U_k S_k V_kᵀ, computed here independently of the module under test."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


@pytest.fixture(scope="module")
def unet_state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_pipeline("animatediff").unet.state_dict().items()}


@pytest.fixture(scope="module")
def delta(unet_state) -> dict[str, torch.Tensor]:
    """Random motion ΔW (every trainable motion key) plus a spatial entry; projections get decaying spectra
    so energy thresholds pick different ranks, and one projection is zero."""
    gen = torch.Generator().manual_seed(7)
    out = {}
    for key, value in unet_state.items():
        if "motion_modules" not in key or key.endswith("pos_embed.pe"):
            continue
        d = 0.01 * torch.randn(value.shape, generator=gen)
        if PROJECTION.search(key):
            u, _, vh = torch.linalg.svd(d, full_matrices=False)
            decay = torch.rand((), generator=gen) * 0.5 + 0.2
            s = 0.05 * torch.exp(-decay * torch.arange(d.shape[0], dtype=torch.float32))
            d = (u * s) @ vh
        out[key] = d
    out[ZERO_KEY] = torch.zeros_like(out[ZERO_KEY])
    out["conv_in.weight"] = torch.ones_like(unet_state["conv_in.weight"])  # spatial: not a motion LoRA's
    return out


def _projection_keys(delta: dict) -> list[str]:
    return sorted(k for k in delta if PROJECTION.search(k))


# ---- diffusers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_style", "rank", "energy", "uniform_width"),
    [("diffusers_old", None, 0.9, True), ("diffusers_old", None, 0.9, False), ("peft", 3, None, True)],
)
def test_diffusers_load_and_fuse_apply_exactly_the_truncated_delta(
    tmp_path, delta, key_style, rank, energy, uniform_width
):
    lora = motion_delta_to_lora(delta, rank=rank, energy=energy)
    if energy is not None:
        assert len(set(lora.report.ranks.values())) > 1  # per-module ranks
    path = tmp_path / "motion_lora.safetensors"
    save_motion_lora_diffusers(lora, path, key_style=key_style, uniform_width=uniform_width)

    pipe = tiny_pipeline("animatediff")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    pipe.load_lora_weights(str(path), adapter_name="perflow_motion")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    after = pipe.unet.state_dict()

    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected_changed = set(_projection_keys(delta)) - {ZERO_KEY}
    assert changed == expected_changed
    for key in expected_changed:
        k = lora.report.ranks[key[: -len(".weight")]]
        if energy is None:
            assert k == rank
        want = _truncated(delta[key], k)
        got = after[key].double() - before[key].double()
        assert torch.allclose(got, want, atol=1e-6, rtol=0), key
    assert all(torch.equal(v, text_before[k]) for k, v in pipe.text_encoder.state_dict().items())


def test_diffusers_key_formats(delta):
    lora = motion_delta_to_lora(delta, rank=2)
    modules = [k[: -len(".weight")] for k in _projection_keys(delta) if k != ZERO_KEY]
    old = motion_lora_diffusers_state_dict(lora, "diffusers_old")
    peft = motion_lora_diffusers_state_dict(lora, "peft")
    want_old, want_peft = set(), set()
    for module in modules:
        attn, _, proj = module.removesuffix(".0").rpartition(".")  # ….attn1.to_out.0 -> (….attn1, to_out)
        for d in ("down", "up"):
            want_old.add(f"unet.{attn}.processor.{proj}_lora.{d}.weight")
        for ab in ("A", "B"):
            want_peft.add(f"unet.{module}.lora_{ab}.weight")
    assert set(old) == want_old
    assert set(peft) == want_peft
    q = "unet.down_blocks.0.motion_modules.0.transformer_blocks.0.attn1"
    assert old[f"{q}.processor.to_out_lora.down.weight"].shape == (
        2,
        delta[f"{q[5:]}.to_out.0.weight"].shape[1],
    )
    assert torch.equal(old[f"{q}.processor.to_q_lora.up.weight"], peft[f"{q}.to_q.lora_B.weight"])
    assert torch.equal(old[f"{q}.processor.to_q_lora.down.weight"], peft[f"{q}.to_q.lora_A.weight"])


def test_diffusers_ignores_files_without_the_unet_prefix(tmp_path, delta):
    """The ComfyUI layout (no ``unet.`` prefix) loads nothing into diffusers: it warns and leaves the model."""
    lora = motion_delta_to_lora(delta, rank=2)
    path = tmp_path / "comfy.safetensors"
    save_motion_lora_comfyui(lora, path)
    pipe = tiny_pipeline("animatediff")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(path))
    assert not getattr(pipe.unet, "peft_config", None)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


# ---- ComfyUI-AnimateDiff-Evolved --------------------------------------------------------------------------


def _comfy_apply(module_state: dict[str, torch.Tensor], lora_state: dict[str, torch.Tensor], strength=1.0):
    """load_motion_lora_as_patches (animatediff/model_injection.py), restated: keep ``temporal`` keys, skip
    ``up.`` keys, strip ``processor.``/``_lora``/``down.``/``up.``, ``to_out.`` -> ``to_out.0.`` unless present,
    patch ``strength · up @ down`` onto that key. ComfyUI ignores patch keys the model lacks, so they are
    collected here instead."""
    has_mid = any(k.startswith("mid_block.") for k in module_state)
    out = dict(module_state)
    unknown = []
    state = {k: v for k, v in lora_state.items() if "temporal" in k}
    for key in state:
        if not has_mid and "mid_block" in key:
            continue
        if "up." in key:
            continue
        up_key = key.replace(".down.", ".up.")
        model_key = key.replace("processor.", "").replace("_lora", "").replace("down.", "").replace("up.", "")
        if "to_out.0." not in model_key:
            model_key = model_key.replace("to_out.", "to_out.0.")
        if model_key not in out:
            unknown.append(model_key)
            continue
        out[model_key] = out[model_key] + strength * torch.mm(state[up_key].float(), state[key].float())
    return out, unknown


def test_comfyui_key_set(delta):
    lora = motion_delta_to_lora(delta, energy=0.8)
    state = motion_lora_comfyui_state_dict(lora)
    want = set()
    for key in _projection_keys(delta):
        if key == ZERO_KEY:
            continue
        found = re.match(
            r"^(?P<block>.+)\.motion_modules\.(?P<m>\d+)\.transformer_blocks\.(?P<j>\d+)\.attn(?P<a>[12])\."
            r"(?P<proj>to_q|to_k|to_v|to_out)(\.0)?\.weight$",
            key,
        )
        assert found, key
        stem = (
            f"{found['block']}.motion_modules.{found['m']}.temporal_transformer.transformer_blocks.{found['j']}."
            f"attention_blocks.{int(found['a']) - 1}.processor.{found['proj']}_lora"
        )
        want |= {f"{stem}.down.weight", f"{stem}.up.weight"}
    assert set(state) == want
    assert all("temporal" in k for k in state)
    for key, value in state.items():
        partner = state[key.replace(".down.", ".up.") if ".down." in key else key.replace(".up.", ".down.")]
        assert value.ndim == 2 and partner.ndim == 2


def test_comfyui_rule_on_the_original_layout_reproduces_the_truncated_delta(tmp_path, delta):
    lora = motion_delta_to_lora(delta, energy=0.8)
    lora_path = tmp_path / "comfy_lora.safetensors"
    save_motion_lora_comfyui(lora, lora_path)
    pipe = tiny_pipeline("animatediff")
    module = export_motion_module_original(pipe.unet, tmp_path / "mm.safetensors")  # what ComfyUI loads
    patched, unknown = _comfy_apply(module, load_file(lora_path))
    assert not unknown
    changed = {k for k in module if not torch.equal(module[k], patched[k])}
    assert len(changed) == len(lora.factors)
    for module_name, factors in lora.factors.items():
        d_key = f"{module_name}.weight"
        o_key = (
            d_key.replace(".transformer_blocks.", ".temporal_transformer.transformer_blocks.")
            .replace(".attn1.", ".attention_blocks.0.")
            .replace(".attn2.", ".attention_blocks.1.")
        )
        assert o_key in changed, o_key
        want = _truncated(delta[d_key], factors.rank)
        assert torch.allclose(patched[o_key].double() - module[o_key].double(), want, atol=1e-6, rtol=0), (
            o_key
        )
    # strength scales the patch, as ComfyUI's strength_patch does
    half, _ = _comfy_apply(module, load_file(lora_path), strength=0.5)
    key = next(iter(changed))
    assert torch.allclose(half[key] - module[key], 0.5 * (patched[key] - module[key]), atol=1e-7)


# ---- the SVD and the report -----------------------------------------------------------------------------


def test_svd_identities(delta):
    attention_sq = sum(float(delta[k].double().pow(2).sum()) for k in _projection_keys(delta))
    motion_sq = sum(float(v.double().pow(2).sum()) for k, v in delta.items() if "motion_modules" in k)
    for rank, energy in [(1, None), (4, None), (None, 0.5), (None, 0.99), (2, 0.99)]:
        lora = motion_delta_to_lora(delta, rank=rank, energy=energy, dtype=torch.float64)
        report = lora.report
        assert math.isclose(report.attention_norm**2, attention_sq, rel_tol=1e-9)
        assert math.isclose(report.motion_norm**2, motion_sq, rel_tol=1e-9)
        dropped_sq = 0.0
        for module, f in lora.factors.items():
            w = delta[f"{module}.weight"].double()
            s = torch.linalg.svdvals(w)
            assert torch.allclose(f.singular_values, s, atol=1e-10)
            residual = w - f.delta()
            # Eckart-Young: the residual is exactly the dropped singular values
            assert math.isclose(
                float(residual.pow(2).sum()), float(s[f.rank :].pow(2).sum()), rel_tol=1e-4, abs_tol=1e-12
            )
            # the kept part is orthogonal to the residual
            assert abs(float((residual * f.delta()).sum())) < 1e-9
            dropped_sq += float(s[f.rank :].pow(2).sum())
            if energy is not None:
                share = torch.cumsum(s.pow(2), 0) / s.pow(2).sum()
                smallest = int((share < energy - 1e-12).sum()) + 1
                assert f.rank == (min(smallest, rank) if rank else smallest)
            else:
                assert f.rank == min(rank, s.numel()) and f.width == rank
        assert math.isclose(report.truncation_norm**2, dropped_sq, rel_tol=1e-6, abs_tol=1e-12)
        uncovered_sq = sum(float(delta[k].double().pow(2).sum()) for k in report.uncovered_keys)
        assert math.isclose(report.captured_norm**2 + dropped_sq + uncovered_sq, motion_sq, rel_tol=1e-9)
        assert ZERO_KEY[: -len(".weight")] not in lora.factors
        assert not any(PROJECTION.search(k) for k in report.uncovered_keys)
        assert all("motion_modules" in k for k in report.uncovered_keys)  # spatial conv_in is not counted
        assert 0 < report.captured_share <= report.attention_share < 1


def test_full_rank_reproduces_the_attention_delta_and_pads_wide_ranks(delta):
    width = max(v.shape[0] for k, v in delta.items() if PROJECTION.search(k)) + 5
    lora = motion_delta_to_lora(delta, rank=width)
    for module, f in lora.factors.items():
        w = delta[f"{module}.weight"].double()
        assert f.width == width and f.rank == min(w.shape)
        assert torch.allclose(f.delta(), w, atol=1e-7)
        assert not f.up[:, f.rank :].any() and not f.down[f.rank :].any()
    assert math.isclose(lora.report.captured_share, lora.report.attention_share, rel_tol=1e-6)
    exact = motion_delta_to_lora(delta, energy=1.0)
    assert math.isclose(exact.report.captured_share, exact.report.attention_share, rel_tol=1e-6)


def test_captured_share_by_rank_matches_and_grows(delta):
    ranks = [1, 2, 4, 8, 16, 32, 64]  # the tiny motion modules are 32 and 64 wide
    by_rank = captured_share_by_rank(delta, ranks)
    assert list(by_rank) == ranks
    shares = [by_rank[r].captured_share for r in ranks]
    assert shares == sorted(shares)
    for r in (1, 4):
        direct = motion_delta_to_lora(delta, rank=r).report
        assert math.isclose(by_rank[r].captured_norm, direct.captured_norm, rel_tol=1e-9)
        assert by_rank[r].ranks == direct.ranks
    assert math.isclose(by_rank[64].captured_share, by_rank[64].attention_share, rel_tol=1e-9)
    assert "projections" in by_rank[4].summary()


def test_files_and_metadata(tmp_path, delta):
    report = export_motion_lora(
        delta,
        diffusers_path=tmp_path / "d.safetensors",
        comfyui_path=tmp_path / "c.safetensors",
        rank=2,
        dtype=torch.float16,
    )
    lora = motion_delta_to_lora(delta, rank=2, dtype=torch.float16)
    assert report == lora.report
    for name, state in (
        ("d", motion_lora_diffusers_state_dict(lora)),
        ("c", motion_lora_comfyui_state_dict(lora)),
    ):
        on_disk = load_file(tmp_path / f"{name}.safetensors")
        assert on_disk.keys() == state.keys()
        assert all(v.dtype == torch.float16 and torch.equal(v, state[k]) for k, v in on_disk.items())
        with safe_open(tmp_path / f"{name}.safetensors", framework="pt") as fh:
            meta = fh.metadata()
        assert meta["format"] == "pt" and meta["rank"] == "2"
        assert math.isclose(float(meta["captured_share"]), report.captured_share, abs_tol=1e-6)
    assert sorted(os.listdir(tmp_path)) == ["c.safetensors", "d.safetensors"]  # no temporary files left


def test_original_layout_delta_gives_the_same_lora(delta):
    from perflow_video.weights.animatediff_keys import diffusers_to_original

    motion = {k: v for k, v in delta.items() if "motion_modules" in k}
    a = motion_delta_to_lora(delta, rank=3)
    b = motion_delta_to_lora(diffusers_to_original(motion), rank=3)
    assert a.factors.keys() == b.factors.keys()
    assert all(torch.equal(a.factors[m].up, b.factors[m].up) for m in a.factors)
    assert math.isclose(a.report.captured_norm, b.report.captured_norm, rel_tol=1e-12)


# ---- errors --------------------------------------------------------------------------------------------


def test_errors_name_the_argument(delta, tmp_path):
    with pytest.raises(ConfigError, match="'delta' has no motion-module keys"):
        motion_delta_to_lora({"conv_in.weight": torch.ones(2, 2)}, rank=1)
    with pytest.raises(ConfigError, match="no motion attention projection"):
        motion_delta_to_lora({"down_blocks.0.motion_modules.0.proj_in.weight": torch.ones(2, 2)}, rank=1)
    zeros = {k: torch.zeros_like(v) for k, v in delta.items()}
    with pytest.raises(ConfigError, match="every motion attention projection"):
        motion_delta_to_lora(zeros, rank=1)
    for bad in (0, -1, 1.5, True, "4"):
        with pytest.raises(ConfigError, match="'rank'"):
            motion_delta_to_lora(delta, rank=bad)
    for bad in (0, 0.0, -0.1, 1.01, float("nan"), True):
        with pytest.raises(ConfigError, match="'energy'"):
            motion_delta_to_lora(delta, energy=bad)
    with pytest.raises(ConfigError, match="'rank'.*'energy'"):
        motion_delta_to_lora(delta)
    with pytest.raises(ConfigError, match="'ranks'"):
        captured_share_by_rank(delta, [])
    with pytest.raises(ConfigError, match="'rank'"):
        captured_share_by_rank(delta, [2, 0])
    lora = motion_delta_to_lora(delta, rank=1)
    with pytest.raises(ConfigError, match="'key_style'"):
        motion_lora_diffusers_state_dict(lora, "kohya")
    with pytest.raises(ConfigError, match="'diffusers_path'"):
        export_motion_lora(delta, rank=1)
    bad_key = "down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.weight"
    with pytest.raises(ConfigError, match=re.escape(bad_key)):
        motion_delta_to_lora({bad_key: torch.ones(2, 2, 1)}, rank=1)
    with pytest.raises(ConfigError, match=re.escape(bad_key)):
        motion_delta_to_lora({bad_key: torch.full((2, 2), float("inf"))}, rank=1)
    assert isinstance(ConfigError("x"), ValueError)
    assert not os.listdir(tmp_path)


def _old_diffusers_scales(state: dict[str, torch.Tensor]) -> set[float]:
    """lora_alpha / r per module as older copies of diffusers' get_peft_kwargs infer them for a file without
    alphas: r = lora_alpha = the first module's rank, other ranks go to rank_pattern, alpha stays global."""
    ranks = [v.shape[1] for k, v in state.items() if k.endswith(("up.weight", "lora_B.weight"))]
    return {ranks[0] / r for r in ranks}


def test_uniform_width_keeps_scale_one_for_loaders_with_one_alpha(delta):
    lora = motion_delta_to_lora(delta, energy=0.9)
    padded = motion_lora_diffusers_state_dict(lora, uniform_width=True)
    ragged = motion_lora_diffusers_state_dict(lora, uniform_width=False)
    assert padded.keys() == ragged.keys()
    assert _old_diffusers_scales(padded) == {1.0}
    assert _old_diffusers_scales(ragged) != {1.0}  # what padding avoids
    for key in padded:
        if key.endswith(".down.weight"):
            up = key.replace(".down.", ".up.")
            assert torch.allclose(padded[up] @ padded[key], ragged[up] @ ragged[key], atol=1e-7, rtol=0)
