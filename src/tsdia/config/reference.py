"""The config reference table, generated from the schema (`python -m tsdia.config.reference`).

The README embeds this output between markers; a test keeps the two in sync.
"""

from __future__ import annotations

import dataclasses
import typing

from tsdia.config.schema import ComponentConfig, Config


def rows(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """`(dotted key, default, doc)` for every leaf field."""
    out: list[tuple[str, str, str]] = []
    instance = cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "source" or f.metadata.get("internal"):
            continue
        key = f"{prefix}{f.name}"
        hint = hints[f.name]
        if hint is ComponentConfig:
            target = getattr(instance, f.name).target
            out.append(
                (f"{key}.target", f"`{target}`", "Import path of the factory; other keys are its kwargs.")
            )
        elif dataclasses.is_dataclass(hint):
            out.extend(rows(typing.cast(type, hint), f"{key}."))
        else:
            default = getattr(instance, f.name)
            shown = (
                "required"
                if default == "" and f.name == "save_dir"
                else f"`{default!r}`".replace("None", "null")
            )
            out.append((key, shown, f.metadata.get("doc", "")))
    return out


def markdown_reference() -> str:
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{key}` | {default} | {doc} |" for key, default, doc in rows()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_reference(), end="")
