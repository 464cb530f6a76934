"""Collect every `ratio ...` line of the benchmarks' outputs into one table: benchmark, ratio, goal, met?

    python benchmarks/table.py OUTPUT.txt [...]      (run.sh calls it; one file per benchmark)

Two line shapes are understood: `ratio <label> (goal <op> <x>x): <value>x` and
`ratio <label>: <value> (goal <op> <x>)`. A goal of `info` has no verdict. A file without any ratio line
(the benchmark failed) shows as FAILED.
"""

from __future__ import annotations

import operator
import re
import sys
from pathlib import Path

LINE = re.compile(
    r"^ratio\s*(?P<label>.*?)\s*(?:\(goal (?P<goal1>[^)]*)\))?\s*:\s*(?P<value>[0-9.]+|nan|inf)x?"
    r"\s*(?:\(goal (?P<goal2>[^)]*)\))?\s*$"
)
GOAL = re.compile(r"^(?P<op><=|>=|<|>|==)\s*(?P<x>[0-9.]+)x?$")
OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq}


def rows(path: Path) -> list[tuple[str, str, str, str]]:
    name = path.stem
    found = []
    for line in path.read_text(errors="replace").splitlines():
        m = LINE.match(line.strip())
        if not m:
            continue
        label = m["label"].strip()
        goal = (m["goal1"] or m["goal2"] or "info").strip()
        value = float(m["value"])
        g = GOAL.match(goal)
        met = ("yes" if OPS[g["op"]](value, float(g["x"])) else "NO") if g else "-"
        found.append((f"{name}: {label}" if label else name, f"{value:.3f}x", goal, met))
    return found or [(name, "FAILED", "-", "-")]


def main() -> None:
    table = [("benchmark", "ratio", "goal", "met?")]
    for arg in sys.argv[1:]:
        table.extend(rows(Path(arg)))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
