"""Command line shared by ``scripts/train_animatediff.py`` and ``scripts/train_image.py``.

Flags override the YAML config; any config field can be set with ``section.key=value``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from perflow_video.training.config_io import ConfigError, config_reference, diff_from_defaults, to_dict
from perflow_video.training.metrics_log import METRICS_FILE, metric_history
from perflow_video.training.train_config import TrainConfig, load_train_config

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"


def build_parser(description: str, with_model: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any config field can be overridden as section.key=value, e.g. optim.learning_rate=2e-5 "
        "reflow.guidance_scale=7.5 model.trainable=all. Sections: model, data, reflow, optim, run "
        "(--help-config lists every field with its default and meaning).",
    )
    if with_model:
        parser.add_argument(
            "--model", choices=["sd15", "sd21", "sdxl"], required=True,
            help="image model family; selects configs/<model>.yaml (or configs/tiny/<model>.yaml with --tiny)",
        )  # fmt: skip
    parser.add_argument("--config", help="YAML recipe (only the fields that differ from the defaults)")
    parser.add_argument("--tiny", action="store_true", help="use the embedded CPU-sized model and toy data")
    parser.add_argument("--output_dir", help="run folder: checkpoints, logs, samples, student, delta weights")
    parser.add_argument(
        "--train_data", help="training data: a CSV file or a folder of files with sidecar .txt captions"
    )
    parser.add_argument("--max_train_steps", type=int, help="number of optimizer steps to train")
    parser.add_argument(
        "--resume_from_checkpoint",
        help="'latest' (newest complete checkpoint in output_dir) or a checkpoint folder",
    )
    parser.add_argument(
        "--dry-run", dest="dry_run", action="store_true", help="print the resolved config and exit"
    )
    parser.add_argument(
        "--help-config", dest="help_config", action="store_true",
        help="list every config field (section.key = default  # meaning) and exit",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser


def resolve_config(args: argparse.Namespace, default_config: Path) -> TrainConfig:
    flags = {
        "run.output_dir": args.output_dir,
        "data.train_data": args.train_data,
        "optim.max_train_steps": args.max_train_steps,
        "run.resume_from_checkpoint": args.resume_from_checkpoint,
    }
    return load_train_config(str(args.config or default_config), flags, args.overrides)


def run(args: argparse.Namespace, default_config: Path, families: tuple[str, ...]) -> int:
    """Resolve the config, print it for --dry-run, else train. Config errors exit with status 2."""
    if args.help_config:
        print("# every config field with its dataclass default; a recipe (--config) and flags override them")
        print(config_reference(TrainConfig))
        return 0
    try:
        cfg = resolve_config(args, default_config)
        if cfg.model.family not in families:
            raise ConfigError(
                f"model.family={cfg.model.family!r}, but this script trains {' / '.join(families)}"
            )
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        print(f"# differs from the defaults: {diff_from_defaults(cfg)}", file=sys.stderr)
        return 0
    from perflow_video.training.trainer import train  # heavy imports only when training

    out = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # once, not once per data-parallel process
        evals = metric_history(Path(out) / METRICS_FILE, "eval_loss")
        if len(evals) > 1:
            (first_step, first), (last_step, last) = evals[0], evals[-1]
            print(f"eval_loss {first:.4g} (step {first_step}) -> {last:.4g} (step {last_step})")
        print(f"done: outputs in {out}")
    return 0
