"""ΔW compute / save / load / apply / layout conversion on tiny real diffusers modules."""

from __future__ import annotations

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from safetensors import safe_open
from safetensors.torch import save_file

import perflow_video.atomic_files as atomic_files
from perflow_video import __version__
from perflow_video.tiny.tiny_models import tiny_pipeline, tiny_unet
from perflow_video.weights.delta_weights import (
    DeltaMetadata,
    apply_delta_weights,
    compute_delta_weights,
    delta_to_layout,
    load_delta_weights,
    save_delta_weights,
    trainable_parameter_names,
)


def _tiny_unet() -> UNet2DConditionModel:
    return tiny_unet("sd15")


def _tiny_adapter() -> MotionAdapter:
    return MotionAdapter(
        block_out_channels=(32, 64),
        motion_layers_per_block=1,
        motion_norm_num_groups=8,
        motion_num_attention_heads=2,
        motion_max_seq_length=32,
    )


def _perturb(module: torch.nn.Module, seed: int, only_trainable: bool = False) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if only_trainable and not p.requires_grad:
                continue
            p.add_(0.01 * torch.randn(p.shape, generator=gen))


def _is_motion(key: str) -> bool:
    return "motion_modules" in key


def _clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_states_close(got: dict, expected: dict, keys=None, atol: float = 1e-6) -> None:
    keys = list(expected.keys() if keys is None else keys)
    # One max-abs-error per key (cheaper than assert_close per key); report the worst key.
    errors = {k: (got[k].float() - expected[k].float()).abs().max().item() for k in keys}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= atol, f"{worst}: max abs error {errors[worst]}"


@pytest.fixture(scope="module")
def models():
    """(unet2d teacher, adapter teacher, unet_motion teacher, unet_motion student) built once."""
    torch.manual_seed(0)
    unet = _tiny_unet()
    adapter = _tiny_adapter()
    _perturb(adapter, 10)  # fresh adapters zero-init proj_out; make every weight non-trivial
    teacher = UNetMotionModel.from_unet2d(unet, adapter)
    student = copy.deepcopy(teacher)
    _perturb(student, 11)
    return unet, adapter, teacher, student


@pytest.fixture(scope="module")
def full_delta(models):
    """ΔW of all student parameters; tests only read it."""
    _, _, teacher, student = models
    return compute_delta_weights(
        student.state_dict(), teacher.state_dict(), trainable_parameter_names(student)
    )


def _meta(layout: str = "diffusers_unet_motion") -> DeltaMetadata:
    return DeltaMetadata(
        family="animatediff",
        base_model="runwayml/stable-diffusion-v1-5 + guoyww/animatediff-motion-adapter-v1-5-2",
        parameterization="ddim_eps",
        num_time_windows=4,
        cfg_mode="fixed",
        cfg_scale=7.5,
        layout=layout,
        resolved_config=json.dumps({"train": {"lr": 1e-5}}),
    )


# ---------------------------------------------------------------------------------------------- compute


def _buffer_keys(module: torch.nn.Module) -> set[str]:
    """State-dict keys that are buffers (the motion modules' sinusoidal ``pos_embed.pe`` tables)."""
    return set(module.state_dict()) - {k for k, _ in module.named_parameters()}


def test_delta_roundtrip_reconstructs_student(models, full_delta):
    _, _, teacher, student = models
    assert all(v.dtype == torch.float32 for v in full_delta.values())
    fresh = copy.deepcopy(teacher)
    report = apply_delta_weights(fresh, full_delta)
    assert report.num_applied == len(full_delta) and report.num_skipped == 0
    _assert_states_close(fresh.state_dict(), student.state_dict())


def test_buffers_never_enter_a_delta_even_when_the_keys_come_from_a_state_dict(models, full_delta):
    """Key lists built from a state dict (not from parameters) contain the ``pos_embed.pe`` buffers; they
    must still be left out (a ΔW entry for them breaks loading into a module of another max length)."""
    _, _, teacher, student = models
    buffers = _buffer_keys(student)
    assert buffers and all(k.endswith("pos_embed.pe") for k in buffers)  # the test has something to catch
    state_keys = list(student.state_dict())
    delta = compute_delta_weights(student.state_dict(), teacher.state_dict(), state_keys)
    assert not buffers & set(delta)
    assert delta.keys() == full_delta.keys()  # exactly the parameters


def test_delta_only_covers_trainable_keys(models):
    _, _, teacher, _ = models
    student = copy.deepcopy(teacher)
    student.freeze_unet2d_params()  # motion modules train, the spatial UNet is frozen
    _perturb(student, 12, only_trainable=True)
    expected = {k for k, p in student.named_parameters() if _is_motion(k)}
    delta = compute_delta_weights(
        student.state_dict(), teacher.state_dict(), trainable_parameter_names(student)
    )
    assert delta and set(delta) == expected
    # "the motion module's keys" taken from the state dict include its buffers: still only parameters
    motion_state_keys = [k for k in student.state_dict() if _is_motion(k)]
    assert set(motion_state_keys) & _buffer_keys(student)
    delta = compute_delta_weights(student.state_dict(), teacher.state_dict(), motion_state_keys)
    assert set(delta) == expected


def test_delta_without_trainable_keys_excludes_buffers(models):
    _, _, teacher, student = models
    assert _buffer_keys(student)  # None means "every state-dict key", buffers included
    delta = compute_delta_weights(student.state_dict(), teacher.state_dict(), None)
    assert set(delta) == {k for k, _ in student.named_parameters()}


def test_compute_errors_name_the_key(models):
    _, _, teacher, student = models
    s, t = student.state_dict(), teacher.state_dict()
    with pytest.raises(KeyError, match="not_a_key"):
        compute_delta_weights(s, t, ["conv_in.weight", "not_a_key"])
    t_missing = {k: v for k, v in t.items() if k != "conv_in.bias"}
    with pytest.raises(KeyError, match="conv_in.bias"):
        compute_delta_weights(s, t_missing, None)
    t_bad = dict(t, **{"conv_in.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match="conv_in.bias"):
        compute_delta_weights(s, t_bad, ["conv_in.bias"])


def test_compute_in_float32_from_half(models):
    _, _, teacher, student = models
    s = {"conv_in.weight": student.state_dict()["conv_in.weight"].half()}
    t = {"conv_in.weight": teacher.state_dict()["conv_in.weight"].half()}
    delta = compute_delta_weights(s, t, None)
    assert delta["conv_in.weight"].dtype == torch.float32
    assert torch.equal(delta["conv_in.weight"], s["conv_in.weight"].float() - t["conv_in.weight"].float())


# ---------------------------------------------------------------------------------------------- apply


def test_apply_to_unet2d_changes_only_spatial(models, full_delta):
    unet, _, _, student = models
    target = copy.deepcopy(unet)
    report = apply_delta_weights(target, full_delta)
    motion_keys = {k for k in full_delta if _is_motion(k)}
    assert set(report.skipped) == motion_keys
    assert report.num_applied == len(full_delta) - len(motion_keys)
    _assert_states_close(target.state_dict(), student.state_dict(), keys=unet.state_dict().keys())


def test_apply_to_motion_adapter_changes_only_motion(models, full_delta):
    _, adapter, _, student = models
    target = copy.deepcopy(adapter)
    report = apply_delta_weights(target, full_delta)
    assert all(not _is_motion(k) for k in report.skipped)
    assert report.num_applied == sum(1 for k in full_delta if _is_motion(k))
    _assert_states_close(target.state_dict(), student.state_dict(), keys=adapter.state_dict().keys())


def test_original_layout_delta_applies_identically(models, full_delta):
    _, adapter, teacher, student = models
    original = delta_to_layout(full_delta, "animatediff_original")
    assert original and all("temporal_transformer" in k for k in original)
    # Into a MotionAdapter, auto-detected.
    target = copy.deepcopy(adapter)
    apply_delta_weights(target, original)
    _assert_states_close(target.state_dict(), student.state_dict(), keys=adapter.state_dict().keys())
    # Into a UNetMotionModel together with the spatial part in the diffusers layout.
    mixed = {**delta_to_layout(full_delta, "diffusers_unet"), **original}
    fresh = copy.deepcopy(teacher)
    apply_delta_weights(fresh, mixed)
    _assert_states_close(fresh.state_dict(), student.state_dict())


def test_layouts_load_into_their_targets(models, full_delta):
    unet, adapter, _, student = models
    spatial = delta_to_layout(full_delta, "diffusers_unet")
    assert set(spatial) == set(unet.state_dict())  # a full UNet2DConditionModel ΔW
    motion = delta_to_layout(full_delta, "motion_adapter")
    assert set(motion) == {k for k, _ in adapter.named_parameters()}
    assert delta_to_layout(full_delta, "diffusers_unet_motion").keys() == full_delta.keys()
    target = copy.deepcopy(adapter)
    assert apply_delta_weights(target, motion).num_skipped == 0
    _assert_states_close(target.state_dict(), student.state_dict(), keys=adapter.state_dict().keys())
    with pytest.raises(ValueError, match="no motion keys"):
        delta_to_layout(spatial, "motion_adapter")
    with pytest.raises(ValueError, match="Unknown"):
        delta_to_layout(full_delta, "ldm")


def test_apply_alpha_and_half_precision(models, full_delta):
    _, _, teacher, student = models
    half = copy.deepcopy(teacher).half()
    apply_delta_weights(half, full_delta, alpha=0.5)
    key = "conv_in.weight"
    expected = (teacher.state_dict()[key] + 0.5 * full_delta[key]).half()
    assert half.state_dict()[key].dtype == torch.float16
    torch.testing.assert_close(half.state_dict()[key], expected, rtol=0, atol=1e-3)


def test_apply_errors_name_the_key_and_leave_module_untouched(models, full_delta):
    _, _, teacher, _ = models
    target = copy.deepcopy(teacher)
    before = _clone_state(target)
    bad = dict(full_delta, **{"down_blocks.9.resnets.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match=r"down_blocks\.9\.resnets\.0\.conv1\.weight"):
        apply_delta_weights(target, bad)
    wrong_shape = dict(full_delta, **{"conv_in.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match="conv_in.bias"):
        apply_delta_weights(target, wrong_shape)
    _assert_states_close(target.state_dict(), before)
    report = apply_delta_weights(target, bad, strict=False)
    assert report.unmatched == ("down_blocks.9.resnets.0.conv1.weight",)


# ---------------------------------------------------------------------------------------------- files


def test_save_load_preserves_tensors_and_metadata(tmp_path, full_delta):
    path = tmp_path / "delta.safetensors"
    meta = _meta()
    save_delta_weights(full_delta, path, meta)
    loaded, loaded_meta = load_delta_weights(path)
    assert loaded_meta == meta
    assert loaded_meta.version == __version__
    assert loaded.keys() == full_delta.keys()
    assert all(torch.equal(loaded[k], full_delta[k]) for k in full_delta)
    assert os.listdir(tmp_path) == ["delta.safetensors"]  # no temp file left behind
    assert path.stat().st_mode & 0o777 == 0o644  # not the 0600 of the temporary file
    with safe_open(path, framework="pt") as fh:
        header = fh.metadata()
    assert header["cfg_scale"] == "7.5" and json.loads(header["resolved_config"]) == {"train": {"lr": 1e-5}}


def test_interrupted_write_keeps_previous_file(tmp_path, full_delta, monkeypatch):
    path = tmp_path / "delta.safetensors"
    save_delta_weights(full_delta, path, _meta())
    before = path.read_bytes()

    def crashing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(atomic_files, "save_file", crashing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_delta_weights({"conv_in.bias": torch.ones(32)}, path, _meta())
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["delta.safetensors"]


def test_save_checks_layout_and_metadata(tmp_path, full_delta):
    with pytest.raises(ValueError, match="motion_modules"):
        save_delta_weights(full_delta, tmp_path / "x.safetensors", _meta("diffusers_unet"))
    with pytest.raises(ValueError, match="empty"):
        save_delta_weights({}, tmp_path / "x.safetensors", _meta())
    with pytest.raises(ValueError, match="parameterization"):
        DeltaMetadata("animatediff", "b", "epsilon", 4, "sync", 1.0, "motion_adapter")
    with pytest.raises(ValueError, match="resolved_config"):
        DeltaMetadata("sd15", "b", "diff_eps", 4, "sync", 1.0, "diffusers_unet", resolved_config="{not json")
    assert not os.listdir(tmp_path)


def test_original_layout_file_roundtrip(tmp_path, models, full_delta):
    _, adapter, _, student = models
    path = tmp_path / "delta_mm.safetensors"
    save_delta_weights(
        delta_to_layout(full_delta, "animatediff_original"), path, _meta("animatediff_original")
    )
    loaded, meta = load_delta_weights(path)
    assert meta.layout == "animatediff_original"
    target = copy.deepcopy(adapter)
    apply_delta_weights(target, loaded)
    _assert_states_close(target.state_dict(), student.state_dict(), keys=adapter.state_dict().keys())


@pytest.mark.parametrize("header", [None, {"format": "pt"}])
def test_file_without_metadata_loads_and_applies(tmp_path, header):
    """Like the released PeRFlow SD1.5 ΔW: a full diffusers UNet state dict of differences, fp16."""
    torch.manual_seed(3)
    teacher = _tiny_unet()
    student = copy.deepcopy(teacher)
    _perturb(student, 13)
    student_state = student.state_dict()
    diff = {k: (student_state[k] - v).half() for k, v in teacher.state_dict().items()}
    path = tmp_path / "delta_weights.safetensors"
    save_file(diff, str(path), metadata=header)
    loaded, meta = load_delta_weights(path)
    assert meta is None
    assert loaded["conv_in.weight"].dtype == torch.float16
    report = apply_delta_weights(teacher, loaded)
    assert report.num_applied == len(diff) and report.num_skipped == 0
    _assert_states_close(teacher.state_dict(), student_state, atol=1e-4)


def test_a_delta_of_another_family_lists_what_does_not_fit_and_changes_nothing():
    """An SDXL ΔW into an SD1.5 UNet: one error naming the misfits (with their shapes); no weight moved."""
    sd15, sdxl = tiny_unet("sd15"), tiny_unet("sdxl")
    delta = {k: torch.ones_like(v) for k, v in sdxl.state_dict().items() if k in sd15.state_dict()}
    before = _clone_state(sd15)
    with pytest.raises(ValueError, match=r"ΔW tensors do not fit UNet2DConditionModel: .*\(\d+, .*vs ΔW"):
        apply_delta_weights(sd15, delta)
    _assert_states_close(_clone_state(sd15), before, atol=0.0)


def test_a_v2_motion_delta_into_a_v3_shaped_adapter_is_refused(models, full_delta):
    """v2 has a mid-block motion module and 32 positions; an adapter without the mid block (v3-like)
    holds no such keys: strict apply names them and leaves the adapter untouched."""
    adapter = MotionAdapter(
        block_out_channels=(32, 64), motion_layers_per_block=1, motion_norm_num_groups=8,
        motion_num_attention_heads=2, use_motion_mid_block=False,
    )  # fmt: skip
    motion = {k: v for k, v in full_delta.items() if _is_motion(k)}
    before = _clone_state(adapter)
    with pytest.raises(KeyError, match="mid_block"):
        apply_delta_weights(adapter, motion)
    _assert_states_close(_clone_state(adapter), before, atol=0.0)


def test_apply_to_a_whole_pipeline_goes_to_its_unet(full_delta):
    pipe = tiny_pipeline("animatediff")
    delta = {
        k: torch.full_like(v, 0.5) for k, v in pipe.unet.state_dict().items() if k.endswith("conv_in.weight")
    }
    before = pipe.unet.conv_in.weight.detach().clone()
    report = apply_delta_weights(pipe, delta)
    assert report.applied == ("conv_in.weight",)
    assert torch.allclose(pipe.unet.conv_in.weight, before + 0.5)
    with pytest.raises(TypeError, match="cannot apply a ΔW to a dict"):
        apply_delta_weights({}, delta)
