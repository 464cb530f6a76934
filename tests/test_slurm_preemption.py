"""Preemption on the real local Slurm cluster: signal -> agreed stop -> save -> requeue -> exact resume."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import Scenarios, quiet_env, run_train, with_plugins
from conftest_slurm import (
    EXAMPLE,
    run_submit,
    slurm,
    slurm_cluster,  # noqa: F401 - the session fixture
    submit_env,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

# 256 examples, batch 16 -> 16 steps/epoch, 2 epochs; 0.25 s per step, a checkpoint every 3 steps.
SLOW = [
    "model.target=crashy:SlowModel",
    "model.num_layers=1",
    "dataset.num_train=256",
    "dataset.num_val=32",
    "training.batch_size=16",
    "training.epochs=2",
    "training.checkpoint.interval=3",
    "training.logging.interval=1",
    "training.logging.progress_bar=false",
    "training.logging.wandb=true",
    "model.step_seconds=0.25",
]
SAVED = re.compile(r"Saved checkpoint-epoch\d+-step(\d+)")


def env(tmp_path: Path) -> dict[str, str]:
    out = submit_env(tmp_path)
    with_plugins(out)
    return out


def submit(tmp_path: Path, save_dir: Path, *args: str) -> str:
    done = run_submit(
        str(EXAMPLE),
        f"training.checkpoint.save_dir={save_dir}",
        *SLOW,
        *args,
        cwd=tmp_path,
        env=env(tmp_path),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    match = re.search(r"Submitted Slurm job (\d+)", done.stdout)
    assert match, done.stdout
    return match.group(1)


def job_state(job_id: str) -> tuple[str, str, int]:
    """(state, exit code, restart count) from scontrol (finished jobs stay visible for an hour)."""
    out = slurm("scontrol", "show", "job", job_id)
    state = re.search(r"JobState=(\S+)", out)
    code = re.search(r"ExitCode=(\S+)", out)
    restarts = re.search(r"Restarts=(\d+)", out)
    return (
        state.group(1) if state else "?",
        code.group(1) if code else "?",
        int(restarts.group(1)) if restarts else 0,
    )


def wait_until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def saved_steps(save_dir: Path, attempt: int) -> list[int]:
    """Steps saved by attempt N (0 = the first), read from that attempt's training log."""
    pattern = "training_[0-9]*.log" if attempt == 0 else f"training_resume_{attempt}_*.log"
    logs = list((save_dir / "logs").glob(pattern))
    return [int(m) for m in SAVED.findall(logs[0].read_text())] if logs else []


def wait_finished(job_id: str, timeout: float) -> tuple[str, str, int]:
    wait_until(
        lambda: job_state(job_id)[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
        timeout,
        f"job {job_id}",
    )
    return job_state(job_id)


def preempt_after_save(job_id: str, save_dir: Path, attempt: int, after_step: int) -> None:
    """Once attempt N has saved a checkpoint past `after_step`, send the preemption signal (USR2)."""
    wait_until(
        lambda: any(s > after_step for s in saved_steps(save_dir, attempt)), 150, f"attempt {attempt} to save"
    )
    slurm("scancel", "--signal=USR2", job_id)


# Every scenario below runs in a thread of its own, all at once (see `Scenarios`): each driver submits its job,
# signals it as the scenario says and waits for the end; its test then asserts on what the driver returns.
# Their jobs need 1 CPU each (the local cluster has 4), and no scenario here stops a whole node.


def three_preemptions(tmp_path: Path) -> tuple[Path, Path, tuple[str, str, int]]:
    """An uninterrupted reference run, and the same run preempted three times on Slurm."""
    reference = tmp_path / "reference"
    local = quiet_env(tmp_path)
    with_plugins(local)
    done = run_train(
        tmp_path, *SLOW, "model.step_seconds=0", f"training.checkpoint.save_dir={reference}", env=local
    )
    assert done.returncode == 0, done.stderr[-2000:]

    save_dir = tmp_path / "preempted"
    job_id = submit(tmp_path, save_dir)
    last = 0
    for attempt in range(3):
        preempt_after_save(job_id, save_dir, attempt, last)
        wait_until(
            lambda a=attempt: list((save_dir / "logs").glob(f"training_resume_{a + 1}_*.log")),
            150,
            "the rerun",
        )
        last = max(saved_steps(save_dir, attempt))
    return reference, save_dir, wait_finished(job_id, 240)


def bounded_requeues(tmp_path: Path) -> tuple[Path, tuple[str, str, int]]:
    """Preempted twice with slurm.max_requeues=1."""
    save_dir = tmp_path / "bounded"
    job_id = submit(tmp_path, save_dir, "slurm.max_requeues=1")
    preempt_after_save(job_id, save_dir, 0, 0)
    wait_until(lambda: list((save_dir / "logs").glob("training_resume_1_*.log")), 150, "the rerun")
    preempt_after_save(job_id, save_dir, 1, max(saved_steps(save_dir, 0)))
    return save_dir, wait_finished(job_id, 120)


def crash(tmp_path: Path) -> tuple[Path, tuple[str, str, int]]:
    save_dir = tmp_path / "crashed"
    job_id = submit(tmp_path, save_dir, "model.crash_at_call=5")
    return save_dir, wait_finished(job_id, 120)


def time_limit(tmp_path: Path) -> tuple[Path, tuple[str, str, int]]:
    """A 2-minute limit, signalled 60 s before (Slurm checks every ~30 s, so 30-60 s into the job)."""
    save_dir = tmp_path / "timed"
    job_id = submit(
        tmp_path,
        save_dir,
        "slurm.time=0:02:00",
        "slurm.signal_lead_s=60",
        "model.step_seconds=2",  # 32 steps x 2 s: more than an attempt can train before its signal
    )
    return save_dir, wait_finished(job_id, 400)


def template_path(tmp_path: Path) -> tuple[Path, tuple[str, str, int]]:
    """The emitted requeue template submitted with plain sbatch, its batch shell signalled after a save."""
    save_dir = tmp_path / "template"
    emitted = run_submit(
        str(EXAMPLE),
        f"training.checkpoint.save_dir={save_dir}",
        *SLOW,
        "--emit-sbatch",
        "requeue",
        cwd=tmp_path,
        env=env(tmp_path),
    )
    assert emitted.returncode == 0, emitted.stderr
    script = tmp_path / "job.sbatch"
    script.write_text(emitted.stdout)
    job_id = (
        subprocess.run(
            ["sbatch", "--parsable", str(script)],
            cwd=tmp_path,
            env=env(tmp_path),
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .split(";")[0]
    )
    wait_until(lambda: any(s > 0 for s in saved_steps(save_dir, 0)), 150, "the first checkpoint")
    slurm("scancel", "--signal=USR2", "--batch", job_id)  # what --signal=B:USR2@lead does before the limit
    return save_dir, wait_finished(job_id, 240)


# test name -> its scenario, the longest first (their jobs get CPUs first).
DRIVERS = {
    "test_time_limit_requeues_until_done": time_limit,
    "test_preempted_three_times_requeues_resumes_and_matches_an_uninterrupted_run": three_preemptions,
    "test_sbatch_template_path_traps_the_signal_and_requeues": template_path,
    "test_max_requeues_is_respected": bounded_requeues,
    "test_a_crash_is_not_requeued": crash,
}


@pytest.fixture(scope="module")
def scenarios(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    slurm_cluster: None,  # noqa: F811 - the session fixture
) -> Iterator[Scenarios]:
    running = Scenarios.for_selected(request, tmp_path_factory, DRIVERS)
    yield running
    running.close()


def test_preempted_three_times_requeues_resumes_and_matches_an_uninterrupted_run(
    scenarios: Scenarios,
) -> None:
    reference, save_dir, (state, code, restarts) = scenarios.result(
        "test_preempted_three_times_requeues_resumes_and_matches_an_uninterrupted_run"
    )
    assert (state, restarts) == ("COMPLETED", 3), (state, code, restarts)

    a = load_file(str(reference / "checkpoint-epoch1-step32" / "model.safetensors"))
    b = load_file(str(save_dir / "checkpoint-epoch1-step32" / "model.safetensors"))
    assert all(a[k].equal(b[k]) for k in a), "preemption changed the final weights"

    logs = sorted(re.sub(r"_\d{8}_\d{6}", "", p.name) for p in (save_dir / "logs").glob("training_*.log"))
    assert logs == ["training.log", "training_resume_1.log", "training_resume_2.log", "training_resume_3.log"]
    attempts = json.loads((save_dir / "checkpoints" / "attempts.json").read_text())
    assert [a["reason"] for a in attempts] == ["preemption (SIGUSR2)"] * 3 + ["completed"]
    assert [a["restart_count"] for a in attempts] == [0, 1, 2, 3]
    stops = [a["stop_step"] for a in attempts[:3]]
    assert stops == sorted(set(stops)) and stops[-1] < 32  # three different steps
    run_id = json.loads((save_dir / "wandb_info.json").read_text())["run_id"]
    runs = list((save_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 4 and all(r.name.endswith(f"-{run_id}") for r in runs)  # one WandB run throughout


def test_max_requeues_is_respected(scenarios: Scenarios) -> None:
    save_dir, (state, code, restarts) = scenarios.result("test_max_requeues_is_respected")
    assert restarts == 1 and state == "FAILED", (state, code, restarts)
    log = next((save_dir / "logs").glob("training_resume_1_*.log")).read_text()
    assert "not requeueing: slurm.max_requeues=1 reached" in log
    assert len(json.loads((save_dir / "checkpoints" / "attempts.json").read_text())) == 2


def test_a_crash_is_not_requeued(scenarios: Scenarios) -> None:
    save_dir, (state, code, restarts) = scenarios.result("test_a_crash_is_not_requeued")
    assert state == "FAILED" and restarts == 0, (state, code, restarts)
    log = next((save_dir / "logs").glob("training_*.log")).read_text()
    assert "RuntimeError: crash inside the job" in log and "a crash is not requeued" in log
    attempts = json.loads((save_dir / "checkpoints" / "attempts.json").read_text())
    assert [a["reason"] for a in attempts] == ["crash"]


def test_time_limit_requeues_until_done(scenarios: Scenarios) -> None:
    """A 2-minute limit, signalled 60 s before (Slurm checks every ~30 s, so 30-60 s into the job): the run
    needs more than one allocation and gets it."""
    save_dir, (state, code, restarts) = scenarios.result("test_time_limit_requeues_until_done")
    assert state == "COMPLETED" and restarts >= 1, (state, code, restarts)
    attempts = json.loads((save_dir / "checkpoints" / "attempts.json").read_text())
    assert attempts[-1]["end"] == "completed"
    assert all(a["reason"].startswith(("time limit", "preemption")) for a in attempts[:-1])
    assert any(a["reason"].startswith("time limit") for a in attempts), attempts
    assert (save_dir / "checkpoint-epoch1-step32" / "manifest.json").exists()


def test_sbatch_template_path_traps_the_signal_and_requeues(scenarios: Scenarios) -> None:
    """No submitit: the requeue template's trap forwards the batch shell's signal to the training step."""
    save_dir, (state, code, restarts) = scenarios.result(
        "test_sbatch_template_path_traps_the_signal_and_requeues"
    )
    assert (state, restarts) == ("COMPLETED", 1), (state, code, restarts)
    assert list((save_dir / "logs").glob("training_resume_1_*.log"))
    attempts = json.loads((save_dir / "checkpoints" / "attempts.json").read_text())
    assert [a["reason"] for a in attempts] == ["preemption (SIGUSR2)", "completed"]
    assert (save_dir / "checkpoint-epoch1-step32" / "manifest.json").exists()
