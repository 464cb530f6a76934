"""Shared helpers and fixtures for the tsdia-submit tests (import them into a test module to use them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import quiet_env

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "configs" / "example.yml"
DEV_CLUSTER = REPO / "slurm" / "dev-cluster.sh"
GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE_GOLDEN = "TSDIA_UPDATE_GOLDEN"

# The example, trained in seconds: 128 examples, batch 32 -> 4 steps in one epoch, no wandb, no progress bar.
TINY = [
    "dataset.num_train=128",
    "dataset.num_val=64",
    "training.epochs=1",
    "training.logging.wandb=false",
    "training.logging.progress_bar=false",
    "model.num_layers=1",
]


def submit_env(tmp_path: Path) -> dict[str, str]:
    """The environment of tsdia-submit (and, through sbatch's --export=ALL, of the job): a test child's."""
    return quiet_env(tmp_path)


def run_submit(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """`tsdia-submit ARGS...` in a subprocess (the real entry point, as a user runs it)."""
    return subprocess.run(
        [sys.executable, "-m", "tsdia.launch.submit", *args],
        cwd=cwd,
        env=env if env is not None else submit_env(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def normalize(text: str, tmp_path: Path) -> str:
    """Replace the paths that differ between machines and runs with stable placeholders."""
    return (
        text.replace(str(tmp_path), "{TMP}")
        .replace(shell_quoted(sys.executable), "{PYTHON}")
        .replace(sys.executable, "{PYTHON}")
        .replace(str(REPO), "{REPO}")
    )


def shell_quoted(text: str) -> str:
    import shlex

    return shlex.quote(text)


def assert_golden(name: str, actual: str) -> None:
    """Compare with tests/golden/NAME; TSDIA_UPDATE_GOLDEN=1 rewrites the file instead."""
    path = GOLDEN / name
    if os.environ.get(UPDATE_GOLDEN):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
        return
    expected = path.read_text() if path.exists() else None
    if actual != expected:
        import difflib

        diff = "".join(
            difflib.unified_diff(
                (expected or "").splitlines(keepends=True),
                actual.splitlines(keepends=True),
                f"tests/golden/{name} (expected)",
                "rendered now",
            )
        )
        pytest.fail(
            f"rendered sbatch text differs from tests/golden/{name}"
            + (" (missing)" if expected is None else "")
            + f":\n{diff}\nIf the change is intended, accept it with:\n"
            f"    {UPDATE_GOLDEN}=1 .venv/bin/pytest tests/test_submit_render.py\n"
            "and review the golden files' diff before committing.",
            pytrace=False,
        )


def assert_layout(save_dir: Path, world_size: int) -> None:
    """The full experiment layout of a finished run (the spec's directory structure)."""
    assert (save_dir / "config.yml").is_file()
    assert list((save_dir / "logs").glob("training_*.log")), "no logs/training_*.log"
    checkpoints = sorted(save_dir.glob("checkpoint-epoch*-step*"))
    assert checkpoints, "no checkpoint-epoch*-step* directory"
    best = save_dir / "best_checkpoint"
    assert best.is_symlink() and best.resolve().parent == save_dir.resolve()
    assert (best / "manifest.json").is_file()
    hyper = json.loads((save_dir / "hyperparameters.json").read_text())
    assert _world_size(hyper) == world_size, hyper
    assert (save_dir / "model_summary.txt").read_text().strip()


def _world_size(data: object) -> int | None:
    if isinstance(data, dict):
        if "world_size" in data:
            return int(data["world_size"])
        for value in data.values():
            found = _world_size(value)
            if found is not None:
                return found
    return None


def slurm(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """The local Slurm cluster of slurm/dev-cluster.sh (idempotent start; left running for other tests)."""
    if os.geteuid() != 0:
        pytest.skip("no root: no local Slurm cluster (slurm/dev-cluster.sh needs root)")
    done = subprocess.run(
        [str(DEV_CLUSTER), "start"], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:
        pytest.fail(f"slurm/dev-cluster.sh start failed ({done.returncode}):\n{done.stderr[-3000:]}")
