"""Where a model's weights are on disk: a checkpoint, an experiment (its best), an export, or a file.

Torch-free, so `tsdia-submit` and the trainer can refuse a bad `training.init_from` before any directory
is made. `tsdia.weights` reads what this module finds (and consolidates DeepSpeed ZeRO shards).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tsdia.config.schema import Config
from tsdia.errors import CheckpointError, ConfigError
from tsdia.experiment.checkpoints import BEST_LINK, MANIFEST, Manifest, latest_checkpoint, read_manifest
from tsdia.experiment.layout import CONFIG_FILE

MODEL_WEIGHTS = "model.safetensors"  # Accelerate's save_state name for the (single) model's weights
EMA_WEIGHTS = "ema.safetensors"  # the EMA copy of the weights, saved beside them when training.ema is on
EXPORT_RECORD = "export.json"  # in a `tsdia export` directory: which checkpoints, metrics, command
ZERO_TAG = "pytorch_model"  # the tag (sub-directory) Accelerate gives DeepSpeed's sharded engine state


@dataclass
class WeightsLocation:
    """What a path given by a user holds, and where its weights and config are."""

    path: Path  # as given, made absolute
    kind: str  # "checkpoint", "experiment" (its best checkpoint), "export" or "file"
    weights: Path | None  # the safetensors file; None for a ZeRO checkpoint without consolidated weights
    checkpoint: Path | None = None  # the checkpoint directory (checkpoint and experiment)
    manifest: Manifest | None = None
    config: Path | None = None  # the config.yml that builds the model, when there is one

    @property
    def zero_checkpoint(self) -> bool:
        """A DeepSpeed checkpoint whose weights are only in ZeRO shards (consolidated on read)."""
        return self.weights is None

    def ema_weights(self) -> Path:
        """The checkpoint's EMA weights, or a `CheckpointError` naming it and the fix."""
        directory = self.checkpoint or (self.weights.parent if self.weights else self.path)
        ema = directory / EMA_WEIGHTS
        if not ema.is_file():
            raise CheckpointError(
                f"{directory} has no {EMA_WEIGHTS}: that run kept no EMA of its weights. Train with "
                "training.ema enabled to have them, or export without --ema."
            )
        return ema

    def describe(self) -> dict[str, Any]:
        """A JSON-ready record of the source (for hyperparameters.json and export.json)."""
        return {
            "path": str(self.path),
            "kind": self.kind,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "weights": str(self.weights) if self.weights else None,
            "manifest": _manifest_record(self.manifest),
        }


def _manifest_record(manifest: Manifest | None) -> dict[str, Any] | None:
    if manifest is None:
        return None
    return {
        "name": manifest.name,
        "step": manifest.step,
        "epoch": manifest.epoch,
        "metrics": manifest.metrics,
        "created": manifest.created,
    }


def locate_weights(path: str | os.PathLike[str], label: str) -> WeightsLocation:
    """Find the weights behind `path`; `label` names the key or argument in errors (`CheckpointError`)."""
    given = Path(path).expanduser().absolute()
    if not given.exists():
        raise CheckpointError(
            f"{label}: {path} does not exist. Give a checkpoint directory, an experiment directory (its "
            f"best_checkpoint is used), a `tsdia export` directory or a {MODEL_WEIGHTS} file."
        )
    if given.is_file():
        if given.suffix != ".safetensors":
            raise CheckpointError(f"{label}: {path} is a file but not a .safetensors file.")
        config = given.parent / CONFIG_FILE
        return WeightsLocation(given, "file", given, config=config if config.is_file() else None)
    if (given / MANIFEST).exists():
        return locate_checkpoint(given, label, "checkpoint", given)
    if (given / EXPORT_RECORD).is_file():
        if not (given / MODEL_WEIGHTS).is_file():
            raise CheckpointError(f"{label}: {path} is an unfinished export: it has no {MODEL_WEIGHTS}.")
        return WeightsLocation(given, "export", given / MODEL_WEIGHTS, config=given / CONFIG_FILE)
    best = given / BEST_LINK
    if best.is_symlink() or best.is_dir():
        return locate_checkpoint(best.resolve(), label, "experiment", given)
    if (given / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{label}: the experiment {path} has no {BEST_LINK} yet (no checkpoint records its best_metric). "
            "Give one of its checkpoint-epoch*-step* directories instead."
        )
    raise CheckpointError(
        f"{label}: {path} is not a checkpoint (no {MANIFEST}), an experiment (no {BEST_LINK}), an export "
        f"(no {EXPORT_RECORD}) or a .safetensors file."
    )


def locate_checkpoint(
    checkpoint: Path, label: str, kind: str = "checkpoint", given: Path | None = None
) -> WeightsLocation:
    """A complete checkpoint directory's weights (or its ZeRO shards) and its experiment's config."""
    manifest = read_manifest(checkpoint)
    if manifest is None:
        raise CheckpointError(
            f"{label}: {checkpoint} is not a complete tsdia checkpoint (its {MANIFEST} is missing, unreadable "
            "or lists files that are not all there). Choose another checkpoint-epoch*-step* directory."
        )
    weights: Path | None = checkpoint / MODEL_WEIGHTS
    if not (checkpoint / MODEL_WEIGHTS).is_file():
        if not (checkpoint / ZERO_TAG).is_dir():
            raise CheckpointError(
                f"{label}: {checkpoint} holds neither {MODEL_WEIGHTS} nor DeepSpeed ZeRO shards ({ZERO_TAG}/)."
            )
        weights = None  # only in ZeRO shards: consolidated when read
    config = checkpoint.parent / CONFIG_FILE
    return WeightsLocation(
        given or checkpoint,
        kind,
        weights,
        checkpoint=checkpoint,
        manifest=manifest,
        config=config if config.is_file() else None,
    )


def check_init_from(config: Config) -> WeightsLocation | None:
    """Refuse a `training.init_from` that holds no weights (a `ConfigError` naming the key and file:line).

    Skipped when the run will resume instead (an explicit `checkpoint.resume` path, or an experiment
    directory that already has a complete checkpoint): the checkpoint's weights win, so the key is unused.
    """
    training = config.training
    if training.init_from is None:
        return None
    checkpoint = training.checkpoint
    if (checkpoint.resume not in (None, "latest")) or latest_checkpoint(checkpoint.save_dir) is not None:
        return None
    try:
        return locate_weights(training.init_from, "training.init_from")
    except CheckpointError as err:
        raise ConfigError(f"{config.source.where('training.init_from')}: {err}") from None
