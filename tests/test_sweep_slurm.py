"""Sweeps on the real local Slurm cluster: one job array, per-member preemption, resubmission, races."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import Scenarios, quiet_env, run_train, tree, with_plugins
from conftest_slurm import (
    EXAMPLE,
    run_submit,
    slurm,
    slurm_cluster,  # noqa: F401 - the session fixture
)
from test_slurm_preemption import env, saved_steps, wait_until
from tsdia.follow import status
from tsdia.slurm_commands import FINAL_STATES, job_state

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

# 128 examples, batch 16 -> 8 steps per epoch, 2 epochs; a checkpoint every 3 steps.
SMALL_SLOW = [
    "model.target=crashy:SlowModel",
    "model.num_layers=1",
    "dataset.num_train=128",
    "dataset.num_val=32",
    "training.batch_size=16",
    "training.epochs=2",
    "training.checkpoint.interval=3",
    "training.logging.interval=1",
    "training.logging.progress_bar=false",
    "training.logging.wandb=false",
]
FINAL = "checkpoint-epoch1-step16/model.safetensors"


def sweep_submit(tmp_path: Path, save_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_submit(
        str(EXAMPLE),
        f"training.checkpoint.save_dir={save_dir}",
        *SMALL_SLOW,
        *args,
        cwd=tmp_path,
        env=env(tmp_path),
    )


def member_jobs(sweep_dir: Path) -> dict[str, str]:
    record = json.loads((sweep_dir / "sweep.json").read_text())
    return {m["name"]: m["job_id"] for m in record["members"]}


def finished(job_id: str) -> bool:
    # An array task cancelled while pending leaves no trace in Slurm 22.05 (neither scontrol nor sacct).
    return job_state(job_id)[0] in (*FINAL_STATES, "UNKNOWN")


def signal_once(job_id: str) -> None:
    """`scancel --signal=USR2` delivers at once but, for an array task that is being requeued, retries for
    a while ("Job can not be altered now") and can hit the rerun while it starts: ask once only."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(["scancel", "--signal=USR2", job_id], timeout=3, capture_output=True, check=False)


# The first two scenarios run at once (see `Scenarios`): 2 + 1 CPUs of the cluster's 4, and their waits overlap.
# The third compares squeue before and after, so it runs once they are done (its test comes after theirs).


def preempted_member(tmp_path: Path) -> tuple[Path, dict[str, str], str]:
    """A 2x2 sweep, 2 members at a time; one member preempted after its first save. Meanwhile each member's
    config trains alone here (the references). Returns the sweep dir, its member jobs, the preempted one."""
    sweep_dir = tmp_path / "lr-sweep"
    done = sweep_submit(
        tmp_path,
        sweep_dir,
        "model.step_seconds=0.3",
        "--sweep",
        "training.optimizer.lr=1e-3,3e-4",
        "--sweep",
        "training.seed=1,2",
        "--parallel",
        "2",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = member_jobs(sweep_dir)
    array = {job.split("_")[0] for job in jobs.values()}
    assert len(array) == 1 and sorted(j.split("_")[1] for j in jobs.values()) == ["0", "1", "2", "3"]
    target = "lr=1e-3,seed=1"
    wait_until(lambda: saved_steps(sweep_dir / target, 0), 240, "the first member to save")
    signal_once(jobs[target])

    # References while the sweep runs: each member's config submitted alone gives the same weights.
    local = with_plugins(quiet_env(tmp_path))
    for name in jobs:
        lr, seed = re.findall(r"=([^,]+)", name)
        ref = run_train(
            tmp_path,
            *SMALL_SLOW,
            "model.step_seconds=0",
            f"training.optimizer.lr={lr}",
            f"training.seed={seed}",
            f"training.checkpoint.save_dir={tmp_path / 'alone' / name}",
            env=local,
        )
        assert ref.returncode == 0, ref.stderr[-2000:]
    wait_until(lambda: all(finished(job) for job in jobs.values()), 420, "every member to finish")
    return sweep_dir, jobs, target


SEEDS = ["model.step_seconds=0", "--sweep", "training.seed=1,2,3,4", "--parallel", "1"]


def cancelled_members(tmp_path: Path) -> tuple[Path, subprocess.CompletedProcess[str], dict[str, object]]:
    """A 4-member sweep, 1 at a time; the last two cancelled while pending; a resume refused while the array
    runs, then accepted once it ended (`--wait`). Returns the sweep dir, that resubmission, and the trees of
    the members that completed before it (as they were then)."""
    sweep_dir = tmp_path / "seeds"
    done = sweep_submit(tmp_path, sweep_dir, *SEEDS)
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = member_jobs(sweep_dir)
    slurm("scancel", jobs["seed=3"], jobs["seed=4"])  # still pending behind --parallel 1
    refused = sweep_submit(tmp_path, sweep_dir, "training.checkpoint.resume=latest", *SEEDS)
    assert refused.returncode == 2 and "still queued or running" in refused.stderr
    wait_until(lambda: all(finished(job) for job in jobs.values()), 300, "the array to end")
    kept = {name: tree(sweep_dir / name) for name in ("seed=1", "seed=2")}
    again = sweep_submit(tmp_path, sweep_dir, "training.checkpoint.resume=latest", *SEEDS, "--wait")
    return sweep_dir, again, kept


@pytest.fixture(scope="module")
def scenarios(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    slurm_cluster: None,  # noqa: F811 - the session fixture
) -> Iterator[Scenarios]:
    drivers = {
        "test_sweep_array_completes_and_a_preempted_member_resumes_alone": preempted_member,
        "test_cancelled_members_are_all_a_resubmission_runs": cancelled_members,
    }
    running = Scenarios.for_selected(request, tmp_path_factory, drivers)
    yield running
    running.close()


def test_sweep_array_completes_and_a_preempted_member_resumes_alone(scenarios: Scenarios) -> None:
    sweep_dir, jobs, target = scenarios.result(
        "test_sweep_array_completes_and_a_preempted_member_resumes_alone"
    )
    tmp_path = sweep_dir.parent
    for name, job in jobs.items():
        assert job_state(job)[0] == "COMPLETED", name
        a = load_file(str(tmp_path / "alone" / name / FINAL))
        b = load_file(str(sweep_dir / name / FINAL))
        assert all(a[k].equal(b[k]) for k in a), f"{name}: the sweep changed the weights"
        resumed = list((sweep_dir / name / "logs").glob("training_resume_*.log"))
        assert len(resumed) == (1 if name == target else 0), (name, resumed)
    rows = status.collect([str(tmp_path)])  # tsdia status: the members, grouped under their sweep
    assert {Path(r.experiment).name: (r.state, r.sweep) for r in rows if r.sweep} == {
        name: ("COMPLETED", str(sweep_dir)) for name in jobs
    }
    config = (sweep_dir / "lr=3e-4,seed=2" / "config.yml").read_text()
    assert "lr=3e-4,seed=2" in config and "wandb_group=lr-sweep" in config  # the effective overrides


def test_cancelled_members_are_all_a_resubmission_runs(scenarios: Scenarios) -> None:
    sweep_dir, again, kept = scenarios.result("test_cancelled_members_are_all_a_resubmission_runs")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 member(s)" in again.stdout
    assert re.search(r"seed=3: COMPLETED", again.stdout) and re.search(r"seed=4: COMPLETED", again.stdout)
    assert {name: tree(sweep_dir / name) for name in kept} == kept  # completed members untouched
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert len(record["array_job_ids"]) == 2
    for name in ("seed=3", "seed=4"):
        assert (sweep_dir / name / "checkpoint-epoch1-step16").is_dir()


def test_collisions_and_races_create_and_queue_nothing_but_the_winner(tmp_path: Path) -> None:
    queued_before = slurm("squeue", "-h", "-r", "-o", "%i")
    taken = tmp_path / "taken"
    (taken / "seed=2").mkdir(parents=True)
    before = tree(tmp_path / "taken")
    done = sweep_submit(tmp_path, taken, "--sweep", "training.seed=1,2")
    assert done.returncode == 2 and "already exists" in done.stderr
    assert tree(tmp_path / "taken") == before
    assert slurm("squeue", "-h", "-r", "-o", "%i") == queued_before  # nothing was queued

    racing = tmp_path / "race"
    cmd = [
        sys.executable,
        "-m",
        "tsdia.launch.submit",
        str(EXAMPLE),
        f"training.checkpoint.save_dir={racing}",
        *SMALL_SLOW,
        "--sweep",
        "training.seed=1,2",
    ]
    procs = [
        subprocess.Popen(
            cmd, cwd=tmp_path, env=env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    winners = [r for r in results if r[0] == 0]
    assert len(winners) == 1, results
    assert all(r[0] == 2 and "already exists" in r[2] for r in results if r[0] != 0)
    jobs = member_jobs(racing)
    slurm("scancel", *{job.split("_")[0] for job in jobs.values()})
