"""`unified_parser()`: command line -> (config, config_path), shared by tsdia-train and tsdia-submit.

The config file is the first positional argument or `--config PATH` / `-c PATH` (as in
`python train.py --config config.yml`); the remaining positional arguments are `KEY=VALUE` overrides.
"""

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
        usage=f"{prog} [options] CONFIG [KEY=VALUE ...]  (or: {prog} [options] --config CONFIG [KEY=VALUE ...])",
        epilog="Overrides use dotted keys, e.g. training.checkpoint.save_dir=runs/exp1 training.max_steps=100",
    )
    # One positional list, split by `config_and_overrides`: with `--config`, every positional argument is
    # an override; without it, the first one is the config file.
    parser.add_argument(
        "positional",
        nargs="*",
        metavar="CONFIG [KEY=VALUE ...]",
        help="YAML config file (see configs/example.yml), then dotted-key overrides with YAML values",
    )
    parser.add_argument(
        "-c",
        "--config",
        dest="config_option",
        metavar="PATH",
        help="the YAML config file (instead of CONFIG)",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for configuration errors")
    return parser


def config_and_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Set `args.config` and `args.overrides` from the positional arguments and `--config`; exit 2 (argparse's
    usage error) when the config file is given twice or not at all."""
    positional = list(args.positional)
    if args.config_option is not None:
        # Overrides always hold '=': a first positional without one is a second config file.
        if positional and "=" not in positional[0]:
            parser.error(
                f"the config file is given twice: {positional[0]!r} and --config {args.config_option!r}; "
                "give one of them (overrides are KEY=VALUE)"
            )
        args.config, args.overrides = args.config_option, positional
    elif positional:
        args.config, args.overrides = positional[0], positional[1:]
    else:
        parser.error("a config file is required: CONFIG or --config CONFIG (e.g. configs/example.yml)")
    return args


def unified_parser(argv: Sequence[str] | None = None) -> tuple[Config, str]:
    """Parse `CONFIG [KEY=VALUE ...]` (or `--config CONFIG ...`) and return the validated config and the
    config file's path."""
    parser = build_arg_parser()
    args = config_and_overrides(parser, parser.parse_intermixed_args(argv))
    return load_config(args.config, args.overrides), args.config
