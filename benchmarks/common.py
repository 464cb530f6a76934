"""Helpers shared by the benchmarks: the example config, child environments, medians, the ratio line."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
EXAMPLE_CONFIG = REPO / "configs" / "example.yml"


def example_sections() -> dict[str, Any]:
    """configs/example.yml as a plain dict (the model, data and optimizer every variant shares)."""
    import yaml

    with open(EXAMPLE_CONFIG) as f:
        data: dict[str, Any] = yaml.safe_load(f)
    return data


def component_kwargs(section: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if k != "target"}


def child_env(tmp: str | Path, threads: int | None, **extra: str) -> dict[str, str]:
    """The environment every benchmark child gets: pinned threads, offline WandB inside `tmp`, plugins importable."""
    tmp = Path(tmp)
    env = dict(os.environ)
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        path = tmp / "wandb-home" / name.lower()
        path.mkdir(parents=True, exist_ok=True)
        env[name] = str(path)
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_DISABLE_GIT="true",
        PYTHONPATH=os.pathsep.join(p for p in (str(BENCH_DIR), env.get("PYTHONPATH", "")) if p),
        PYTHONUNBUFFERED="1",
    )
    for name in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)  # a benchmark launched inside a Slurm job must still run as one local process
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), BENCH_THREADS=str(threads))
    env.update(extra)
    return env


def run_logged(cmd: Sequence[str], env: dict[str, str], log: Path, cwd: str | Path | None = None) -> None:
    """Run `cmd` with its output in `log`; on failure show the log's tail and stop."""
    with open(log, "wb") as out:
        proc = subprocess.run(list(cmd), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        sys.exit(
            f"benchmark child failed (exit {proc.returncode}): {' '.join(cmd)}\n--- log tail ---\n{tail}"
        )


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def fmt_runs(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    return "[" + ", ".join(f"{v * scale:.{digits}f}" for v in values) + "]"


def ratio_line(label: str, goal: str, value: float) -> str:
    """The line run.sh parses: `ratio <label> (goal <op> <x>x): <value>x`."""
    return f"ratio {label} (goal {goal}): {value:.3f}x"
