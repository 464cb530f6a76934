"""Model weights out of experiments: read (consolidating DeepSpeed ZeRO shards), average, load, rebuild.

`load_model(path)` builds the model from the experiment's (or export's) config.yml and loads the weights;
`initialize_from(model, config)` is `training.init_from` for the trainer; `tsdia.export` writes exports.
Where the files are is decided by the torch-free `tsdia.experiment.weight_files`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tsdia.config.schema import Config
from tsdia.errors import CheckpointError
from tsdia.experiment.weight_files import ZERO_TAG, WeightsLocation, check_init_from, locate_weights

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


def read_weights(location: WeightsLocation, ema: bool = False) -> StateDict:
    """The weights at `location` on the CPU (the EMA copy with `ema`), consolidating ZeRO shards if needed."""
    from safetensors.torch import load_file

    if ema:
        return load_file(str(location.ema_weights()))
    if location.weights is not None:
        return load_file(str(location.weights))
    assert location.checkpoint is not None  # only a checkpoint can lack a weights file
    return consolidate_zero(location.checkpoint)


def consolidate_zero(checkpoint: Path) -> StateDict:
    """Whole weights from a DeepSpeed checkpoint's shards (any world size, ZeRO stage 0-3, on the CPU):
    the fp32 master weights for stages 1-3, the module's own for stage 0."""
    shards = checkpoint / ZERO_TAG
    logger.info("Consolidating the DeepSpeed shards of %s", checkpoint)
    try:
        if not any(shards.glob("*optim_states.pt")):
            # ZeRO stage 0 partitions nothing: the model states hold the whole module (zero_to_fp32 fails
            # on them), in the engine's training dtype (bf16 under bf16 mixed precision, else fp32).
            states = torch.load(shards / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
            state = states["module"]
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=ZERO_TAG)
    except Exception as err:  # DeepSpeed's reader raises whatever a damaged or foreign layout gives it
        logger.debug("Consolidating %s failed", checkpoint, exc_info=True)
        raise CheckpointError(
            f"{checkpoint}: cannot consolidate its DeepSpeed shards ({type(err).__name__}: {err})."
        ) from None
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}


def average_weights(states: Sequence[StateDict], labels: Sequence[str]) -> StateDict:
    """The element-wise mean of `states` (summed in float64, then cast back to each tensor's dtype).

    Every state must have the same keys and shapes. Integer tensors (e.g. BatchNorm's step counter) are
    not averaged: they are taken from the first state (the best checkpoint).
    """
    first = states[0]
    for state, label in zip(states[1:], labels[1:], strict=True):
        if state.keys() != first.keys():
            diff = sorted(set(state) ^ set(first))
            raise CheckpointError(f"{label} holds other weights than {labels[0]}: {', '.join(diff[:10])}.")
        for name, tensor in state.items():
            if tensor.shape != first[name].shape:
                raise CheckpointError(
                    f"{label}: {name} has shape {tuple(tensor.shape)}, but {tuple(first[name].shape)} in "
                    f"{labels[0]}: these checkpoints are of different models and cannot be averaged."
                )
    out: StateDict = {}
    for name, tensor in first.items():
        if not tensor.is_floating_point():
            out[name] = tensor.clone()
            continue
        total = torch.zeros(tensor.shape, dtype=torch.float64)
        for state in states:
            total += state[name].to(torch.float64)
        out[name] = (total / len(states)).to(tensor.dtype)
    return out


def load_into(model: nn.Module, state: StateDict, strict: bool, label: str, fix: str) -> None:
    """Load `state` into `model`; a mismatch is a `CheckpointError` naming the keys, with `fix` as the hint."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{name} {tuple(state[name].shape)} vs the model's {tuple(own[name].shape)}"
        for name in sorted(set(own) & set(state))
        if state[name].shape != own[name].shape
    ]
    if mismatched:
        raise CheckpointError(
            f"{label}: shapes differ from the model's: {_some(mismatched)}. The weights come from a model "
            "built with other arguments; build the same model (model.* keys)."
        )
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing from the weights: {_some(missing)}")
        if unexpected:
            parts.append(f"not in the model: {_some(unexpected)}")
        raise CheckpointError(f"{label}: the keys do not match the model's ({'; '.join(parts)}). {fix}")
    model.load_state_dict(state, strict=False)
    if missing or unexpected:
        logger.warning(
            "%s: loaded %d tensors; %d of the model's kept their initial values (%s), %d ignored (%s).",
            label,
            len(own) - len(missing),
            len(missing),
            _some(missing),
            len(unexpected),
            _some(unexpected),
        )


def _some(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "") if names else "none"


def initialize_from(model: nn.Module, config: Config) -> dict[str, Any] | None:
    """`training.init_from`: load only the weights into `model`, before the experiment directory is made.

    Returns the record of the source for hyperparameters.json, or None when `init_from` is unset or the
    run will resume (its checkpoint's weights win). Raises `ConfigError`/`CheckpointError` for a bad path
    or weights that do not fit the model.
    """
    training = config.training
    location = check_init_from(config)
    if location is None:
        return None
    load_into(
        model,
        read_weights(location),
        training.init_from_strict,
        f"{config.source.where('training.init_from')}: training.init_from: {training.init_from}",
        "Set training.init_from_strict: false to load only the matching keys.",
    )
    return {**location.describe(), "strict": training.init_from_strict}


def load_model(
    path: str | os.PathLike[str], *, ema: bool = False, device: str | torch.device = "cpu"
) -> nn.Module:
    """The model of an export, an experiment (its best checkpoint) or a checkpoint, in eval mode.

    Built from the experiment's (or export's) config.yml (`model.target` and its arguments), with the
    weights loaded strictly; `ema` loads a checkpoint's EMA weights instead.
    """
    from tsdia.config.loader import load_config
    from tsdia.training.components import build_component

    location = locate_weights(path, "load_model")
    if location.config is None:
        raise CheckpointError(
            f"load_model: {path}: no config.yml beside it to build the model from. Give an experiment, one of "
            "its checkpoints or a `tsdia export` directory, or build the model yourself and load the file."
        )
    config = load_config(str(location.config))
    model: nn.Module = build_component(config.model, "model", config.source)
    load_into(
        model,
        read_weights(location, ema=ema),
        True,
        f"load_model: {path}",
        f"{location.config} builds another model than the one these weights are from.",
    )
    return model.to(device).eval()
