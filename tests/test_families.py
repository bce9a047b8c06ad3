"""Model families: loading from folders and single files, clear errors, trainable selection, conditioning."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers import MotionAdapter

from perflow_video.families import ADAPTERS, FamilySpec, get_family
from perflow_video.families.animatediff import load_motion_adapter
from perflow_video.family_names import FAMILY_NAMES
from perflow_video.tiny.tiny_models import save_tiny_model, tiny_motion_adapter, tiny_unet
from perflow_video.weights.animatediff_keys import export_motion_module_original
from perflow_video.weights.delta_weights import LAYOUTS


def spec(path, family="sd15", **kw):
    base = dict(
        pretrained_model_name_or_path=str(path), motion_adapter=None, single_file_config=None, revision=None,
        variant=None, resolution=64, num_frames=4,
    )  # fmt: skip
    base.update(kw)
    return FamilySpec(**base)


@pytest.fixture(scope="module")
def tiny_animatediff(tmp_path_factory):
    return save_tiny_model("animatediff", tmp_path_factory.mktemp("ad") / "model")


def test_unknown_family_lists_the_choices():
    with pytest.raises(ValueError, match="animatediff"):
        get_family("sd3")


def test_one_adapter_per_family_name_with_its_trainable_choices():
    assert list(ADAPTERS) == list(FAMILY_NAMES)
    for name, family in ADAPTERS.items():
        assert family.name == name and get_family(name) is family
        assert family.default_trainable in family.trainable_choices and family.delta_layout in LAYOUTS
    video = get_family("animatediff")
    assert (video.default_trainable, video.trainable_choices, video.data_kind) == (
        "motion", ("motion", "spatial", "all", "lora"), "clips",
    )  # fmt: skip
    for name in ("sd15", "sd21", "sdxl"):
        image = get_family(name)
        assert (image.default_trainable, image.trainable_choices, image.data_kind) == (
            "all",
            ("all", "lora"),
            "images",
        )


def test_an_image_family_refuses_motion_training_and_names_its_choices():
    unet = tiny_unet("sd15")
    with pytest.raises(
        ValueError, match=r"model.trainable='motion' for sd15; choose one of \('all', 'lora'\)"
    ):
        get_family("sd15").set_trainable(unet, "motion")
    names = get_family("sd15").set_trainable(unet, "all")
    assert names == [n for n, _ in unet.named_parameters()]


def test_load_returns_what_it_found_and_changes_neither_its_spec_nor_the_adapter(tiny_animatediff):
    family = get_family("animatediff")
    adapter_state = dict(vars(family))
    specs = [
        spec(tiny_animatediff, motion_adapter=str(tiny_animatediff / "motion_adapter"), num_frames=n)
        for n in (4, 2)
    ]
    given = [dataclasses.replace(s) for s in specs]
    loaded = [family.load(s) for s in specs]
    assert specs == given and vars(family) == adapter_state
    for models, frames in zip(loaded, (4, 2), strict=True):
        assert models.num_frames == frames and models.resolution == 64
        assert models.motion_adapter == str(tiny_animatediff / "motion_adapter")
        assert models.delta_base() == f"{tiny_animatediff} + {tiny_animatediff / 'motion_adapter'}"
        # each load's own frame count, though both came from the same adapter
        assert family.encode_prompts(models, ["a", "b"], "cpu").encoder_hidden_states.shape[0] == 2 * frames


def test_missing_weights_say_where_they_looked_and_how_to_point_elsewhere(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained_model_name_or_path") as err:
        get_family("sd15").load(spec(tmp_path / "nowhere"))
    assert "nowhere" in str(err.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_original_animatediff_motion_module_file_loads_into_a_motion_adapter(
    tmp_path, suffix, tiny_animatediff
):
    adapter = tiny_motion_adapter(seed=7)
    path = tmp_path / f"mm{suffix}"
    tensors = export_motion_module_original(adapter, tmp_path / "mm.safetensors")
    if suffix == ".ckpt":  # a pickled original checkpoint, read with weights_only=True
        torch.save({"state_dict": tensors}, path)
    loaded = load_motion_adapter(str(path), str(tiny_animatediff / "motion_adapter"), str(tiny_animatediff))
    for key, value in adapter.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_animatediff_family_trainable_selection_and_per_frame_conditioning(tiny_animatediff):
    family = get_family("animatediff")
    models = family.load(spec(tiny_animatediff, motion_adapter=str(tiny_animatediff / "motion_adapter")))
    names = family.set_trainable(models.student, "motion")
    assert names and all("motion_modules" in n for n in names)
    spatial = family.set_trainable(models.student, "spatial")
    assert spatial and not any("motion_modules" in n for n in spatial)
    assert not any(p.requires_grad for p in models.teacher.parameters())
    cond = family.encode_prompts(models, ["a red circle", ""], "cpu")
    assert cond.encoder_hidden_states.shape[0] == 2 * 4  # (B·F, seq, dim), b-major like AnimateDiffPipeline
    torch.testing.assert_close(cond.encoder_hidden_states[0], cond.encoder_hidden_states[3])
    z0 = family.encode_pixels(models, torch.rand(2, 4, 3, 64, 64) * 2 - 1)
    assert z0.shape == (2, 4, 4, 8, 8)  # (B, C, F, H/8, W/8)
    with pytest.raises(ValueError, match="trainable"):
        family.set_trainable(models.student, "everything")
    with pytest.raises(ValueError, match="model.trainable='lora' trains nothing in this student"):
        family.set_trainable(models.student, "lora")  # a student built without adapters


def test_sdxl_conditioning_has_pooled_embeds_time_ids_and_zero_empty_prompt(tmp_path):
    family = get_family("sdxl")
    models = family.load(spec(save_tiny_model("sdxl", tmp_path / "xl"), family="sdxl", resolution=128))
    cond = family.encode_prompts(models, ["a red circle", ""], "cpu")
    assert cond.added_cond_kwargs["time_ids"].tolist()[0] == [128, 128, 0, 0, 128, 128]
    assert (
        cond.encoder_hidden_states[1].abs().sum() == 0
        and cond.added_cond_kwargs["text_embeds"][1].abs().sum() == 0
    )
    assert cond.encoder_hidden_states[0].abs().sum() > 0


def test_tiny_latents_of_the_toy_clips_have_unit_scale(tiny_animatediff):
    # Data and noise on the same scale, as the real VAEs' scaling factors make them (else trajectories are trivial).
    from perflow_video.datasets.video_clips import VideoClipConfig, VideoClipDataset

    family = get_family("animatediff")
    models = family.load(spec(tiny_animatediff, motion_adapter=str(tiny_animatediff / "motion_adapter")))
    ds = VideoClipDataset(
        VideoClipConfig(
            csv_path=str(Path(__file__).resolve().parent.parent / "data/toy_clips/captions.csv"),
            num_frames=4,
            resolution=64,
        )
    )
    z0 = family.encode_pixels(models, torch.stack([ds[i]["pixel_values"] for i in range(6)]))
    assert 0.5 < z0.std().item() < 2.0


def test_animatediff_uses_the_motion_modules_linear_betas_whatever_the_base_model_says(tmp_path):
    # A real SD1.5 folder says scaled_linear; AnimateDiff's motion modules were trained with linear betas.
    folder = save_tiny_model("animatediff", tmp_path / "ad")
    sched = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sched.read_text())
    sched.write_text(json.dumps({**cfg, "beta_schedule": "scaled_linear"}))
    models = get_family("animatediff").load(spec(folder, motion_adapter=str(folder / "motion_adapter")))
    assert models.scheduler_config["beta_schedule"] == "linear"
    assert models.scheduler_config["beta_start"] == 0.00085 and models.scheduler_config["beta_end"] == 0.012


def test_animatediff_from_two_single_files_takes_each_config_from_its_own_key(tmp_path, tiny_animatediff):
    # A community SD1.5 file + an original motion-module file: the SD configs come from
    # model.single_file_config, the adapter's from model.motion_adapter_config.
    from perflow_video.weights.sd_original_layout import save_original_sd_checkpoint

    base = tmp_path / "community-sd15.safetensors"
    save_original_sd_checkpoint(tiny_animatediff, base)
    folder_models = get_family("animatediff").load(
        spec(tiny_animatediff, motion_adapter=str(tiny_animatediff / "motion_adapter"))
    )
    mm = tmp_path / "mm_sd_v15.safetensors"
    export_motion_module_original(MotionAdapter.from_pretrained(tiny_animatediff / "motion_adapter"), mm)
    files_spec = spec(
        base, motion_adapter=str(mm), single_file_config=str(tiny_animatediff),
        motion_adapter_config=str(tiny_animatediff / "motion_adapter"),
    )  # fmt: skip
    models = get_family("animatediff").load(files_spec)
    expected, got = folder_models.teacher.state_dict(), models.teacher.state_dict()
    assert set(got) == set(expected)
    for key, value in got.items():
        assert torch.equal(value, expected[key]), key
    # the tiny adapter only exists next to the tiny model, not beside a single file
    with pytest.raises(ValueError, match="model.motion_adapter"):
        get_family("animatediff").load(
            spec(base, motion_adapter="tiny", single_file_config=str(tiny_animatediff))
        )
