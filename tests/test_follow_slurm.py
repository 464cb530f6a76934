"""`tsdia status` and `tsdia logs -f` against jobs on the real local Slurm cluster."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest_slurm import (
    slurm,
    slurm_cluster,  # noqa: F401 - the session fixture
)
from test_slurm_preemption import env, preempt_after_save, submit, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]


def counting_shims(tmp_path: Path) -> tuple[Path, Path]:
    """squeue and sacct wrappers that log each call, then run the real command."""
    shims, calls = tmp_path / "shims", tmp_path / "slurm-calls.log"
    shims.mkdir()
    for name in ("squeue", "sacct"):
        real = shutil.which(name)
        assert real, name
        script = shims / name
        script.write_text(f'#!/bin/sh\necho {name} >> "{calls}"\nexec "{real}" "$@"\n')
        script.chmod(0o755)
    return shims, calls


def test_status_and_logs_follow_jobs_through_their_states(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    shims, calls = counting_shims(tmp_path)
    status_env = env(tmp_path)
    status_env["PATH"] = f"{shims}{os.pathsep}{status_env['PATH']}"

    def status() -> dict[str, dict[str, object]]:
        calls.unlink(missing_ok=True)
        done = subprocess.run(
            [sys.executable, "-m", "tsdia.follow.cli", "status", "runs", "--json"],
            cwd=tmp_path,
            env=status_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        made = calls.read_text().split() if calls.exists() else []
        assert made.count("squeue") == 1 and made.count("sacct") <= 1, made  # once per call, for all jobs
        return {Path(str(r["experiment"])).name: r for r in json.loads(done.stdout)}

    slow = runs / "slow"
    slow_job = submit(tmp_path, slow)
    crash_job = submit(tmp_path, runs / "crash", "model.crash_at_call=2", "training.logging.wandb=false")
    follower = subprocess.Popen(
        [sys.executable, "-m", "tsdia.follow.cli", "logs", str(slow), "-f"],
        cwd=tmp_path,
        env=env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(lambda: (slow / "logs" / "progress.json").exists(), 180, "the slow job to log progress")
    # A job that needs the whole cluster waits behind the slow one.
    big_job = submit(tmp_path, runs / "big", "slurm.nodes=2", "slurm.cpus_per_task=2")
    wait_until(lambda: status().get("big", {}).get("state") == "QUEUED", 30, "the big job to be QUEUED")
    rows = status()
    assert rows["slow"]["state"] == "RUNNING" and rows["slow"]["job_id"] == slow_job
    assert rows["slow"]["step"] and rows["slow"]["total_steps"] == 32
    slurm("scancel", big_job)

    seen: set[str] = set()
    preempt_after_save(slow_job, slow, 0, 0)

    def requeued_then_running() -> bool:
        seen.add(str(status()["slow"]["state"]))
        return "REQUEUED" in seen and list((slow / "logs").glob("training_resume_1_*.log")) != []

    wait_until(requeued_then_running, 150, "the slow job to show REQUEUED, then resume")
    wait_until(lambda: status()["slow"]["state"] == "COMPLETED", 240, "the slow job to complete")
    out, err = follower.communicate(timeout=90)  # `logs -f` ends by itself once the job has ended
    assert follower.returncode == 0, err
    headers = re.findall(r"==> (training_\S+) <==", out)
    assert len(headers) == 2 and headers[1].startswith("training_resume_1_"), headers
    assert "Saved checkpoint-epoch1-step32" in out

    rows = status()
    assert rows["slow"]["progress"] == 1.0 and rows["slow"]["attempts"] == 2
    assert rows["crash"]["state"] == "FAILED" and rows["crash"]["job_id"] == crash_job
    assert rows["big"]["state"] == "CANCELLED"
