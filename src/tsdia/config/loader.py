"""Load a YAML config (plus `dotted.key=value` overrides) into the typed `Config`, or explain what is wrong."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import re
import types
import typing
from typing import Any, Literal, Union

import yaml

from tsdia.config.metric_checks import metric_errors
from tsdia.config.schema import ComponentConfig, Config, ConfigSource, OptimizerConfig, SchedulerConfig
from tsdia.config.yaml_source import parse_yaml, read_config_text
from tsdia.errors import ConfigError


def load_config(path: str, overrides: typing.Sequence[str] = ()) -> Config:
    """Read, override and validate a config file. Raises `ConfigError` listing every problem found."""
    return ConfigTemplate(path).with_overrides(overrides)


class ConfigTemplate:
    """A config file read and parsed once, to build several configs from it (a sweep's members)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.text = read_config_text(path)
        self.positions: dict[str, str] = {}
        raw = parse_yaml(self.text, path, positions=self.positions)
        if raw is None:
            raise ConfigError(f"{path}: the config file is empty. Start from configs/example.yml.")
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{path}:1: the top level must be a mapping with sections model, dataset, training, ...; "
                f"got a {type(raw).__name__}."
            )
        self.raw: dict[str, Any] = raw

        self.overrides: list[str] = []  # applied to `raw` already (see `extended`)

    def extended(self, overrides: typing.Sequence[str]) -> ConfigTemplate:
        """A template with `overrides` applied once: the common part of many configs (a sweep's)."""
        template = copy.copy(self)
        template.raw, template.positions = copy.deepcopy(self.raw), dict(self.positions)
        for override in overrides:
            apply_override(template.raw, override, template.positions)
        template.overrides = [*self.overrides, *overrides]
        return template

    def with_overrides(self, overrides: typing.Sequence[str] = ()) -> Config:
        """The validated config with `overrides` applied (the template is left as it was)."""
        raw, positions = copy.deepcopy(self.raw), dict(self.positions)
        for override in overrides:
            apply_override(raw, override, positions)
        source = ConfigSource(
            path=self.path,
            text=self.text,
            overrides=[*self.overrides, *overrides],
            raw=raw,
            positions=positions,
        )
        return config_from_dict(raw, source)


def apply_override(raw: dict[str, Any], override: str, positions: dict[str, str]) -> None:
    """Apply one `dotted.key=value` override (the value is a YAML scalar or flow list/mapping) in place."""
    label = f"override '{override}'"
    key_path, sep, value_text = override.partition("=")
    key_path = key_path.strip()
    if not sep or not key_path:
        raise ConfigError(f"{label}: expected KEY=VALUE with a dotted key, e.g. training.max_steps=100.")
    parts = key_path.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"{label}: '{key_path}' is not a dotted key (empty part).")
    value = (
        parse_yaml(value_text, label, prefix=key_path, positions=positions) if value_text.strip() else None
    )
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            above = ".".join(parts[: depth + 1])
            raise ConfigError(
                f"{label}: '{above}' is a value ({child!r}), so it has no key '{parts[depth + 1]}'."
            )
        node = child
    node[parts[-1]] = value
    positions[key_path] = label


def config_from_dict(raw: dict[str, Any], source: ConfigSource) -> Config:
    """Validate a plain mapping against the schema; collect every error before raising."""
    errors: list[str] = []
    config = _build(Config, raw, "", source, errors)
    if not errors and not config.training.checkpoint.save_dir:
        errors.append(
            f"{source.where('training.checkpoint')}: training.checkpoint.save_dir is required: set it in the "
            "config or pass training.checkpoint.save_dir=DIR."
        )
    if not errors:
        betas = config.training.optimizer.betas
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            where = source.where("training.optimizer.betas")
            errors.append(f"{where}: training.optimizer.betas: expected two values in [0, 1), got {betas}.")
        errors.extend(_dataloader_errors(config, source))
        errors.extend(_schedule_errors(config, source))
        errors.extend(_keep_best_errors(config, source))
        errors.extend(metric_errors(config, source))
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    config.source = source
    return config


def _keep_best_errors(config: Config, source: ConfigSource) -> list[str]:
    """`keep_best` checkpoints must fit within `save_total_limit`, or rotation could not keep them all."""
    checkpoint = config.training.checkpoint
    keep, limit = checkpoint.keep_best, checkpoint.save_total_limit
    if keep is None or limit is None or keep <= limit:
        return []
    key_path = "training.checkpoint.keep_best"
    return [
        f"{source.where(key_path)}: {key_path}: {keep} is more than training.checkpoint.save_total_limit "
        f"({limit}), which would have to delete some of them; raise save_total_limit to at least {keep} "
        "or lower keep_best."
    ]


def _dataloader_errors(config: Config, source: ConfigSource) -> list[str]:
    """Unknown RNG names; worker-only DataLoader options without workers (PyTorch would raise at start-up)."""
    training = config.training
    errors = []
    unknown = sorted(set(training.dataloader.sample_rngs) - {"torch", "random", "numpy"})
    if unknown:
        key_path = "training.dataloader.sample_rngs"
        errors.append(
            f"{source.where(key_path)}: {key_path}: unknown RNG {', '.join(map(repr, unknown))}; "
            "tsdia seeds these global RNGs per sample: torch, random, numpy."
        )
    if training.num_workers > 0:
        return errors
    for key, inert in (("persistent_workers", False), ("prefetch_factor", None)):
        value = getattr(training.dataloader, key)
        if value != inert:
            key_path = f"training.dataloader.{key}"
            errors.append(
                f"{source.where(key_path)}: {key_path}: {value} needs DataLoader workers, but "
                f"training.num_workers is 0; set training.num_workers > 0 or remove {key_path}."
            )
    return errors


def _schedule_errors(config: Config, source: ConfigSource) -> list[str]:
    scheduler = config.training.scheduler
    if scheduler.target is None and scheduler.name in ("noam", "inverse_sqrt") and not scheduler.warmup_steps:
        key_path = "training.scheduler.warmup_steps"
        where = source.positions.get(key_path) or source.where("training.scheduler.name")
        return [
            f"{where}: {key_path}: the {scheduler.name} schedule needs warmup_steps > 0: "
            "it rises to `lr` over the warm-up, then decays as lr * sqrt(warmup_steps / step). Set e.g. "
            "warmup_steps: 25000 (a common value for speech transformers), or choose another name."
        ]
    return []


def _build(cls: type, raw: Any, path: str, source: ConfigSource, errors: list[str]) -> Any:
    where = source.where(path) if path else source.path
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{where}: '{path}' must be a mapping of keys, got {raw!r}.")
        return cls()
    if cls is ComponentConfig:
        return _build_component(raw, path, source, errors)
    if cls in _TARGETABLE and raw.get("target") is not None:
        return _build_targeted(cls, raw, path, source, errors)
    hints, fields = _schema_of(cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        key_path = f"{path}.{key}" if path else key
        if key not in fields:
            message = _unknown_key(key, key_path, path, list(fields), source)
            if cls in _TARGETABLE:
                message += f" Any other argument needs `{path}.target` (see the README, 'Optimizers and learning-rate schedules')."
            errors.append(message)
            continue
        hint = hints[key]
        if key_path in _SPECIAL:
            try:
                values[key] = _SPECIAL[key_path](value)
            except ValueError as why:
                errors.append(f"{source.where(key_path)}: {key_path}: {why}")
        elif dataclasses.is_dataclass(hint):
            values[key] = _build(typing.cast(type, hint), value, key_path, source, errors)
        else:
            try:
                values[key] = _check_value(value, hint, fields[key].metadata)
            except ValueError as why:
                errors.append(f"{source.where(key_path)}: {key_path}: {why}")
    return cls(**values)


@functools.cache
def _schema_of(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field[Any]]]:
    """A section's resolved type hints and fields (resolving hints is slow; a sweep builds many configs)."""
    fields = {
        f.name: f for f in dataclasses.fields(cls) if f.name != "source" and not f.metadata.get("internal")
    }
    return typing.get_type_hints(cls), fields


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Set by tsdia itself from the launcher's environment; a config value would silently fight them.
_RESERVED_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def _check_env(value: Any) -> dict[str, str]:
    """`distributed.env`: variable names -> scalar values, kept as strings (YAML's `1` means "1")."""
    if not isinstance(value, dict):
        raise ValueError(
            f"got {value!r}; expected a mapping of variable names to values, e.g. {{NCCL_DEBUG: WARN}}."
        )
    out: dict[str, str] = {}
    for name, item in value.items():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not an environment variable name (letters, digits and _).")
        if name in _RESERVED_ENV:
            raise ValueError(
                f"{name} is set by tsdia from the launcher (Slurm or torchrun); set it there, not in the config."
            )
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise ValueError(
                f"{name}: got {item!r} ({_yaml_type(item)}); expected a string or a number. Quote it, "
                f"e.g. {name}: '1'."
            )
        text = str(item)
        if any(ord(c) < 32 for c in text):
            raise ValueError(f"{name}: the value must be one line without control characters.")
        out[name] = text
    return out


_SPECIAL: dict[str, typing.Callable[[Any], Any]] = {"distributed.env": _check_env}


def _build_component(
    raw: dict[str, Any], path: str, source: ConfigSource, errors: list[str]
) -> ComponentConfig:
    default = typing.cast(ComponentConfig, getattr(Config(), path))
    target = raw.get("target", default.target)
    if not isinstance(target, str) or ":" not in target:
        errors.append(
            f"{source.where(path + '.target')}: {path}.target: expected an import path 'package.module:callable', "
            f"got {target!r}."
        )
    return ComponentConfig(target=str(target), kwargs={k: v for k, v in raw.items() if k != "target"})


# Sections that take either their own keys or `target` plus the target's keyword arguments.
_TARGETABLE = (OptimizerConfig, SchedulerConfig)
# With `target`, these keys stay tsdia's own (typed and checked here), all others become kwargs.
_KEPT_WITH_TARGET = {OptimizerConfig: ("lr",), SchedulerConfig: ()}


def _build_targeted(
    cls: type, raw: dict[str, Any], path: str, source: ConfigSource, errors: list[str]
) -> Any:
    """`{target: torch.optim.SGD, lr: 0.1, momentum: 0.9}`: the target (checked when it is imported at
    start-up), tsdia's kept keys, and every other key as a keyword argument."""
    target = raw["target"]
    where = source.where(f"{path}.target")
    if (
        not isinstance(target, str)
        or not re.fullmatch(r"[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*)?", target)
        or (":" not in target and "." not in target)
    ):
        errors.append(
            f"{where}: {path}.target: expected an import path such as 'torch.optim.SGD' or "
            f"'package.module:callable', got {target!r}."
        )
        target = ""
    if raw.get("name") is not None:
        errors.append(
            f"{source.where(path + '.name')}: {path}: set either `name` (a built-in) or `target` (an import "
            f"path), not both; on the command line replace the whole section, e.g. "
            f"'{path}={{target: {target or 'pkg.mod:fn'}}}'."
        )
    hints, fields = _schema_of(cls)
    values: dict[str, Any] = {"target": target}
    for key in _KEPT_WITH_TARGET[cls]:
        if key in raw:
            try:
                values[key] = _check_value(raw[key], hints[key], fields[key].metadata)
            except ValueError as why:
                errors.append(f"{source.where(f'{path}.{key}')}: {path}.{key}: {why}")
    kept = ("target", "name", *_KEPT_WITH_TARGET[cls])
    return cls(**values, kwargs={k: v for k, v in raw.items() if k not in kept})


def _unknown_key(key: str, key_path: str, parent: str, valid: list[str], source: ConfigSource) -> str:
    guess = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f" Did you mean '{guess[0]}'?" if guess else ""
    scope = f"under '{parent}'" if parent else "at the top level"
    return (
        f"{source.where(key_path)}: unknown key '{key_path}'.{hint} Valid keys {scope}: {', '.join(valid)}."
    )


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if origin is dict:
        return "a mapping"
    if hint is type(None):
        return "null"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _check_value(value: Any, hint: Any, meta: typing.Mapping[str, Any]) -> Any:
    """Return `value` converted to `hint`, or raise ValueError saying why it does not fit."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(value, inner[0] if len(inner) == 1 else hint, meta)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices or isinstance(value, bool):
            raise ValueError(f"got {value!r}; expected {_describe(hint)}.")
        return value
    if origin is list:
        items = value if isinstance(value, list) else None
        if items is None:
            raise ValueError(f"got {value!r}; expected {_describe(hint)}.")
        return [_check_value(v, typing.get_args(hint)[0], {}) for v in items]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"got {value!r}; expected {_describe(hint)}.")
        return {str(k): _check_value(v, typing.get_args(hint)[1], {}) for k, v in value.items()}
    ok = isinstance(value, hint) and not (hint in (int, float) and isinstance(value, bool))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ValueError(f"got {value!r} ({_yaml_type(value)}); expected {_describe(hint)}.")
    _check_range(value, meta)
    return value


def _check_range(value: Any, meta: typing.Mapping[str, Any]) -> None:
    if "gt" in meta and not value > meta["gt"]:
        raise ValueError(f"got {value!r}; must be greater than {meta['gt']}.")
    if "ge" in meta and not value >= meta["ge"]:
        raise ValueError(f"got {value!r}; must be at least {meta['ge']}.")
    if "le" in meta and not value <= meta["le"]:
        raise ValueError(f"got {value!r}; must be at most {meta['le']}.")
    if "lt" in meta and not value < meta["lt"]:
        raise ValueError(f"got {value!r}; must be less than {meta['lt']}.")


def _yaml_type(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), "null" if value is None else type(value).__name__)


def effective_yaml(config: Config) -> str:
    """The config as it ran: the original text when there were no overrides, else the merged mapping."""
    source = config.source
    if not source.overrides:
        return source.text
    header = "".join(f"#   {o}\n" for o in source.overrides)
    body = yaml.safe_dump(source.raw, sort_keys=False, allow_unicode=True)
    return f"# Effective config: {source.path} with overrides\n{header}{body}"
