"""`tsdia export EXPERIMENT -o OUT [--average-best N] [--metric M] [--ema] [--dtype fp32|bf16]`.

Writes OUT/model.safetensors (one checkpoint's weights, the mean of the N best by a manifest metric, or
their EMA weights), OUT/config.yml (the experiment's, to rebuild the model) and OUT/export.json (which
checkpoints, their metrics, the command). OUT is written under a temporary name and renamed into place,
so an error leaves nothing behind. The module is torch-free until an export runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tsdia.errors import CheckpointError, ConfigError
from tsdia.experiment.checkpoints import MANIFEST, Manifest, best_checkpoints, complete_checkpoints
from tsdia.experiment.layout import CONFIG_FILE
from tsdia.experiment.weight_files import (
    EXPORT_RECORD,
    MODEL_WEIGHTS,
    WeightsLocation,
    locate_checkpoint,
)

DTYPES = ("fp32", "bf16")


def add_export_parser(commands: Any) -> None:
    """Register `export` on the `tsdia` command's subparsers."""
    export = commands.add_parser(
        "export",
        help="write an experiment's weights (best, averaged or EMA) with its config, for load_model/init_from",
    )
    export.add_argument("experiment", help="the experiment directory (or one of its checkpoint directories)")
    export.add_argument("-o", "--output", required=True, metavar="OUT", help="the export directory (new)")
    export.add_argument(
        "--average-best",
        type=int,
        default=1,
        metavar="N",
        help="average the N best checkpoints by --metric (default 1: the best alone)",
    )
    export.add_argument(
        "--metric", help="the manifest metric that ranks checkpoints (default: the experiment's best_metric)"
    )
    export.add_argument(
        "--mode",
        choices=("min", "max"),
        help="lower or higher is better (default: the experiment's best_mode)",
    )
    export.add_argument("--ema", action="store_true", help="export (the mean of) the EMA weights instead")
    export.add_argument("--dtype", choices=DTYPES, default="fp32", help="floating-point dtype of the weights")


@dataclass
class Selection:
    """The checkpoints an export reads, best first, and how they were chosen."""

    checkpoints: list[WeightsLocation]
    metric: str | None
    mode: str | None
    config: Path


def run_export(args: argparse.Namespace, argv: Sequence[str]) -> int:
    out = Path(args.output)
    check_output(out)
    selection = select(Path(args.experiment), args.average_best, args.metric, args.mode)
    command = shlex.join(["tsdia", *argv])
    write_export(selection, out, ema=args.ema, dtype=args.dtype, command=command)
    names = ", ".join(c.checkpoint.name for c in selection.checkpoints if c.checkpoint)
    what = "the EMA weights of " if args.ema else ""
    print(f"tsdia export: wrote {out} ({what}{names}, {args.dtype})")
    return 0


def check_output(out: Path) -> None:
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ConfigError(f"-o {out}: it exists; an export never overwrites anything. Choose a new path.")


def select(path: Path, count: int, metric: str | None, mode: str | None) -> Selection:
    """The `count` best checkpoints of the experiment at `path` (or the checkpoint at `path` itself)."""
    if count < 1:
        raise ConfigError(f"--average-best: {count} is not a number of checkpoints (1 or more).")
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such experiment directory.")
    if (path / MANIFEST).exists():  # one checkpoint: exported as it is
        if count != 1:
            raise ConfigError(
                f"--average-best {count}: {path} is one checkpoint; give its experiment "
                f"({path.parent}) to average several."
            )
        location = locate_checkpoint(path.absolute(), str(path))
        return Selection([location], None, None, _config_of(path.parent))
    config_path = _config_of(path)
    if metric is None or mode is None:
        from tsdia.config.loader import load_config

        checkpoint_config = load_config(str(config_path)).training.checkpoint
        metric = metric or checkpoint_config.best_metric
        mode = mode or checkpoint_config.best_mode
    found = complete_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path}: the experiment has no complete checkpoint to export.")
    ranked = best_checkpoints(found, metric, mode, count)
    if not ranked:
        recorded = sorted({name for _, m in found for name in m.metrics})
        raise ConfigError(
            f"--metric {metric}: no checkpoint of {path} records it (recorded: {', '.join(recorded) or 'none'}). "
            "Choose one of those."
        )
    if len(ranked) < count:
        raise ConfigError(
            f"--average-best {count}: only {len(ranked)} checkpoint(s) of {path} record {metric} "
            f"({', '.join(p.name for p, _ in ranked)}). Average at most {len(ranked)}, or train with "
            f"training.checkpoint.keep_best: {count} (and save_total_limit >= {count}) so rotation keeps them."
        )
    locations = [locate_checkpoint(p.absolute(), str(p)) for p, _ in ranked]
    return Selection(locations, metric, mode, config_path)


def _config_of(experiment: Path) -> Path:
    config = experiment / CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(
            f"{experiment}: not a tsdia experiment (no {CONFIG_FILE}); give an experiment directory."
        )
    return config


def write_export(selection: Selection, out: Path, *, ema: bool, dtype: str, command: str) -> None:
    """Read, average and cast the weights, then write OUT atomically (a temporary name, then a rename)."""
    import torch
    from safetensors.torch import save_file

    from tsdia.weights import average_weights, read_weights

    labels = [str(c.checkpoint) for c in selection.checkpoints]
    states = [read_weights(c, ema=ema) for c in selection.checkpoints]  # errors before anything is written
    state = average_weights(states, labels) if len(states) > 1 else states[0]
    target = torch.bfloat16 if dtype == "bf16" else torch.float32
    state = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    record = {
        "source": str(selection.config.parent.absolute()),
        "checkpoints": [_checkpoint_record(c) for c in selection.checkpoints],
        "average_best": len(states),
        "metric": selection.metric,
        "mode": selection.mode,
        "ema": ema,
        "dtype": dtype,
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.export-{os.getpid()}"
    try:
        staging.mkdir()
        save_file(state, str(staging / MODEL_WEIGHTS), metadata={"format": "pt"})
        shutil.copyfile(selection.config, staging / CONFIG_FILE)
        (staging / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if out.is_dir():
            out.rmdir()  # an empty directory given as OUT (check_output refused any other)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _checkpoint_record(location: WeightsLocation) -> dict[str, Any]:
    manifest: Manifest | None = location.manifest
    assert location.checkpoint is not None and manifest is not None
    return {
        "name": location.checkpoint.name,
        "path": str(location.checkpoint),
        "step": manifest.step,
        "epoch": manifest.epoch,
        "metrics": manifest.metrics,
        "zero_consolidated": location.zero_checkpoint,
    }
