"""Shared test helpers: run tsdia's real CLI in subprocesses with small, fast settings."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "configs" / "example.yml"

# A tiny version of the example: 128 examples, batch 16 -> 8 optimizer steps per epoch.
SMALL = [
    "dataset.num_train=128",
    "dataset.num_val=32",
    "training.batch_size=16",
    "training.epochs=2",
    "training.checkpoint.interval=3",
    "training.logging.interval=2",
    "model.num_layers=1",
]


def quiet_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a child run: wandb offline, caches inside the test's tmp dir."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WANDB_", "RANK", "WORLD_SIZE", "SLURM_", "TSDIA_CLAIM_TOKEN"))
    }
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_CACHE_DIR=str(tmp_path / ".wandb-cache"),
        WANDB_CONFIG_DIR=str(tmp_path / ".wandb-config"),
        WANDB_DATA_DIR=str(tmp_path / ".wandb-data"),
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    return env


def with_plugins(env: dict[str, str]) -> dict[str, str]:
    """`env` with tests/plugins importable (kept in front of any PYTHONPATH already there)."""
    paths = [str(REPO / "tests" / "plugins"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def run_train(
    tmp_path: Path,
    *args: str,
    config: Path = EXAMPLE,
    timeout: float = 240,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`python -m tsdia.train CONFIG ARGS...`, capturing output."""
    return subprocess.run(
        [sys.executable, "-m", "tsdia.train", str(config), *args],
        cwd=REPO,
        env=env or quiet_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every entry under `path` with its size and mtime (to prove nothing changed)."""
    out = {}
    for p in sorted(path.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(path))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def small_args(tmp_path: Path) -> list[str]:
    return [*SMALL, f"training.checkpoint.save_dir={tmp_path / 'exp'}"]


class Scenarios:
    """A module's independent scenarios, all running at once in threads: what they wait for (Slurm's requeue
    delays and time limits, child processes on the other core) overlaps instead of adding up. A test calls
    `result(name)` for the outcome of its own scenario (what its driver returned) and asserts on it; a
    driver's failure re-raises there."""

    def __init__(self, drivers: dict[str, Callable[[], Any]]) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(drivers)), thread_name_prefix="scenario")
        # Dicts keep their order: the longest scenarios first, so their jobs get CPUs first.
        self._futures = {name: self._pool.submit(driver) for name, driver in drivers.items()}

    @classmethod
    def for_selected(
        cls,
        request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory,
        drivers: dict[str, Callable[..., Any]],
        *args: Any,
    ) -> Scenarios:
        """Start the drivers of the tests this session runs, each in its own temporary directory (then `args`)."""
        selected = selected_tests(request)
        return cls(
            {
                name: functools.partial(driver, tmp_path_factory.mktemp(driver.__name__), *args)
                for name, driver in drivers.items()
                if name in selected
            }
        )

    def result(self, name: str, timeout: float = 900) -> Any:
        return self._futures[name].result(timeout=timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def selected_tests(request: pytest.FixtureRequest) -> set[str]:
    """Names (with parameters, e.g. `test_x[sync]`) of the requesting module's tests that this session runs
    (after -k, node ids, deselection), so a module-scoped fixture starts only the scenarios something asserts on."""
    return {
        item.name
        for item in request.session.items
        if isinstance(item, pytest.Function) and item.module is request.module
    }


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line naming how many tests were skipped and why (e.g. without root: no Slurm cluster, no podman)."""
    reasons: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if reasons:
        total = sum(reasons.values())
        parts = "; ".join(f"{count} {reason}" for reason, count in reasons.most_common())
        terminalreporter.write_line(f"skipped {total} test{'s' if total != 1 else ''}: {parts}", yellow=True)
