"""tsdia-submit on the real local Slurm cluster (slurm/dev-cluster.sh): jobs, claims, races, --wait, templates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest_slurm import (
    EXAMPLE,
    TINY,
    assert_layout,
    run_submit,
    slurm,
    slurm_cluster,  # noqa: F401 - the session fixture
    submit_env,
)
from tsdia.errors import CheckpointDirectoryExistsError
from tsdia.slurm_commands import wait_for_job

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]


def submit(
    tmp_path: Path, save_dir: Path, *args: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return run_submit(
        str(EXAMPLE), f"training.checkpoint.save_dir={save_dir}", *TINY, *args, cwd=tmp_path, timeout=timeout
    )


def job_id_of(done: subprocess.CompletedProcess[str]) -> str:
    for line in done.stdout.splitlines():
        if line.startswith("Submitted Slurm job "):
            return line.split()[3].rstrip(":")
    raise AssertionError(f"no job id in:\n{done.stdout}\n{done.stderr}")


def jobs_named(name: str, timeout: float = 30) -> list[str]:
    """Every job ever submitted with this name (sacct: finished ones too).

    Accounting can lag a job by a few seconds under load: poll until the name shows up (or time runs out).
    """
    deadline = time.monotonic() + timeout
    while True:
        out = slurm("sacct", "-X", "-n", "-P", "-S", "now-1hour", "-o", "JobID,JobName")
        jobs = [
            job for job, _, job_name in (line.partition("|") for line in out.splitlines()) if job_name == name
        ]
        if jobs or time.monotonic() > deadline:
            return jobs
        time.sleep(1)


def test_one_node_two_tasks_completes_and_dry_run_matches(tmp_path: Path) -> None:
    name = f"one-node-{uuid.uuid4().hex[:8]}"  # job names are unique, so sacct finds only this test's jobs
    save_dir = tmp_path / name
    dry = submit(tmp_path, save_dir, "slurm.tasks_per_node=2", "--dry-run")
    assert dry.returncode == 0 and not save_dir.exists(), dry.stderr
    done = submit(tmp_path, save_dir, "slurm.tasks_per_node=2", "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = job_id_of(done)
    assert f"Job {job_id} completed" in done.stdout
    assert_layout(save_dir, world_size=2)
    assert list((save_dir / "logs" / "ranks").glob("training_*.rank1.log"))
    # What --dry-run printed is exactly what was submitted.
    assert (save_dir / "slurm" / f"{job_id}_submission.sh").read_text() == dry.stdout
    owner = json.loads((save_dir / ".tsdia-owner.json").read_text())
    assert owner["job_id"] == job_id and owner["executor"] == "slurm"

    # A second submit to the same save_dir is refused at submit time: nothing is queued.
    again = submit(tmp_path, save_dir)
    assert again.returncode == 2
    assert str(CheckpointDirectoryExistsError(str(save_dir))) in again.stderr
    assert "Traceback" not in again.stderr and not again.stdout
    assert jobs_named(name) == [job_id]


def test_two_nodes_one_task_each(tmp_path: Path) -> None:
    save_dir = tmp_path / "two-nodes"
    done = submit(tmp_path, save_dir, "slurm.nodes=2", "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    assert_layout(save_dir, world_size=2)
    job_id = job_id_of(done)
    assert slurm("sacct", "-X", "-n", "-P", "-j", job_id, "-o", "NodeList").strip() == "n[1-2]"


def test_racing_submits_exactly_one_accepted_and_wait_reports_failure(tmp_path: Path) -> None:
    """Four tsdia-submit at once for one save_dir: one job queued. Its run fails (a bad model argument only
    the job can detect), and `--wait` exits with that outcome."""
    save_dir = tmp_path / "race"
    name = f"race-{uuid.uuid4().hex[:8]} $(touch PWNED) 'q'"
    args = [f'slurm.job_name="{name}"', "model.no_such_argument=1", "--wait"]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: submit(tmp_path, save_dir, *args), range(4)))
    codes = sorted(r.returncode for r in results)
    assert codes == [1, 2, 2, 2], [r.stdout + r.stderr for r in results]
    winner = next(r for r in results if r.returncode == 1)
    job_id = job_id_of(winner)
    assert "did not complete (FAILED" in winner.stderr and f"{save_dir}/slurm/{job_id}_" in winner.stderr
    assert "no_such_argument" in winner.stderr  # the tail of the job's error log
    for loser in (r for r in results if r.returncode == 2):
        assert "Checkpoint directory already exists!" in loser.stderr
    assert jobs_named(name) == [job_id]  # the hostile name reached Slurm verbatim, and only once
    assert not list(tmp_path.glob("PWNED")) and not list(save_dir.glob("PWNED"))


def test_sbatch_template_runs_a_multi_node_job(tmp_path: Path) -> None:
    """The plain-sbatch path: `--emit-sbatch requeue` for 2 nodes, submitted with sbatch, no submitit."""
    save_dir = tmp_path / "template"
    emitted = submit(tmp_path, save_dir, "slurm.nodes=2", "--emit-sbatch", "requeue")
    assert emitted.returncode == 0, emitted.stderr
    script = tmp_path / "job.sbatch"
    script.write_text(emitted.stdout)
    out = subprocess.run(
        ["sbatch", "--parsable", str(script)],
        cwd=tmp_path,
        env=submit_env(tmp_path),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    job_id = out.strip().split(";")[0]
    state, _ = wait_for_job(job_id, poll_s=1)
    log = (tmp_path / f"template-{job_id}.out").read_text()
    assert state == "COMPLETED", log
    assert_layout(save_dir, world_size=2)


def test_requeued_job_is_its_own_owner_and_wait_follows_it(tmp_path: Path) -> None:
    """`scontrol requeue` of the running job: the rerun (same id, same claim token) is let into the claimed
    directory and resumes into training_resume_1_*.log; `--wait` returns only after the rerun completes."""
    save_dir = tmp_path / "requeued"
    longer = ["dataset.num_train=1024", "training.epochs=2", "training.checkpoint.interval=4"]
    command = [
        sys.executable,
        "-m",
        "tsdia.launch.submit",
        str(EXAMPLE),
        f"training.checkpoint.save_dir={save_dir}",
        *TINY,
        *longer,
        "--wait",
    ]
    with subprocess.Popen(
        command,
        cwd=tmp_path,
        env=submit_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as waiting:
        deadline = time.monotonic() + 120
        while not list(save_dir.glob("checkpoint-epoch*-step*")):
            assert waiting.poll() is None and time.monotonic() < deadline, "the job never saved a checkpoint"
            time.sleep(0.2)
        job_id = json.loads((save_dir / ".tsdia-owner.json").read_text())["job_id"]
        slurm("scontrol", "requeue", job_id)
        out, err = waiting.communicate(timeout=180)
    assert waiting.returncode == 0, out + err
    states = [line.split(": ", 1)[1] for line in err.splitlines() if line.startswith(f"job {job_id}: ")]
    assert states.count("RUNNING") == 2 and states[-1] == "COMPLETED", states  # ran, requeued, ran again
    assert list((save_dir / "logs").glob("training_resume_1_*.log")), sorted(os.listdir(save_dir / "logs"))
    assert_layout(save_dir, world_size=1)
