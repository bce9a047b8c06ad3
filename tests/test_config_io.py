"""Config I/O on a library: pydantic checks plain dataclasses (dotted keys, strict types), YAML files,
overrides, merges, the defaults diff and atomic saves."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Literal

import pytest
from pydantic import with_config

from perflow_video.training.config_io import (
    CONFIG_RULES,
    ConfigError,
    apply_overrides,
    diff_from_defaults,
    from_dict,
    load_yaml_data,
    merge_dicts,
    save_yaml_config,
    to_dict,
)


@dataclass
class Optim:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.999)
    warmup_steps: int = 0

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class Model:
    family: Literal["sd15", "sd21", "sdxl"] = "sd15"
    pretrained: str | None = None
    use_ema: bool = False


@dataclass
class Sampling:
    steps: int = 4
    guidance: float = 7.5


@dataclass
class Data:
    sample_prompts: list[str] = field(default_factory=lambda: ["a cat"])
    size: tuple[int, int] = (64, 64)
    weights: dict[str, float] = field(default_factory=dict)


@with_config(CONFIG_RULES)
@dataclass
class Train:
    name: str = "run"
    seed: int = 0
    optim: Optim = field(default_factory=Optim)
    model: Model = field(default_factory=Model)
    data: Data = field(default_factory=Data)
    sampling: Sampling | None = None
    stages: list[Sampling] = field(default_factory=list)


@with_config(CONFIG_RULES)
@dataclass
class Required:
    name: str
    count: int = 1


def _error(cls, data) -> str:
    with pytest.raises(ConfigError) as info:
        from_dict(cls, data)
    return str(info.value)


def load(path):
    return from_dict(Train, load_yaml_data(path))


# ------------------------------------------------------------------------------------------ from_dict


def test_defaults_and_round_trip():
    assert from_dict(Train, {}) == Train()
    cfg = Train(
        name="x",
        optim=Optim(lr=2e-4, betas=(0.8, 0.9)),
        model=Model(family="sdxl", pretrained="p", use_ema=True),
        data=Data(sample_prompts=["a", "b"], size=(32, 48), weights={"mse": 1.0}),
        sampling=Sampling(steps=8),
        stages=[Sampling(steps=2), Sampling(guidance=1.0)],
    )
    plain = to_dict(cfg)
    assert plain["optim"]["betas"] == [0.8, 0.9] and plain["data"]["size"] == [32, 48]
    back = from_dict(Train, plain)
    assert back == cfg
    assert isinstance(back.optim.betas, tuple) and isinstance(back.stages[0], Sampling)


def test_partial_section_keeps_the_other_defaults():
    cfg = from_dict(Train, {"optim": {"weight_decay": 0.1}, "sampling": {"steps": 2}})
    assert cfg.optim == Optim(weight_decay=0.1) and cfg.sampling == Sampling(steps=2)
    assert cfg.model == Model()


def test_mutable_defaults_not_shared():
    a, b = from_dict(Train, {}), from_dict(Train, {})
    a.data.sample_prompts.append("dog")
    assert b.data.sample_prompts == ["a cat"]


def test_unknown_key_names_dotted_path_and_suggests():
    assert _error(Train, {"optim": {"warmup_step": 1}}) == (
        "optim.warmup_step: unknown key 'warmup_step' in 'optim'. Did you mean 'warmup_steps'?"
    )
    assert "Did you mean 'seed'?" in _error(Train, {"sed": 1})
    assert _error(Train, {"sed": 1}).startswith("sed: unknown key 'sed' at the top level")
    far = _error(Train, {"optim": {"zzzz": 1}})
    assert "Did you mean" not in far and far.endswith("valid keys: lr, weight_decay, betas, warmup_steps")
    assert "sampling.stepz: unknown key" in _error(Train, {"sampling": {"stepz": 4}})
    assert "stages[0].stepz: unknown key" in _error(Train, {"stages": [{"stepz": 4}]})


def test_every_problem_is_reported_one_line_each():
    lines = _error(Train, {"seed": "1", "optim": {"lr": "x", "lrr": 1}}).splitlines()
    assert sorted(line.split(":")[0] for line in lines) == ["optim.lr", "optim.lrr", "seed"]


@pytest.mark.parametrize(
    "data, path, expected",
    [
        ({"seed": "3"}, "seed", "valid integer, got '3' (str)"),
        ({"seed": 3.0}, "seed", "valid integer"),
        ({"seed": True}, "seed", "valid integer, got True (bool)"),
        ({"optim": {"lr": True}}, "optim.lr", "valid number, got True (bool)"),
        ({"optim": {"lr": "1e-4"}}, "optim.lr", "valid number, got '1e-4' (str)"),
        ({"name": None}, "name", "valid string, got None"),
        ({"name": 3}, "name", "valid string, got 3 (int)"),
        ({"optim": None}, "optim", "expected a section"),
        ({"optim": [1]}, "optim", "expected a section (a mapping of keys to values), got [1] (list)"),
        ({"model": {"use_ema": 1}}, "model.use_ema", "valid boolean, got 1 (int)"),
        ({"model": {"use_ema": "yes"}}, "model.use_ema", "valid boolean"),
        ({"data": {"sample_prompts": ["a", 3]}}, "data.sample_prompts[1]", "valid string, got 3 (int)"),
        ({"data": {"sample_prompts": "a"}}, "data.sample_prompts", "valid array"),
        ({"data": {"size": [1, 2, 3]}}, "data.size", "at most 2 items"),
        ({"data": {"weights": {"mse": "x"}}}, "data.weights.mse", "valid number"),
        ({"optim": {"betas": [0.9, None]}}, "optim.betas[1]", "valid number, got None"),
        ({"stages": [{"steps": "4"}]}, "stages[0].steps", "valid integer"),
        ({"sampling": {"steps": "4"}}, "sampling.steps", "valid integer, got '4' (str)"),
        ({"model": {"pretrained": 3}}, "model.pretrained", "valid string, got 3 (int)"),
    ],
)
def test_wrong_type_names_path_and_value(data, path, expected):
    msg = _error(Train, data)
    assert msg.startswith(f"{path}:"), msg
    assert expected in msg, msg


def test_int_accepted_for_float():
    cfg = from_dict(Train, {"optim": {"lr": 1, "betas": [1, 0]}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (1.0, 0.0) and all(isinstance(b, float) for b in cfg.optim.betas)


def test_optional_fields():
    assert from_dict(Train, {"model": {"pretrained": None}}).model.pretrained is None
    assert from_dict(Train, {"model": {"pretrained": "x"}}).model.pretrained == "x"
    assert from_dict(Train, {"sampling": {}}).sampling == Sampling()
    assert from_dict(Train, {"sampling": None}).sampling is None


def test_literal_rejects_other_values_listing_choices():
    assert from_dict(Train, {"model": {"family": "sdxl"}}).model.family == "sdxl"
    msg = _error(Train, {"model": {"family": "sd3"}})
    assert msg.startswith("model.family:") and "'sd15', 'sd21' or 'sdxl'" in msg and "'sd3'" in msg


def test_missing_required_key():
    assert from_dict(Required, {"name": "a"}) == Required("a")
    assert _error(Required, {"count": 2}) == "name: missing required key"


def test_post_init_value_error_gets_the_section():
    assert _error(Train, {"optim": {"lr": -1}}) == "optim: lr must be positive, got -1.0"


def test_top_level_must_be_a_mapping_and_the_schema_a_config_root():
    assert _error(Train, [1, 2]).startswith("expected a section")
    with pytest.raises(TypeError, match="dataclass type"):
        from_dict(Train(), {})
    with pytest.raises(TypeError, match="with_config"):
        from_dict(Optim, {})  # a section on its own does not carry the rules
    with pytest.raises(ConfigError, match="plain YAML data"):
        from_dict(Train, {"name": {1, 2}})


# ------------------------------------------------------------------------------------------ diff


def test_diff_from_defaults_only_changed_fields():
    assert diff_from_defaults(Train()) == {}
    cfg = from_dict(Train, {"optim": {"lr": 1e-4}, "model": {"family": "sdxl"}, "seed": 0})
    assert diff_from_defaults(cfg) == {"optim": {"lr": 1e-4}, "model": {"family": "sdxl"}}
    assert diff_from_defaults(Train(sampling=Sampling())) == {"sampling": {"steps": 4, "guidance": 7.5}}
    assert diff_from_defaults(Train(data=Data(size=(1, 2)))) == {"data": {"size": [1, 2]}}
    for cfg in (Train(sampling=Sampling(steps=1)), Train(stages=[Sampling()]), Train(name="q")):
        assert from_dict(Train, diff_from_defaults(cfg)) == cfg


# ------------------------------------------------------------------------------------------ overrides


def test_overrides_dotted_keys_and_yaml_values():
    data = {"optim": {"weight_decay": 0.1}}
    out = apply_overrides(
        data,
        [
            "optim.lr=1e-4",
            "model.family=sdxl",
            'data.sample_prompts=["a", "b"]',
            "model.use_ema=true",
            "model.pretrained=null",
            "seed=7",
            "optim.betas=[1e-1, 2.5E2]",
            "name=' spaced name'",
            " sampling.steps = 2",
        ],
    )
    assert data == {"optim": {"weight_decay": 0.1}}  # input untouched
    cfg = from_dict(Train, out)
    assert cfg.optim == Optim(lr=1e-4, weight_decay=0.1, betas=(0.1, 250.0))
    assert cfg.model == Model(family="sdxl", pretrained=None, use_ema=True)
    assert cfg.data.sample_prompts == ["a", "b"] and cfg.seed == 7
    assert cfg.name == " spaced name" and cfg.sampling == Sampling(steps=2)


@pytest.mark.parametrize("text, value", [("1e-4", 1e-4), ("-2E5", -2e5), ("1.5e6", 1.5e6), (".5e-3", 5e-4)])
def test_override_exponent_floats(text, value):
    out = apply_overrides({}, [f"x={text}"])
    assert out["x"] == value and isinstance(out["x"], float)


def test_override_quoted_number_and_dates_stay_strings_and_later_wins():
    assert apply_overrides({}, ['name="1e-4"'])["name"] == "1e-4"
    assert apply_overrides({}, ["name=2024-01-02"])["name"] == "2024-01-02"  # YAML 1.2: no timestamps
    assert apply_overrides({}, ["seed=1", "seed=2"])["seed"] == 2
    assert apply_overrides({}, ["seed=10"])["seed"] == 10  # ints stay ints


@pytest.mark.parametrize("bad", ["optim.lr", "=3", "optim..lr=1", "optim.=1"])
def test_malformed_override_quoted(bad):
    with pytest.raises(ConfigError, match="malformed override") as info:
        apply_overrides({}, [bad])
    assert repr(bad) in str(info.value)


def test_override_bad_yaml_and_through_scalar():
    with pytest.raises(ConfigError, match=r"'x=\[1, 2'.*not valid YAML"):
        apply_overrides({}, ["x=[1, 2"])
    with pytest.raises(ConfigError, match="'optim.lr' is 0.1, not a mapping"):
        apply_overrides({"optim": {"lr": 0.1}}, ["optim.lr.x=1"])


def test_override_unknown_key_caught_by_from_dict():
    out = apply_overrides({}, ["optim.warmup=1"])
    with pytest.raises(ConfigError, match=r"^optim\.warmup:.*Did you mean 'warmup_steps'"):
        from_dict(Train, out)


# ------------------------------------------------------------------------------------------ merge


def test_merge_dicts_deep_update_wins():
    base = {"optim": {"lr": 1.0, "betas": [0.9, 0.99]}, "name": "base", "data": {"w": {"a": 1}}}
    update = {"optim": {"lr": 2.0}, "data": {"w": {"b": 2}}, "model": {"family": "sdxl"}}
    out = merge_dicts(base, update)
    assert out == {
        "optim": {"lr": 2.0, "betas": [0.9, 0.99]},
        "name": "base",
        "data": {"w": {"a": 1, "b": 2}},
        "model": {"family": "sdxl"},
    }
    out["optim"]["betas"].append(1)
    out["model"]["family"] = "x"
    assert base["optim"]["betas"] == [0.9, 0.99] and update["model"]["family"] == "sdxl"
    assert merge_dicts({"a": {"b": 1}}, {"a": 3}) == {"a": 3}
    assert merge_dicts({"a": 3}, {"a": {"b": 1}}) == {"a": {"b": 1}}


# ------------------------------------------------------------------------------------------ YAML files


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_yaml_exponent_floats_are_floats(tmp_path):
    f = _write(tmp_path / "c.yaml", "optim:\n  lr: 1e-4\n  betas: [0.5, 1.0e5]\nmodel:\n  family: sd21\n")
    assert load(f) == Train(optim=Optim(lr=1e-4, betas=(0.5, 1e5)), model=Model(family="sd21"))
    assert load(_write(tmp_path / "empty.yaml", "# nothing\n")) == Train()


def test_yaml_missing_file_names_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_yaml_data(missing)
    assert str(info.value).startswith(str(missing))
    with pytest.raises(ConfigError, match="cannot read"):
        load_yaml_data(tmp_path)  # a directory


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    f = _write(tmp_path / "bad.yaml", "seed: 1\noptim:\n  lr: [1, 2\nname: x\n")
    with pytest.raises(ConfigError) as info:
        load_yaml_data(f)
    msg = str(info.value)
    assert msg.startswith(f"{f}: invalid YAML at line ") and "column" in msg


def test_yaml_duplicate_key_is_error(tmp_path):
    f = _write(tmp_path / "dup.yaml", "seed: 1\nname: a\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'seed' \(line 3\)") as info:
        load_yaml_data(f)
    assert str(info.value).startswith(str(f))


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("3\n", "int"), ("just text\n", "str")])
def test_yaml_non_mapping_top_level(tmp_path, text, kind):
    f = _write(tmp_path / "list.yaml", text)
    with pytest.raises(ConfigError, match=f"top level must be a mapping.*got {kind}") as info:
        load_yaml_data(f)
    assert str(info.value).startswith(str(f))


def test_save_yaml_config_round_trip_atomic(tmp_path):
    cfg = Train(
        name="ünï",
        optim=Optim(lr=1e-5, betas=(0.9, 0.95)),
        model=Model(family="sdxl"),
        data=Data(sample_prompts=["a: b", "- c"], weights={"mse": 2}),
        sampling=Sampling(steps=3),
        stages=[Sampling(steps=1)],
    )
    out = tmp_path / "sub" / "resolved.yaml"
    save_yaml_config(cfg, out)
    assert load(out) == cfg
    # The full config is written, not the diff.
    assert set(load_yaml_data(out)) == {f.name for f in dataclasses.fields(Train)}
    save_yaml_config(Train(), out)  # overwrite
    assert load(out) == Train()
    assert os.listdir(out.parent) == ["resolved.yaml"]


def test_save_yaml_config_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    out = tmp_path / "c.yaml"
    save_yaml_config(Train(seed=1), out)

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_yaml_config(Train(seed=2), out)
    assert os.listdir(tmp_path) == ["c.yaml"]
    assert load(out).seed == 1
