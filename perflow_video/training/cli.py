"""Command line shared by ``scripts/train_animatediff.py`` and ``scripts/train_image.py``.

Flags override the YAML config; any config field can be set with ``section.key=value``. A user error
(config, data, missing weights, checkpoint, unusable data) is one message on stderr and exit status 2;
``--debug`` shows its traceback instead. Anything else is a bug and raises.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from perflow_video.errors import ConfigError, exit_status_of
from perflow_video.families import ADAPTERS
from perflow_video.training.config_help import config_reference
from perflow_video.training.config_io import diff_from_defaults, to_dict
from perflow_video.training.metrics_log import METRICS_FILE, metric_history
from perflow_video.training.preflight import check_before_loading
from perflow_video.training.train_config import TrainConfig, load_train_config

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"
FSDP_CONFIG = CONFIG_DIR / "accelerate" / "fsdp.yaml"  # the FSDP setup the memory plan describes
IMAGE_FAMILIES = [name for name, family in ADAPTERS.items() if family.data_kind == "images"]


def build_parser(description: str, with_model: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any config field can be overridden as section.key=value, e.g. optim.learning_rate=2e-5 "
        "reflow.guidance_scale=7.5 model.trainable=all. Sections: model, data, reflow, optim, run "
        "(--help-config lists every field with the value this command would use and its meaning).",
    )
    if with_model:
        parser.add_argument(
            "--model", choices=IMAGE_FAMILIES, required=True,
            help="image model family; selects configs/<model>.yaml (or configs/tiny/<model>.yaml with --tiny)",
        )  # fmt: skip
        parser.add_argument(
            "--tiny",
            action="store_true",
            help="use the embedded CPU-sized model and toy data (configs/tiny/)",
        )
    parser.add_argument("--config", help="YAML recipe (only the fields that differ from the defaults)")
    parser.add_argument("--output_dir", help="run folder: checkpoints, logs, samples, student, delta weights")
    parser.add_argument(
        "--train_data", help="training data: a CSV file or a folder of files with sidecar .txt captions"
    )
    parser.add_argument("--max_train_steps", type=int, help="number of optimizer steps to train (>= 1)")
    parser.add_argument(
        "--resume_from_checkpoint",
        help="'latest' (newest complete checkpoint in output_dir) or a checkpoint folder",
    )
    parser.add_argument(
        "--dry-run", dest="dry_run", action="store_true",
        help="print the resolved config and its memory plan (weights, optimizer, activations; no weights load), and exit",
    )  # fmt: skip
    parser.add_argument(
        "--help-config", dest="help_config", action="store_true",
        help="list every config field (section.key = the value this command would use  # meaning) and exit",
    )  # fmt: skip
    parser.add_argument("--debug", action="store_true", help="show the traceback of a config / data error")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser


def resolve_config(args: argparse.Namespace, config_path: Path) -> TrainConfig:
    """The config file, then the flags, then the ``section.key=value`` overrides."""
    flags = {
        "run.output_dir": args.output_dir,
        "data.train_data": args.train_data,
        "optim.max_train_steps": args.max_train_steps,
        "run.resume_from_checkpoint": args.resume_from_checkpoint,
    }
    return load_train_config(str(config_path), flags, args.overrides)


def check_family(cfg: TrainConfig, families: tuple[str, ...]) -> None:
    if cfg.model.family not in families:
        raise ConfigError(f"model.family={cfg.model.family!r}, but this script trains {' / '.join(families)}")


def run(args: argparse.Namespace, default_config: Path, families: tuple[str, ...]) -> int:
    """``--help-config``, ``--dry-run`` or train; a user error exits with status 2 (``--debug``: raises)."""
    config_path = Path(args.config) if args.config else default_config
    return exit_status_of(lambda: _run(args, config_path, families), args.debug)


def _run(args: argparse.Namespace, config_path: Path, families: tuple[str, ...]) -> int:
    cfg = resolve_config(args, config_path)
    check_family(cfg, families)
    if args.help_config:
        print(f"# every config field: the value this command would use (defaults <- family {cfg.model.family} "
              f"<- {_shown(config_path)} <- flags <- overrides)  # meaning [choices]")  # fmt: skip
        print(config_reference(cfg))
        return 0
    print(f"# config file: {_shown(config_path)}", file=sys.stderr)
    if args.dry_run:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        print(f"# differs from the defaults: {diff_from_defaults(cfg)}", file=sys.stderr)
        print(planned_memory(cfg))
        return 0
    check_before_loading(cfg)
    from perflow_video.training.trainer import train  # heavy imports only when training

    out = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # once, not once per data-parallel process
        print_summary(Path(out))
    return 0


def fsdp_processes(path: Path = FSDP_CONFIG) -> int:
    """The process count of the shipped FSDP accelerate config (8 when it is not there)."""
    try:
        return int(yaml.safe_load(path.read_text())["num_processes"])
    except (OSError, KeyError, TypeError, ValueError):
        return 8


def planned_memory(cfg: TrainConfig) -> str:
    """The memory plan of ``cfg`` as ``#`` comment lines (``training.memory_plan``), built on the meta device."""
    from perflow_video.training.memory_plan import format_plan, memory_plan  # builds models: heavy imports

    try:
        return format_plan(memory_plan(cfg, fsdp_processes()), cfg)
    except (OSError, ValueError) as err:
        return f"# memory plan unavailable: {type(err).__name__}: {err}"


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when below it."""
    relative = os.path.relpath(path)
    return path.as_posix() if relative.startswith("..") else relative


def print_summary(out: Path) -> None:
    evals = metric_history(out / METRICS_FILE, "eval_loss")
    if len(evals) > 1:
        (first_step, first), (last_step, last) = evals[0], evals[-1]
        print(f"eval_loss {first:.4g} (step {first_step}) -> {last:.4g} (step {last_step})")
    print(f"done: outputs in {out}")
