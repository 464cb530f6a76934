"""Every way Slurm stops a job ends in the same graceful path, on the real local cluster.

SIGTERM reaches every process of the job (WandB's service included), so these runs log to WandB and
TensorBoard every step: a tracker that dies with the job must not turn a stop into a crash. Each job serves
several stops in a row to keep the cost down (~6 minutes for the file on 2 cores).
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from conftest import Scenarios, quiet_env, run_train, selected_tests, with_plugins
from conftest_slurm import slurm, slurm_cluster  # noqa: F401 - the session fixture
from test_slurm_preemption import SLOW, job_state, submit, wait_finished, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

TRACKED = ["training.logging.tensorboard=true", "training.logging.wandb=true"]
FINAL = "checkpoint-epoch1-step32"


def attempts(save_dir: Path) -> list[dict]:  # type: ignore[type-arg]
    path = save_dir / "checkpoints" / "attempts.json"
    return json.loads(path.read_text()) if path.exists() else []


def attempt_log(save_dir: Path, attempt: int) -> str:
    pattern = "training_[0-9]*.log" if attempt == 0 else f"training_resume_{attempt}_*.log"
    logs = list((save_dir / "logs").glob(pattern))
    return logs[0].read_text() if logs else ""


def wait_for_save(save_dir: Path, attempt: int) -> None:
    """Until attempt N has written a checkpoint of its own (so the next stop has steps to lose)."""
    wait_until(
        lambda: "Saved checkpoint-" in attempt_log(save_dir, attempt), 180, f"attempt {attempt} to save"
    )


def running_node(job_id: str) -> str:
    wait_until(lambda: job_state(job_id)[0] == "RUNNING", 120, f"job {job_id} to run")
    return re.search(r"\bNodeList=(\S+)", slurm("scontrol", "show", "job", job_id)).group(1)  # type: ignore[union-attr]


def preempt(node: str) -> None:
    """A job in `urgent` that needs all of `node`'s CPUs: Slurm preempts what runs there (PreemptMode=REQUEUE)."""
    cpus = re.search(r"CPUTot=(\d+)", slurm("scontrol", "show", "node", node)).group(1)  # type: ignore[union-attr]
    slurm("sbatch", "-p", "urgent", "-w", node, "-c", cpus, "-o", "/dev/null", "--wrap", "sleep 1")


def assert_graceful(save_dir: Path, attempt: int, end: str, reason: str) -> None:
    records = attempts(save_dir)
    assert len(records) > attempt, records
    record = records[attempt]
    assert (record["end"], record["reason"]) == (end, reason), record
    assert record["nodes"], record
    log = attempt_log(save_dir, attempt)
    assert "Traceback" not in log, log[-3000:]
    assert f"Saved checkpoint-epoch{0 if record['stop_step'] <= 16 else 1}-step{record['stop_step']}" in log


def reference(tmp_path: Path) -> dict:  # type: ignore[type-arg]
    full = tmp_path / "reference"
    local = with_plugins(quiet_env(tmp_path))
    done = run_train(
        tmp_path, *SLOW, "model.step_seconds=0", f"training.checkpoint.save_dir={full}", env=local
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return load_file(str(full / FINAL / "model.safetensors"))


def assert_same(a: dict, b: dict) -> None:  # type: ignore[type-arg]
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), "the stops changed the final weights"


def test_preemption_grace_preemption_node_failure_and_scancel_each_save(tmp_path: Path) -> None:
    """One job: preempted in `debug` by `urgent` (SIGTERM to all, Slurm requeues), moved to `graced` and
    preempted there (SIGTERM, then the kill after GraceTime), its node set DOWN (Slurm requeues), then
    `scancel` (saved, not requeued); a resubmit with resume=latest completes it bitwise equal."""
    expected = reference(tmp_path)
    save_dir = tmp_path / "stopped"
    job_id = submit(tmp_path, save_dir, *TRACKED, "slurm.partition=debug")
    wait_for_save(save_dir, 0)
    preempt(running_node(job_id))
    wait_until(lambda: len(attempts(save_dir)) == 1, 60, "the preempted attempt's record")
    assert_graceful(save_dir, 0, "preempted", "preempted (SIGTERM; requeued by Slurm)")
    assert "COMPLETING" in attempts(save_dir)[0]["slurm_state"]
    # Requeued and pending (~10 s before it may start again): move it to `graced` (GraceTime=5).
    ensure_grace_partition()
    slurm("scontrol", "update", f"jobid={job_id}", "partition=graced")

    wait_for_save(save_dir, 1)
    preempt(running_node(job_id))  # GraceTime: SIGTERM while the job still RUNS; it requeues itself
    wait_until(lambda: len(attempts(save_dir)) == 2, 60, "the grace-preempted attempt's record")
    assert_graceful(save_dir, 1, "preempted", "preemption (SIGTERM)")
    assert "RUNNING" in attempts(save_dir)[1]["slurm_state"]

    wait_for_save(save_dir, 2)
    node = running_node(job_id)
    try:
        slurm("scontrol", "update", f"nodename={node}", "state=down", "reason=tsdia-test")
        wait_until(lambda: len(attempts(save_dir)) == 3, 60, "the node-failure attempt's record")
        assert_graceful(save_dir, 2, "node_failure", "node failure (SIGTERM; requeued by Slurm)")
        wait_until(
            lambda: nursed(job_id, node) and "Saved checkpoint-" in attempt_log(save_dir, 3), 240, "attempt 3"
        )
    finally:
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True)
    slurm("scancel", job_id)
    state, _, restarts = wait_finished(job_id, 60)
    assert (state, restarts) == ("CANCELLED", 3), (state, restarts)
    wait_until(lambda: len(attempts(save_dir)) == 4, 30, "the cancelled attempt's record")
    assert_graceful(save_dir, 3, "cancelled", "cancelled (SIGTERM)")
    assert "not requeueing" in attempt_log(save_dir, 3)
    stops = [a["stop_step"] for a in attempts(save_dir)]
    assert stops == sorted(set(stops)), stops  # every attempt got further than the one before

    resumed = submit(tmp_path, save_dir, *TRACKED, "training.checkpoint.resume=latest")
    state, code, _ = wait_finished(resumed, 240)
    assert state == "COMPLETED", (state, code)
    ends = [a["end"] for a in attempts(save_dir)]
    assert ends == ["preempted", "preempted", "node_failure", "cancelled", "completed"]
    assert_same(expected, load_file(str(save_dir / FINAL / "model.safetensors")))
    run_id = json.loads((save_dir / "wandb_info.json").read_text())["run_id"]
    assert all(r.name.endswith(run_id) for r in (save_dir / "wandb").glob("offline-run-*"))


def nursed(job_id: str, node: str) -> bool:
    """The node comes back by itself (ReturnToService=2), but a relaunch on it while slurmd still holds the
    old job can drain it ("Duplicate jobid") and hold the job: undo that, as an operator would. Always True."""
    if "DRAIN" in slurm("scontrol", "show", "node", node):
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True)
    if "held" in slurm("scontrol", "show", "job", job_id):
        subprocess.run(["scontrol", "release", job_id], capture_output=True)
    return True


def ensure_grace_partition() -> None:
    """The `graced` partition of slurm/dev-cluster.sh (made at run time on a cluster started by an older one)."""
    done = subprocess.run(["scontrol", "show", "partition", "graced"], capture_output=True, text=True)
    if done.returncode != 0:
        slurm("scontrol", "create", "PartitionName=graced", "Nodes=ALL", "GraceTime=5", "PriorityTier=1")


# The last two scenarios run at once (see `Scenarios`), after the one above, which stops whole nodes and so runs
# alone: the filler job holds n2, the crashing job and the time-limited one share n1 (1 CPU each); the time-limited
# job is submitted only once the filler runs, so that it cannot take a CPU of n2 from it.


def short_lead_time_limit(
    tmp_path: Path, filler_running: threading.Event
) -> tuple[dict[str, Any], Path, tuple[str, str, int]]:
    """The uninterrupted reference, and the run with a 1-minute limit and a 1-second lead on Slurm."""
    save_dir = tmp_path / "timed"
    filler_running.wait(120)
    job_id = submit(
        tmp_path, save_dir, *TRACKED, "slurm.time=0:01:00", "slurm.signal_lead_s=1", "model.step_seconds=1.5"
    )
    expected = reference(tmp_path)  # trained here while the job runs
    return expected, save_dir, wait_finished(job_id, 400)


def crash_on_every_attempt(
    tmp_path: Path, filler_running: threading.Event
) -> tuple[Path, str, tuple[str, str, int]]:
    """Crashes on every attempt with requeue_on_crash, n2 held by a filler job until two attempts crashed."""
    try:
        filler = slurm(
            "sbatch",
            "--parsable",
            "-p",
            "debug",
            "-w",
            "n2",
            "-c",
            "2",
            "-o",
            "/dev/null",
            "--wrap",
            "sleep 600",
        )
        filler = filler.strip().split(";")[0]
        save_dir = tmp_path / "crashing"
        try:
            wait_until(lambda: job_state(filler)[0] == "RUNNING", 60, "the filler job on n2")
            filler_running.set()
            job_id = submit(
                tmp_path,
                save_dir,
                "model.crash_at_call=2",
                "training.logging.wandb=false",
                "slurm.requeue_on_crash=true",
                "slurm.max_requeues=2",
            )
            wait_until(lambda: len(attempts(save_dir)) >= 2, 180, "two crashed attempts")
            slurm("scancel", filler)
            return save_dir, job_id, wait_finished(job_id, 180)
        finally:
            subprocess.run(["scancel", filler], capture_output=True)
    finally:
        filler_running.set()  # never leave the other scenario waiting


@pytest.fixture(scope="module")
def scenarios(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    slurm_cluster: None,  # noqa: F811 - the session fixture
) -> Iterator[Scenarios]:
    selected = selected_tests(request)
    drivers = {
        "test_the_time_limit_with_a_too_short_lead_requeues_and_completes": short_lead_time_limit,
        "test_a_node_in_two_failed_attempts_in_a_row_is_excluded_from_the_requeue": crash_on_every_attempt,
    }
    filler_running = threading.Event()
    if "test_a_node_in_two_failed_attempts_in_a_row_is_excluded_from_the_requeue" not in selected:
        filler_running.set()  # no filler job to wait for
    running = Scenarios.for_selected(request, tmp_path_factory, drivers, filler_running)
    yield running
    running.close()


def test_the_time_limit_with_a_too_short_lead_requeues_and_completes(scenarios: Scenarios) -> None:
    """A 1-minute limit and a 1-second `signal_lead_s` (Slurm sends the lead signal up to ~60 s early, or
    not before the limit's SIGTERM): each attempt is recorded as `time_limit`, requeued by tsdia (Slurm never
    requeues a timeout), and the job completes bitwise equal to an uninterrupted run."""
    expected, save_dir, (state, code, restarts) = scenarios.result(
        "test_the_time_limit_with_a_too_short_lead_requeues_and_completes"
    )
    assert state == "COMPLETED" and restarts >= 1, (state, code, restarts)
    records = attempts(save_dir)
    assert [a["end"] for a in records] == ["time_limit"] * restarts + ["completed"], records
    for i, record in enumerate(records[:-1]):
        log = attempt_log(save_dir, i)
        assert "Traceback" not in log and "; requeueing" in log, log[-2000:]
        if record["reason"].startswith("time limit reached"):  # the limit's own SIGTERM: requeued first
            assert "before saving" in log
    assert_same(expected, load_file(str(save_dir / FINAL / "model.safetensors")))


def test_a_node_in_two_failed_attempts_in_a_row_is_excluded_from_the_requeue(scenarios: Scenarios) -> None:
    """Crashes on every attempt (requeue_on_crash): the first two land on the same node (the other is held
    by a filler job), so the second requeue excludes it and the third attempt runs on the other node."""
    save_dir, job_id, (state, code, restarts) = scenarios.result(
        "test_a_node_in_two_failed_attempts_in_a_row_is_excluded_from_the_requeue"
    )
    assert (state, restarts) == ("FAILED", 2), (state, code, restarts)
    records = attempts(save_dir)
    assert [(a["end"], a["nodes"]) for a in records] == [
        ("crash", ["n1"]),
        ("crash", ["n1"]),
        ("crash", ["n2"]),
    ]
    assert [a["excluded_nodes"] for a in records] == [[], ["n1"], []]
    assert "Excluding node(s) n1 from the requeued job" in attempt_log(save_dir, 1)
    assert "ExcNodeList=n1" in slurm("scontrol", "show", "job", job_id)
