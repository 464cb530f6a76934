"""Container jobs on the real local Slurm cluster: `slurm.container.runtime=podman` with the CPU test image.

Each task of the job runs `tsdia-train` inside the image (podman, started by srun); the experiment lands on the
host. Needs root, podman (or apt-get to install it) and slurm/dev-cluster.sh; the image comes from the session
fixture of conftest_docker (docker/build.sh cpu --tag tsdia:ci).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest_docker import Image, tsdia_image  # noqa: F401 - the session fixture
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
from tsdia.launch.container import DRY_RUN_TOKEN

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.container,
    pytest.mark.slow,
    pytest.mark.usefixtures("slurm_cluster"),
]


def container_args(image: Image) -> list[str]:
    return [f"slurm.container.image={image.ref}", "slurm.container.runtime=podman"]


def env_for(image: Image, tmp_path: Path) -> dict[str, str]:
    """tsdia-submit's environment plus podman's settings (CONTAINERS_CONF): sbatch passes it to the job."""
    return {**submit_env(tmp_path), "CONTAINERS_CONF": image.env["CONTAINERS_CONF"]}


def job_id_of(done: subprocess.CompletedProcess[str]) -> str:
    for line in done.stdout.splitlines():
        if line.startswith("Submitted Slurm job "):
            return line.split()[3].rstrip(":")
    raise AssertionError(f"no job id in:\n{done.stdout}\n{done.stderr}")


def test_podman_job_trains_two_ranks_in_the_image(tmp_path: Path, tsdia_image: Image) -> None:  # noqa: F811
    save_dir = tmp_path / "podman-exp"
    args = [str(EXAMPLE), f"training.checkpoint.save_dir={save_dir}", *TINY, "slurm.tasks_per_node=2"]
    args += container_args(tsdia_image)
    env = env_for(tsdia_image, tmp_path)
    dry = run_submit(*args, "--dry-run", cwd=tmp_path, env=env)
    assert dry.returncode == 0 and not save_dir.exists(), dry.stderr
    assert "podman run --rm --network=host" in dry.stdout and f"-v {save_dir}:{save_dir}" in dry.stdout

    done = run_submit(*args, "--wait", cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = job_id_of(done)
    assert f"Job {job_id} completed" in done.stdout
    assert_layout(save_dir, world_size=2)
    assert list((save_dir / "logs" / "ranks").glob("training_*.rank1.log"))
    assert "claimed at submit time by job" in (save_dir / "slurm" / f"{job_id}_0_log.out").read_text()
    # What --dry-run printed is what was submitted, but for the claim token made at submit time.
    owner = json.loads((save_dir / ".tsdia-owner.json").read_text())
    token = owner["claim_token"]
    submitted = (save_dir / "slurm" / f"{job_id}_submission.sh").read_text()
    assert submitted == dry.stdout.replace(DRY_RUN_TOKEN, token).replace(DRY_RUN_TOKEN[:8], token[:8])
    assert owner["job_id"] == job_id
    # Files written in the container belong to the job's user, at the host paths; nothing else was written.
    assert all(p.stat().st_uid == os.getuid() for p in [save_dir, *save_dir.rglob("*")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["podman-exp"]
    assert not subprocess.run(
        ["podman", "ps", "-aq", "--filter", f"ancestor={tsdia_image.ref}"],
        env=tsdia_image.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip(), "a container outlived its job"

    again = run_submit(*args, cwd=tmp_path, env=env)
    assert again.returncode == 2 and str(CheckpointDirectoryExistsError(str(save_dir))) in again.stderr


def test_preempted_container_job_requeues_and_resumes(tmp_path: Path, tsdia_image: Image) -> None:  # noqa: F811
    """USR2 to the batch shell (what Slurm sends before the time limit or on preemption): the trap forwards it
    into the container, the training saves and exits 3, the script requeues the job, and the rerun resumes
    from the checkpoint into training_resume_1_*.log; `--wait` follows it to the end."""
    save_dir = tmp_path / "preempted"
    longer = ["dataset.num_train=512", "training.checkpoint.interval=2"]
    args = [str(EXAMPLE), f"training.checkpoint.save_dir={save_dir}", *TINY, *longer]
    command = [sys.executable, "-m", "tsdia.launch.submit", *args, *container_args(tsdia_image), "--wait"]
    with subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env_for(tsdia_image, tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as waiting:
        deadline = time.monotonic() + 180
        while not list(save_dir.glob("checkpoint-epoch*-step*")):
            assert waiting.poll() is None and time.monotonic() < deadline, "the job never saved a checkpoint"
            time.sleep(0.2)
        job_id = json.loads((save_dir / ".tsdia-owner.json").read_text())["job_id"]
        slurm("scancel", "--signal=USR2", "--batch", job_id)
        out, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, out + err
    states = [line.split(": ", 1)[1] for line in err.splitlines() if line.startswith(f"job {job_id}: ")]
    assert states.count("RUNNING") == 2 and states[-1] == "COMPLETED", states
    log = (save_dir / "slurm" / f"{job_id}_0_log.out").read_text()
    assert "requeueing: requeue 1 of at most" in log and "resuming from the newest checkpoint" in log, log
    # TSDIA_SLURM_FROM_SCRIPT reached the container: no scontrol call of its own (each would stall there).
    assert "the job script requeues the job" in log, log
    assert list((save_dir / "logs").glob("training_resume_1_*.log")), sorted(os.listdir(save_dir / "logs"))
    assert_layout(save_dir, world_size=1)
