"""Build user components from import paths, and the optimizer and learning-rate schedule."""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from tsdia.config.schema import ComponentConfig, ConfigSource, OptimizerConfig, SchedulerConfig
from tsdia.errors import ConfigError


def load_target(target: str, key_path: str, source: ConfigSource) -> Callable[..., Any]:
    """Import `package.module:callable`, with an error that names the config key and file:line."""
    where = source.where(f"{key_path}.target")
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"{where}: {key_path}.target: cannot import module '{module_name}' ({err}). "
            "Check the spelling, or install the package that provides it."
        ) from None
    obj: Any = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            guess = difflib.get_close_matches(part, names, n=1)
            hint = f" Did you mean '{module_name}:{guess[0]}'?" if guess else ""
            raise ConfigError(
                f"{where}: {key_path}.target: '{module_name}' has no attribute '{attribute}'.{hint}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{where}: {key_path}.target: '{target}' is not callable.")
    return obj


def build_component(section: ComponentConfig, key_path: str, source: ConfigSource) -> Any:
    """Call the section's target with its other keys, checking them against the signature first."""
    factory = load_target(section.target, key_path, source)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        params = signature.parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for key in section.kwargs:
            if key not in params and not takes_any:
                guess = difflib.get_close_matches(key, list(params), n=1)
                hint = f" Did you mean '{guess[0]}'?" if guess else ""
                raise ConfigError(
                    f"{source.where(f'{key_path}.{key}')}: unknown key '{key_path}.{key}': {section.target} takes "
                    f"no argument '{key}'.{hint} Valid keys: target, {', '.join(params)}."
                )
    try:
        return factory(**section.kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"{source.where(key_path)}: {key_path}: {section.target} rejected its arguments: {err}"
        ) from None


def build_optimizer(params: Any, config: OptimizerConfig) -> torch.optim.Optimizer:
    if config.name == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    betas = (config.betas[0], config.betas[1])
    cls = torch.optim.AdamW if config.name == "adamw" else torch.optim.Adam
    return cls(params, lr=config.lr, betas=betas, eps=config.eps, weight_decay=config.weight_decay)


def lr_lambda(config: SchedulerConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at each optimizer step: linear warm-up, then the configured decay."""
    warmup = config.warmup_steps
    floor = config.min_lr_ratio

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if config.name == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: SchedulerConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))
