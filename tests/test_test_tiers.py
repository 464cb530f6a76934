"""The test commands themselves: `make test` without root, the one-line skip summary, `make test-fast`'s selection."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def test_cluster_target_does_not_stop_make_test_without_root(tmp_path: Path) -> None:
    if shutil.which("make") is None or not (REPO / "Makefile").is_file():
        pytest.skip("no make, or no Makefile (the images hold none)")
    # `id -u` answers 1000, as for a user without root; dev-cluster.sh must not run at all.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "id").write_text('#!/bin/sh\n[ "$1" = -u ] && echo 1000 && exit 0\nexec /usr/bin/id "$@"\n')
    (fake / "bash").write_text('#!/bin/sh\necho BASH-RAN "$@"; exit 1\n')
    for script in fake.iterdir():
        script.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["make", "-s", "-C", str(REPO), "cluster"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "BASH-RAN" not in done.stdout
    assert done.stdout.strip().splitlines() == [
        "make cluster: not root, so no local Slurm cluster (slurm/dev-cluster.sh needs root) and no podman: "
        "their tests will be skipped"
    ]


def test_skipped_tests_are_summed_up_in_one_line(tmp_path: Path) -> None:
    shutil.copy2(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n\n"
        "@pytest.fixture\n"
        "def cluster():\n    pytest.skip('no root: no local Slurm cluster')\n\n"
        "@pytest.mark.parametrize('i', range(3))\n"
        "def test_slurm(cluster, i):\n    pass\n\n"
        "def test_image():\n    pytest.skip('no root: no podman')\n\n"
        "def test_runs():\n    pass\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfExX", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if "skip" in line.lower()]
    assert lines[0] == "skipped 4 tests: 3 no root: no local Slurm cluster; 1 no root: no podman", done.stdout
    assert "1 passed, 4 skipped" in lines[1]


def test_fast_tier_has_no_slurm_container_multiprocess_or_wheel_test() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not slow", "-p", "no:cacheprovider"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    assert len(collected) > 100
    heavy = (
        "test_slurm_cluster",
        "test_slurm_preemption",
        "test_slurm_containers",
        "test_docker",
        "test_distributed",
        "test_training",
        "test_crash_consistency",
    )
    assert not [t for t in collected if t.split("::")[0] in {f"tests/{h}.py" for h in heavy}]
    assert (
        "tests/test_packaging.py::test_wheel_installed_elsewhere_trains_and_renders_every_script"
        not in collected
    )
    assert "tests/test_packaging.py::test_readable_templates_are_copies_of_the_packaged_ones" in collected
