"""Safe YAML reading that remembers where every key came from.

Only plain YAML types are built (SafeLoader's constructors); a tag that would build a Python object,
a duplicate key, a non-string key, an alias bomb or an oversized file is a `ConfigError` naming file:line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tsdia.errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20  # a real config is a few KiB; anything near this is a mistake
MAX_NODES = 100_000  # bounds alias expansion ("billion laughs")
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 would make it a string)."""


# YAML 1.1 reads `4:00:00` as the base-60 integer 14400; a config means a string (a Slurm time).
_BASE60 = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
for _first in "-+0123456789":
    _Loader.yaml_implicit_resolvers.setdefault(_first, [])
    _Loader.yaml_implicit_resolvers[_first] = [
        ("tag:yaml.org,2002:str", _BASE60)
    ] + _Loader.yaml_implicit_resolvers[_first]

_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def read_config_text(path: str) -> str:
    """Read a config file as UTF-8 text, with errors that say what is wrong with the path."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(
            f"{path}: config file not found. Pass the path of a YAML file, e.g. configs/example.yml."
        )
    if p.is_dir():
        raise ConfigError(f"{path}: is a directory, not a config file. Pass a YAML file inside it.")
    size = p.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: config file is {size} bytes (limit {MAX_CONFIG_BYTES}); is this the right file?"
        )
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save the config as UTF-8.") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file: {err.strerror}.") from None


def parse_yaml(text: str, origin: str, prefix: str = "", positions: dict[str, str] | None = None) -> Any:
    """Parse YAML text into plain Python values, recording `dotted.key -> origin:line` in `positions`."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{origin}{line}: invalid YAML: {err.problem or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{origin}: invalid YAML: {err}") from None
    finally:
        loader.dispose()
    if node is None:
        return None
    builder = _Builder(loader, origin, positions if positions is not None else {})
    return builder.build(node, prefix)


class _Builder:
    def __init__(self, loader: _Loader, origin: str, positions: dict[str, str]) -> None:
        self.loader = loader
        self.origin = origin
        self.positions = positions
        self.count = 0

    def where(self, node: yaml.Node) -> str:
        return f"{self.origin}:{node.start_mark.line + 1}"

    def build(self, node: yaml.Node, path: str) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise ConfigError(
                f"{self.where(node)}: the YAML expands to more than {MAX_NODES} values "
                "(anchors/aliases nested too deep?); write the config out plainly."
            )
        if isinstance(node, yaml.MappingNode):
            return self.build_mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ_TAG:
                raise self.tag_error(node)
            return [self.build(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError:
            raise self.tag_error(node) from None

    def build_mapping(self, node: yaml.MappingNode, path: str) -> dict[str, Any]:
        if node.tag != _MAP_TAG:
            raise self.tag_error(node)
        try:
            self.loader.flatten_mapping(node)  # resolves `<<: *anchor` merge keys
        except yaml.constructor.ConstructorError as err:
            raise ConfigError(f"{self.where(node)}: invalid merge key: {err.problem}") from None
        out: dict[str, Any] = {}
        first_line: dict[str, str] = {}
        for key_node, value_node in node.value:
            key = self.build(key_node, path) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                raise ConfigError(f"{self.where(key_node)}: keys must be strings, got {key_node.value!r}.")
            key_path = f"{path}.{key}" if path else key
            if key in out:
                raise ConfigError(
                    f"{self.where(key_node)}: duplicate key '{key_path}' (first set at {first_line[key]}); "
                    "remove one of them."
                )
            first_line[key] = self.where(key_node)
            self.positions[key_path] = self.where(key_node)
            out[key] = self.build(value_node, key_path)
        return out

    def tag_error(self, node: yaml.Node) -> ConfigError:
        return ConfigError(
            f"{self.where(node)}: YAML tag {node.tag!r} is not allowed; configs hold plain values only "
            "(strings, numbers, booleans, lists, mappings)."
        )
