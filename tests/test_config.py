"""The training config schema: every recipe builds, family defaults come from the adapters, cross-field
rules fail when the config is built, every field documents itself, every choice is one Literal."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import get_args

import pytest
from diffusers.optimization import SchedulerType

from perflow_video.datasets.video_clips import SHORT_CLIP_POLICIES
from perflow_video.families import MODEL_INITS, get_family
from perflow_video.families.attention import ATTENTION_BACKENDS, xformers_available
from perflow_video.family_names import FAMILY_NAMES
from perflow_video.media.video_decode import BACKENDS
from perflow_video.media.video_export import CLIP_FORMATS
from perflow_video.method.reflow_objective import LOSS_WEIGHTINGS
from perflow_video.method.teacher_solver import TEACHER_PREDICTION_TYPES, TEACHER_SOLVERS
from perflow_video.training.config_help import config_reference, field_choices, field_meanings
from perflow_video.training.config_io import ConfigError, diff_from_defaults, from_dict, save_yaml_config
from perflow_video.training.frozen_models import DTYPES
from perflow_video.training.train_config import FrozenDtype, LRSchedule, TrainConfig, load_train_config

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "configs" / "tiny").glob("*.yaml"))
TINY_ANIMATEDIFF = str(REPO / "configs" / "tiny" / "animatediff.yaml")


def build(*overrides: str, path: str | None = None) -> TrainConfig:
    return load_train_config(path, {}, list(overrides))


def error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        build(*overrides)
    return str(info.value)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_recipe_builds_and_round_trips(recipe, tmp_path):
    cfg = build(path=str(recipe))
    save_yaml_config(cfg, tmp_path / "config.yaml")
    assert build(path=str(tmp_path / "config.yaml")) == cfg
    assert from_dict(TrainConfig, diff_from_defaults(cfg)) == cfg


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_family_defaults_come_from_the_adapter(name):
    family, cfg = get_family(name), build(f"model.family={name}")
    assert cfg.model.resolution == family.default_resolution
    assert cfg.model.trainable == family.default_trainable
    assert cfg.reflow.parameterization == family.default_parameterization
    # What the config says wins over the family.
    assert build(f"model.family={name}", "model.resolution=64").model.resolution == 64


def test_partial_sections_merge_onto_the_defaults_and_flags_win():
    cfg = load_train_config(TINY_ANIMATEDIFF, {"optim.max_train_steps": 7, "run.output_dir": None}, [])
    assert cfg.optim.max_train_steps == 7 and cfg.run.output_dir == "outputs/tiny-animatediff"
    assert cfg.optim.learning_rate == 3e-5 and cfg.optim.adam_beta1 == 0.9  # file value, class default


def test_trainable_must_fit_the_family():
    assert build("model.family=animatediff", "model.trainable=spatial").model.trainable == "spatial"
    for name in ("sd15", "sd21", "sdxl"):
        assert error(f"model.family={name}", "model.trainable=motion") == (
            f"model: trainable='motion' does not fit family '{name}'; choose 'all' | 'lora'"
        )


@pytest.mark.skipif(xformers_available(), reason="xformers is installed here")
def test_xformers_requested_but_not_installed():
    assert "attention='xformers' but xformers is not installed" in error("model.attention=xformers")
    assert build("model.attention=sdpa").model.attention == "sdpa"


def test_half_precision_frozen_models_need_mixed_precision():
    assert error("optim.frozen_dtype=bf16").startswith("optim: frozen_dtype=bf16 needs mixed_precision")
    cfg = build("optim.frozen_dtype=bf16", "optim.mixed_precision=bf16")
    assert cfg.optim.frozen_dtype == "bf16"
    assert build("optim.frozen_dtype=fp32").optim.frozen_dtype == "fp32"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.max_train_steps=0", "optim: max_train_steps must be >= 1, got 0"),
        ("optim.train_batch_size=0", "optim: train_batch_size must be >= 1, got 0"),
        ("run.eval_steps=-1", "run: eval_steps must be >= 0, got -1"),
        ("run.eval_samples=0", "run: eval_samples must be >= 1, got 0"),
        ("reflow.solver_steps=0", "reflow: solver_steps must be >= 1, got 0"),
        ("run.log_every=0", "run: log_every must be >= 1, got 0"),
        ("run.checkpointing_steps=-1", "run: checkpointing_steps must be >= 0, got -1"),
        ("run.validation_steps=-5", "run: validation_steps must be >= 0, got -5"),
        (
            "model.resolution=60",
            "model: resolution must be a positive multiple of 8 (the VAE's factor), got 60",
        ),
        ("model.num_frames=0", "model: num_frames must be >= 1, got 0"),
        ("data.sample_stride=0", "data: sample_stride must be >= 1, got 0"),
        ("data.prompt_dropout=1.5", "data: prompt_dropout must be in [0, 1], got 1.5"),
    ],
)
def test_counts_out_of_range(override, message):
    assert error(override) == message


def test_strict_types_and_a_true_did_you_mean():
    assert error("optim.learning_rat=1e-4") == (
        "optim.learning_rat: unknown key 'learning_rat' in 'optim'. Did you mean 'learning_rate'?"
    )
    assert "valid integer, got '3' (str)" in error('optim.max_train_steps="3"')
    assert "valid integer, got True (bool)" in error("optim.max_train_steps=true")
    assert build("optim.learning_rate=1e-4").optim.learning_rate == 1e-4  # YAML 1.1 would read a string
    assert "'uniform' or 'endpoint', got 'snr'" in error("reflow.loss_weighting=snr")
    assert "model.family: input should be 'animatediff', 'sd15', 'sd21' or 'sdxl'" in error(
        "model.family=sd3"
    )


def test_every_field_has_a_one_line_meaning():
    undocumented = [
        f"{section.name}.{name}"
        for section in dataclasses.fields(TrainConfig)
        for name, meaning in field_meanings(type(getattr(TrainConfig(), section.name))).items()
        if not meaning
    ]
    assert undocumented == []


def test_every_choice_is_a_literal_defined_beside_its_owner():
    cfg = TrainConfig()
    choices = {
        f"{s.name}.{name}": values
        for s in dataclasses.fields(cfg)
        for name, values in field_choices(type(getattr(cfg, s.name))).items()
    }
    expected = {
        "model.family", "model.trainable", "model.lora_targets", "model.init", "model.attention",
        "data.short_clip_policy", "data.backend", "optim.optimizer",
        "optim.lr_scheduler", "optim.mixed_precision", "optim.frozen_dtype", "run.sample_format",
        "run.report_to", "reflow.parameterization", "reflow.loss_weighting", "reflow.teacher_prediction_type",
        "reflow.solver",
    }  # fmt: skip
    assert set(choices) == expected
    # The Literal and the tuple the owning code checks are one list of values.
    assert choices["model.family"] == FAMILY_NAMES
    assert choices["model.attention"] == ATTENTION_BACKENDS
    assert choices["model.init"] == MODEL_INITS
    assert choices["data.short_clip_policy"] == SHORT_CLIP_POLICIES
    assert choices["reflow.loss_weighting"] == LOSS_WEIGHTINGS
    assert choices["reflow.solver"] == TEACHER_SOLVERS
    offered = {choice for name in FAMILY_NAMES for choice in get_family(name).trainable_choices}
    assert set(choices["model.trainable"]) == offered
    targets = {choice for name in FAMILY_NAMES for choice in get_family(name).lora_target_choices}
    assert set(choices["model.lora_targets"]) == targets
    assert choices["optim.optimizer"] == ("adamw", "adamw8bit")
    assert choices["data.backend"] == BACKENDS
    assert choices["reflow.teacher_prediction_type"] == TEACHER_PREDICTION_TYPES
    assert choices["run.sample_format"] == CLIP_FORMATS
    assert set(get_args(FrozenDtype)) == {"auto", *DTYPES}
    assert set(get_args(LRSchedule)) <= {s.value for s in SchedulerType}


def test_help_reference_shows_the_resolved_values_with_meanings_and_choices():
    reference = config_reference(build(path=TINY_ANIMATEDIFF))
    assert "  optim.learning_rate = 3e-05  # AdamW peak learning rate" in reference
    assert '  run.output_dir = "outputs/tiny-animatediff"  # run folder' in reference
    assert "  reflow.solver_steps = 4  # M, teacher forwards inside one window" in reference
    assert "[ddim | dpm++ | unipc]" in reference
    assert '  model.attention = "auto"  # ' in reference and "[auto | xformers | sdpa]" in reference
    assert len(reference.splitlines()) == sum(
        1 + len(dataclasses.fields(getattr(TrainConfig(), s.name))) for s in dataclasses.fields(TrainConfig)
    )
