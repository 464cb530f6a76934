"""`unified_parser()`: command line -> (config, config_path), shared by tsdia-train and tsdia-submit."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tsdia.config.loader import load_config
from tsdia.config.schema import Config


def build_arg_parser(
    prog: str = "tsdia-train", description: str = "Train with tsdia."
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="Overrides use dotted keys, e.g. training.checkpoint.save_dir=runs/exp1 training.max_steps=100",
    )
    parser.add_argument("config", help="YAML config file (see configs/example.yml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted-key overrides, YAML values")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for configuration errors")
    return parser


def unified_parser(argv: Sequence[str] | None = None) -> tuple[Config, str]:
    """Parse `CONFIG [KEY=VALUE ...]` and return the validated config and the config file's path."""
    args = build_arg_parser().parse_args(argv)
    return load_config(args.config, args.overrides), args.config
