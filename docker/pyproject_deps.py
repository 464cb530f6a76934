"""Print the requirements a pyproject.toml declares, one per line, without building the project.

Used by docker/Dockerfile and docker/Dockerfile.cpu to install the dependencies in a layer that depends only
on pyproject.toml, so that a change under src/ does not reinstall them (tsdia itself is installed after,
with a plain `pip install .`).

    python pyproject_deps.py pyproject.toml [EXTRA[,EXTRA...] ...]

Prints build-system.requires, project.dependencies and the named optional-dependencies
(an extra that names the project itself, such as ``all = ["tsdia[dev]"]``, is expanded into the
requirements of the extras it names).
"""

from __future__ import annotations

import re
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11 (some CUDA base images): pip install tomli
    import tomli as tomllib  # type: ignore[no-redef]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    project = pyproject.get("project", {})
    name = _canonical(project.get("name", ""))
    optional = {_canonical(k): v for k, v in project.get("optional-dependencies", {}).items()}
    out: list[str] = list(pyproject.get("build-system", {}).get("requires", []))
    if "dependencies" in project.get("dynamic", []):
        print("pyproject_deps: dynamic dependencies are left to pip", file=sys.stderr)
    out += project.get("dependencies", [])
    seen: set[str] = set()
    todo = [_canonical(e) for arg in extras for e in arg.split(",") if e.strip()]
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in optional:
            print(f"pyproject_deps: no extra {extra!r} (have: {sorted(optional)})", file=sys.stderr)
            continue
        for req in optional[extra]:
            m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", req)
            if m and _canonical(m.group(1)) == name:  # self-reference: expand its extras
                todo += [_canonical(e) for e in (m.group(2) or "").split(",") if e.strip()]
            else:
                out.append(req)
    return list(dict.fromkeys(out))


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1], "rb") as f:
        data = tomllib.load(f)
    print("\n".join(requirements(data, argv[2:])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
