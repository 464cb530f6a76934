"""Build user components from import paths, checking their keyword arguments against the signature."""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from tsdia.config.schema import ComponentConfig, ConfigSource
from tsdia.errors import ConfigError


def load_target(target: str, key_path: str, source: ConfigSource) -> Callable[..., Any]:
    """Import `package.module:callable` (or `package.module.callable`), with an error that names the
    config key and file:line."""
    where = source.where(f"{key_path}.target")
    if ":" in target:
        module_name, _, attribute = target.partition(":")
        module = _import_module(module_name, key_path, where)
    else:
        module, module_name, attribute = _import_dotted(target, key_path, where)
    sep = ":" if ":" in target else "."
    obj: Any = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            names = {n.lower(): n for n in dir(obj) if not n.startswith("_")}  # `Sgd` finds `SGD`
            guess = difflib.get_close_matches(part.lower(), list(names), n=1)
            hint = f" Did you mean '{module_name}{sep}{names[guess[0]]}'?" if guess and obj is module else ""
            raise ConfigError(
                f"{where}: {key_path}.target: '{module_name}' has no attribute '{attribute}'.{hint}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{where}: {key_path}.target: '{target}' is not callable.")
    return obj


def _import_module(module_name: str, key_path: str, where: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        raise _import_error(module_name, err, key_path, where) from None


def _import_error(module_name: str, err: ImportError, key_path: str, where: str) -> ConfigError:
    return ConfigError(
        f"{where}: {key_path}.target: cannot import module '{module_name}' ({err}). "
        "Check the spelling, or install the package that provides it."
    )


def _import_dotted(target: str, key_path: str, where: str) -> tuple[Any, str, str]:
    """`a.b.C.d` -> (module a.b, "a.b", "C.d"): the longest prefix that is a module holds the rest."""
    parts = target.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(
            f"{where}: {key_path}.target: expected an import path 'package.module:callable' (or "
            f"'package.module.callable'), got {target!r}."
        )
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            return importlib.import_module(module_name), module_name, ".".join(parts[cut:])
        except ModuleNotFoundError as err:
            # Only "this prefix is no module" means: try a shorter one. A module that exists but fails
            # to import (a dependency missing inside it) is reported as it is.
            missing_prefix = bool(err.name) and f"{module_name}.".startswith(f"{err.name}.")
            if missing_prefix and cut > 1:
                continue
            raise _import_error(module_name, err, key_path, where) from None
        except ImportError as err:
            raise _import_error(module_name, err, key_path, where) from None
    raise AssertionError("unreachable: the loop returns or raises at cut == 1")


def check_kwargs(
    factory: Callable[..., Any],
    kwargs: dict[str, Any],
    key_path: str,
    target: str,
    source: ConfigSource,
    first: str | None = None,
    reserved: dict[str, str] | None = None,
) -> Callable[[str], bool]:
    """Refuse a key the factory's signature does not take (naming it with file:line and the closest
    valid key); return whether the factory takes a given keyword. `first`: what tsdia passes as the first
    positional argument (its parameter is then no config key); `reserved`: keywords tsdia sets, and from what."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return lambda name: True  # a builtin without a signature: let the call decide
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    passed_first = params[0].name if first and params and params[0].kind in positional else None
    named = [
        p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != passed_first
    ]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    for key in kwargs:
        where = source.where(f"{key_path}.{key}")
        if key == passed_first or key in (reserved or {}):
            what = first if key == passed_first else (reserved or {})[key]
            raise ConfigError(
                f"{where}: {key_path}.{key}: tsdia passes this argument itself ({what}); remove the key."
            )
        if key not in named and not takes_any:
            guess = difflib.get_close_matches(key, named, n=1)
            hint = f" Did you mean '{guess[0]}'?" if guess else ""
            raise ConfigError(
                f"{where}: unknown key '{key_path}.{key}': {target} takes no argument '{key}'.{hint} "
                f"Valid keys: target, {', '.join(named)}."
            )
    return lambda name: takes_any or name in named


def build_component(section: ComponentConfig, key_path: str, source: ConfigSource) -> Any:
    """Call the section's target with its other keys, checking them against the signature first."""
    factory = load_target(section.target, key_path, source)
    check_kwargs(factory, section.kwargs, key_path, section.target, source)
    try:
        return factory(**section.kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"{source.where(key_path)}: {key_path}: {section.target} rejected its arguments: {err}"
        ) from None
