"""The README's generated parts stay in sync with the code."""

from __future__ import annotations

from conftest import REPO
from tsdia.config.reference import markdown_reference


def test_readme_config_reference_is_current() -> None:
    readme = (REPO / "README.md").read_text()
    start = readme.index("<!-- config-reference:start")
    start = readme.index("\n", start) + 1
    end = readme.index("<!-- config-reference:end -->")
    assert readme[start:end] == markdown_reference(), (
        "README config table is stale: regenerate it with `python -m tsdia.config.reference` "
        "and paste the output between the config-reference markers."
    )


def test_readme_lists_every_module() -> None:
    readme = (REPO / "README.md").read_text()
    for path in (REPO / "src" / "tsdia").rglob("*.py"):
        if path.name == "__init__.py":
            continue
        rel = path.relative_to(REPO / "src" / "tsdia")
        shown = (
            str(rel)
            if rel.parent.name in ("config", "training", "examples", "launch", "experiment")
            else rel.name
        )
        assert shown in readme, f"README's layout tree does not mention {rel}"
