"""The optimizer and the learning-rate schedule: built-in names, or any callable named by import path.

`training.optimizer.target` is called as `target(params, lr=lr, **other_keys)` and must give a
`torch.optim.Optimizer`; `training.scheduler.target` is called as
`target(optimizer, total_steps=N, **other_keys)` (`total_steps` only when it takes that argument) and
must give an `LRScheduler` attached to that optimizer. The trainer steps the schedule once per optimizer
step and checkpoints it through its `state_dict()`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, cast

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau

from tsdia.config.schema import ConfigSource, OptimizerConfig, SchedulerConfig, TrainingConfig
from tsdia.errors import ConfigError
from tsdia.training.components import check_kwargs, load_target

OPTIMIZER_KEY = "training.optimizer"
SCHEDULER_KEY = "training.scheduler"
INVERSE_SQRT = ("noam", "inverse_sqrt")
_PLATEAU = (
    "ReduceLROnPlateau steps on a validation metric, but tsdia steps the schedule once per optimizer step "
    "without arguments; use a schedule over steps"
)


def build_optimizer(
    params: Any, config: OptimizerConfig, source: ConfigSource | None = None
) -> torch.optim.Optimizer:
    """The optimizer over `params` (e.g. `model.parameters()`), at its peak learning rate `config.lr`."""
    if config.target is None:
        return _named_optimizer(params, config)
    source = source or ConfigSource()
    target, where = config.target, source.where(f"{OPTIMIZER_KEY}.target")
    factory = load_target(target, OPTIMIZER_KEY, source)
    if inspect.isclass(factory) and not issubclass(factory, torch.optim.Optimizer):
        raise ConfigError(
            f"{where}: {OPTIMIZER_KEY}.target: '{target}' is the class {_qualname(factory)}, not a "
            "torch.optim.Optimizer. Name an optimizer class (e.g. torch.optim.SGD) or a function that "
            "takes the parameters and `lr` and returns one."
        )
    accepts = check_kwargs(
        factory, config.kwargs, OPTIMIZER_KEY, target, source, first="the model's parameters"
    )
    if not accepts("lr"):
        raise ConfigError(
            f"{where}: {OPTIMIZER_KEY}.target: {target} takes no argument 'lr'; tsdia passes "
            "training.optimizer.lr to it as the peak learning rate that the schedule scales. Wrap it in a "
            "function that takes `lr`."
        )
    try:
        optimizer = cast(Callable[..., Any], factory)(params, lr=config.lr, **config.kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"{source.where(OPTIMIZER_KEY)}: {OPTIMIZER_KEY}: {target} rejected its arguments: {err}"
        ) from None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"{where}: {OPTIMIZER_KEY}.target: {target} returned {_a(optimizer)}, not a "
            "torch.optim.Optimizer."
        )
    return optimizer


def _named_optimizer(params: Any, config: OptimizerConfig) -> torch.optim.Optimizer:
    if config.name == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    betas = (config.betas[0], config.betas[1])
    cls = torch.optim.AdamW if config.name == "adamw" else torch.optim.Adam
    return cls(params, lr=config.lr, betas=betas, eps=config.eps, weight_decay=config.weight_decay)


def lr_lambda(config: SchedulerConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warm-up reaching 1 at
    `warmup_steps`, then the named decay (cosine and linear end at `total_steps`)."""
    warmup, floor, name = config.warmup_steps, config.min_lr_ratio, config.name
    if name in INVERSE_SQRT and warmup == 0:
        raise ConfigError(
            f"{SCHEDULER_KEY}.warmup_steps: the {name} schedule needs warmup_steps > 0 (it decays as "
            "sqrt(warmup_steps / step))."
        )

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if name == "constant":
            return 1.0
        if name in INVERSE_SQRT:
            return max(floor, math.sqrt(warmup / step))
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if name == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    config: SchedulerConfig,
    total_steps: int,
    source: ConfigSource | None = None,
) -> LRScheduler:
    """The schedule over `total_steps` optimizer steps (the whole `training.epochs`)."""
    if config.target is None:
        return LambdaLR(optimizer, lr_lambda(config, total_steps))
    source = source or ConfigSource()
    target, where = config.target, source.where(f"{SCHEDULER_KEY}.target")
    factory = load_target(target, SCHEDULER_KEY, source)
    if inspect.isclass(factory) and issubclass(factory, ReduceLROnPlateau):
        raise ConfigError(f"{where}: {SCHEDULER_KEY}.target: {_PLATEAU}.")
    if inspect.isclass(factory) and not issubclass(factory, LRScheduler):
        raise ConfigError(
            f"{where}: {SCHEDULER_KEY}.target: '{target}' is the class {_qualname(factory)}, not a "
            "torch.optim.lr_scheduler.LRScheduler. Name a scheduler class or a function "
            "fn(optimizer, total_steps, ...) that returns one."
        )
    accepts = check_kwargs(
        factory,
        config.kwargs,
        SCHEDULER_KEY,
        target,
        source,
        first="the optimizer",
        reserved={"total_steps": "the optimizer steps of all training.epochs"},
    )
    kwargs = {**config.kwargs, **({"total_steps": total_steps} if accepts("total_steps") else {})}
    try:
        scheduler = cast(Callable[..., Any], factory)(optimizer, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"{source.where(SCHEDULER_KEY)}: {SCHEDULER_KEY}: {target} rejected its arguments: {err}"
        ) from None
    if isinstance(scheduler, ReduceLROnPlateau) or not isinstance(scheduler, LRScheduler):
        why = _PLATEAU if isinstance(scheduler, ReduceLROnPlateau) else f"{_a(scheduler)}, not an LRScheduler"
        raise ConfigError(f"{where}: {SCHEDULER_KEY}.target: {target} returned {why}.")
    if scheduler.optimizer is not optimizer:
        raise ConfigError(
            f"{where}: {SCHEDULER_KEY}.target: {target} returned a schedule for another optimizer; build it "
            "on the optimizer passed as the first argument."
        )
    return scheduler


def check_optim(training: TrainingConfig, source: ConfigSource, batches_per_epoch: int) -> None:
    """Build the optimizer and schedule once over a one-element probe parameter, so that a bad target or
    argument stops the run (exit 2) before anything is written. `batches_per_epoch` is the unsharded
    loader's length: the probe schedule's `total_steps` is an upper bound of the real one."""
    probe = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = build_optimizer(probe, training.optimizer, source)
    steps = math.ceil(batches_per_epoch / training.gradient_accumulation_steps) * training.epochs
    build_scheduler(optimizer, training.scheduler, max(1, steps), source)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _a(value: Any) -> str:
    """`a dict`, `None`: what a factory returned, for an error message."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"
