"""`tsdia status`, `tsdia logs`, `tsdia sync` on experiment directories (no Slurm needed here)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, SMALL, quiet_env, run_train, tree
from tsdia.errors import TsdiaError
from tsdia.experiment import checkpoints as store
from tsdia.experiment.attempts import AttemptRecord, record_attempt
from tsdia.experiment.layout import LOCK_FILE, write_owner
from tsdia.experiment.progress import ProgressWriter
from tsdia.follow import logs as follow_logs
from tsdia.follow import status
from tsdia.follow.scan import attempt_logs


def tsdia(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tsdia.follow.cli", *args],
        cwd=cwd,
        env=env or quiet_env(cwd),
        capture_output=True,
        text=True,
        timeout=120,
    )


def experiment(root: Path, *, attempts: int = 1, lock_pid: int | None = None, job: str | None = None) -> Path:
    """A synthetic experiment: logs for `attempts` attempts, a checkpoint, optionally a lock and an owner."""
    (root / "logs").mkdir(parents=True)
    (root / "logs" / "training_20261130_010000.log").write_text("step 1\n")
    for n in range(1, attempts):
        (root / "logs" / f"training_resume_{n}_20261130_01000{n}.log").write_text(f"attempt {n}\n")
    name = store.checkpoint_name(0, 4)
    staging = store.begin_checkpoint(root, name)
    (staging / "model.safetensors").write_bytes(b"x")
    store.commit_checkpoint(root, staging, name, 4, 0, {"val_loss": 0.25}, {})
    store.update_best_and_rotate(root, "val_loss", "min", None)
    if lock_pid is not None:
        (root / LOCK_FILE).write_text(f"pid {lock_pid} on {socket.gethostname()}\n")
    if job is not None:
        write_owner(root, {"claim_token": "t", "job_id": job, "executor": "slurm"})
    return root


def progress(root: Path, step: int, state: str = "running", attempt: int = 0) -> None:
    writer = ProgressWriter(root, total_steps=100, attempt=attempt)
    writer.update(step - 10, 0, {"train_loss": 0.5})
    time.sleep(0.01)
    writer.update(step, 0, {"train_loss": 0.4}, state)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_states_from_disk(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    running = experiment(runs / "running", lock_pid=os.getpid())
    progress(running, 40)
    done = experiment(runs / "done", lock_pid=dead_pid())
    progress(done, 100, "finished")
    stopped = experiment(runs / "stopped", attempts=2, lock_pid=dead_pid())
    progress(stopped, 30, "stopped", attempt=1)
    record_attempt(stopped, AttemptRecord(1, None, 0, 10, 30, "stop requested (SIGUSR2)", "t"))
    crashed = experiment(runs / "crashed", lock_pid=dead_pid())
    record_attempt(crashed, AttemptRecord(0, None, 0, 0, 7, "crash", "t"))
    killed = experiment(runs / "killed", lock_pid=dead_pid())  # SIGKILL: no record, no final progress
    progress(killed, 20)
    (runs / "new").mkdir()
    write_owner(runs / "new", {"claim_token": "t", "job_id": None, "executor": "local"})
    (runs / "not-an-experiment").mkdir()

    rows = {Path(r.experiment).name: r for r in status.collect([str(runs)], run=no_slurm)}
    assert {name: r.state for name, r in rows.items()} == {
        "running": "RUNNING",
        "done": "COMPLETED",
        "stopped": "STOPPED",
        "crashed": "CRASHED",
        "killed": "DIED",
        "new": "NEW",
    }
    assert rows["running"].step == 40 and rows["running"].eta_s is not None and rows["running"].eta_s > 0
    assert rows["stopped"].attempts == 2 and "SIGUSR2" in rows["stopped"].detail
    assert rows["done"].best == [0.25, 4]
    table = status.format_table(list(rows.values()), runs)
    assert "running" in table and "40/100" in table and "val_loss 0.25 @ 4" in table


def no_slurm(cmd: list[str]) -> str | None:
    raise AssertionError(f"Slurm was asked ({cmd}) although no experiment has a job")


def test_slurm_is_asked_once_for_all_experiments(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    states = {
        "11": "PENDING|Resources",
        "12": "RUNNING|None",
        "13": "PENDING|BeginTime",
    }
    experiment(runs / "queued", job="11").joinpath("logs").rename(runs / "queued" / "old-logs")
    experiment(runs / "running", job="12")
    experiment(runs / "requeued", job="13", attempts=2)
    for name, job in [("completed", "21"), ("failed", "22"), ("cancelled", "23"), ("forgotten", "24")]:
        experiment(runs / name, job=job)
    calls: list[list[str]] = []

    def slurm(cmd: list[str]) -> str | None:
        calls.append(cmd)
        if cmd[0] == "squeue":
            return "".join(f"{job}|{state}\n" for job, state in states.items()) + "99|RUNNING|None\n"
        return "21|COMPLETED|0:0\n22|FAILED|1:0\n23|CANCELLED by 0|0:15\n"

    rows = {Path(r.experiment).name: r for r in status.collect([str(runs)], run=slurm)}
    assert [c[0] for c in calls] == ["squeue", "sacct"]
    assert {name: r.state for name, r in rows.items()} == {
        "queued": "QUEUED",
        "running": "RUNNING",
        "requeued": "REQUEUED",
        "completed": "COMPLETED",
        "failed": "FAILED",
        "cancelled": "CANCELLED",
        "forgotten": "DIED",
    }
    assert "Slurm no longer knows job 24" in rows["forgotten"].detail

    unreachable = status.collect([str(runs)], run=lambda cmd: None)
    assert {r.state for r in unreachable} == {"UNKNOWN"}
    assert all("could not be asked" in r.detail for r in unreachable)


def test_status_json_and_hidden_old_experiments(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    old = experiment(runs / "old", lock_pid=dead_pid())
    progress(old, 100, "finished")
    week_ago = time.time() - 8 * 24 * 3600
    for path in [old / "logs" / "progress.json", *(old / "logs").glob("*.log")]:
        os.utime(path, (week_ago, week_ago))
    data = json.loads((old / "logs" / "progress.json").read_text())
    data["updated"] = week_ago
    (old / "logs" / "progress.json").write_text(json.dumps(data))
    fresh = experiment(runs / "fresh", lock_pid=dead_pid())
    progress(fresh, 100, "finished")

    shown = tsdia("status", "runs", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "fresh" in shown.stdout and "old " not in shown.stdout
    assert "1 finished more than a week ago hidden" in shown.stdout
    everything = tsdia("status", "runs", "--all", "--json", cwd=tmp_path)
    rows = {Path(r["experiment"]).name: r for r in json.loads(everything.stdout)}
    assert set(rows) == {"old", "fresh"} and rows["fresh"]["state"] == "COMPLETED"
    assert rows["fresh"]["progress"] == 1.0 and rows["fresh"]["best"] == [0.25, 4]


def test_logs_print_and_follow_across_attempts(tmp_path: Path) -> None:
    root = experiment(tmp_path / "exp", lock_pid=os.getpid())
    first = root / "logs" / "training_20261130_010000.log"
    assert [a.index for a in attempt_logs(root)] == [0]
    printed = tsdia("logs", str(root), cwd=tmp_path)
    assert printed.stdout == "step 1\n"

    ended = {"now": False}
    out_path = tmp_path / "followed.txt"

    def writer() -> None:
        time.sleep(0.3)
        with open(first, "a") as f:
            f.write("step 2\npartial")  # a line still being written is held back
        time.sleep(0.3)
        with open(first, "a") as f:
            f.write(" line\n")
        time.sleep(0.3)
        (root / "logs" / "training_resume_1_20261130_020000.log").write_text("resumed at step 2\n")
        time.sleep(0.3)
        ended["now"] = True

    thread = threading.Thread(target=writer)
    thread.start()
    with open(out_path, "w") as out:
        follow_logs.follow(root, out=out, ended=lambda _: ended["now"], poll_s=0.05)
    thread.join()
    text = out_path.read_text()
    assert text == (
        "==> training_20261130_010000.log <==\nstep 1\nstep 2\npartial line\n"
        "\n==> training_resume_1_20261130_020000.log <==\nresumed at step 2\n"
    )
    missing = tsdia("logs", str(root), "--attempt", "7", cwd=tmp_path)
    assert (
        missing.returncode == 2
        and "no attempt 7" in missing.stderr
        and "attempts with logs: 0, 1" in missing.stderr
    )
    queued = tmp_path / "queued"  # followed right after the submit: no log yet, -f waits for it
    (queued / "logs").mkdir(parents=True)
    write_owner(queued, {"claim_token": "t", "job_id": None, "executor": "local"})
    started = {"now": False}

    def start() -> None:
        (queued / "logs" / "training_20261130_030000.log").write_text("started\n")
        started["now"] = True

    threading.Timer(0.3, start).start()
    with open(tmp_path / "waited.txt", "w") as out:
        follow_logs.follow(queued, out=out, ended=lambda _: started["now"], poll_s=0.05)
    assert (tmp_path / "waited.txt").read_text() == "==> training_20261130_030000.log <==\nstarted\n"
    never = tmp_path / "never"
    (never / "logs").mkdir(parents=True)
    with open(tmp_path / "never.txt", "w") as out, pytest.raises(TsdiaError, match="no log for rank 0 yet"):
        follow_logs.follow(never, out=out, ended=lambda _: True, poll_s=0.05)
    not_exp = tsdia("logs", str(tmp_path), cwd=tmp_path)
    assert not_exp.returncode == 2 and "not a tsdia experiment" in not_exp.stderr


@pytest.mark.slow
def test_a_real_run_completed_and_a_killed_run_died(tmp_path: Path) -> None:
    finished = tmp_path / "runs" / "finished"
    done = run_train(tmp_path, *SMALL, f"training.checkpoint.save_dir={finished}")
    assert done.returncode == 0, done.stderr[-2000:]
    killed = tmp_path / "runs" / "killed"
    args = [
        *SMALL,
        "training.epochs=50",
        "training.logging.interval=1",
        f"training.checkpoint.save_dir={killed}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tsdia.train", str(REPO / "configs" / "example.yml"), *args],
        cwd=REPO,
        env=quiet_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    while not (killed / "logs" / "progress.json").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the run never logged progress"
        time.sleep(0.2)
    rows = {Path(r.experiment).name: r for r in status.collect([str(tmp_path / "runs")], run=no_slurm)}
    assert rows["killed"].state == "RUNNING"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows = {Path(r.experiment).name: r for r in status.collect([str(tmp_path / "runs")], run=no_slurm)}
    assert (
        rows["finished"].state == "COMPLETED" and rows["finished"].step == rows["finished"].total_steps == 16
    )
    assert rows["finished"].best is not None
    assert rows["killed"].state == "DIED" and "resume" in rows["killed"].detail


def offline_run(save_dir: Path, env: dict[str, str]) -> None:
    """A real offline WandB run in `save_dir/wandb/`, as a training attempt leaves it."""
    code = (
        f"import wandb; run = wandb.init(mode='offline', dir={str(save_dir)!r}, project='p', id='abc123'); "
        "run.log({'x': 1.0}); run.finish()"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120, capture_output=True)


def test_sync_without_login_or_network_changes_nothing(tmp_path: Path) -> None:
    save_dir = tmp_path / "exp"
    (save_dir / "logs").mkdir(parents=True)
    env = quiet_env(tmp_path)
    env["HOME"] = str(tmp_path)  # no ~/.netrc login
    offline_run(save_dir, env)
    (save_dir / "wandb_info.json").write_text(json.dumps({"run_id": "abc123", "mode": "offline"}))
    rows = status.collect([str(save_dir)], run=no_slurm)
    assert rows[0].wandb == "offline (1 unsynced)"
    before = tree(save_dir)

    no_login = tsdia("sync", str(save_dir), cwd=tmp_path, env=env)
    assert no_login.returncode == 2 and "no WandB login" in no_login.stderr
    assert len(no_login.stderr.strip().splitlines()) == 1

    env.update(WANDB_API_KEY="x" * 40, WANDB_BASE_URL="http://127.0.0.1:9")  # nothing listens on port 9
    no_network = tsdia("sync", str(save_dir), cwd=tmp_path, env=env)
    assert no_network.returncode == 2 and "cannot reach http://127.0.0.1:9" in no_network.stderr
    assert tree(save_dir) == before
    nothing = tsdia("sync", str(tmp_path / "elsewhere"), cwd=tmp_path, env=env)
    assert nothing.returncode == 0 and "nothing to upload" in nothing.stdout


@pytest.mark.parametrize("bad", [["logs"], ["status", "--watch", "x"], ["nope"]])
def test_usage_errors_exit_2(tmp_path: Path, bad: list[str]) -> None:
    assert tsdia(*bad, cwd=tmp_path).returncode == 2


def test_sweep_members_are_grouped_and_logs_need_a_member(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    sweep_dir = runs / "lr-sweep"
    for name in ("lr=1e-3", "lr=3e-4"):
        experiment(sweep_dir / name, lock_pid=dead_pid())
        progress(sweep_dir / name, 100, "finished")
    (sweep_dir / "sweep.json").write_text("{}")
    experiment(runs / "alone", lock_pid=dead_pid())
    rows = status.collect([str(runs)], run=no_slurm)
    assert [r.sweep for r in rows] == [None, str(sweep_dir), str(sweep_dir)]
    table = status.format_table(rows, runs)
    assert "lr-sweep/ (sweep, 2 members)" in table and "\n  lr=1e-3 " in table

    asked = tsdia("logs", str(sweep_dir), cwd=tmp_path)
    assert asked.returncode == 2 and "choose one with --member NAME" in asked.stderr
    assert "lr=1e-3, lr=3e-4" in asked.stderr
    chosen = tsdia("logs", str(sweep_dir), "--member", "lr=3e-4", cwd=tmp_path)
    assert chosen.returncode == 0 and chosen.stdout == "step 1\n"
    wrong = tsdia("logs", str(sweep_dir), "--member", "lr=9", cwd=tmp_path)
    assert wrong.returncode == 2 and "no member 'lr=9'" in wrong.stderr


def test_progress_record_is_rewritten_at_most_every_interval_while_training(tmp_path: Path) -> None:
    """Loss lines every few milliseconds must not rewrite the file each time; validations and the end must."""
    writer = ProgressWriter(tmp_path, total_steps=100, attempt=0, min_interval_s=3600)
    path = tmp_path / "logs" / "progress.json"
    path.parent.mkdir()
    writer.update(10, 0, {"train_loss": 0.5})
    assert json.loads(path.read_text())["step"] == 10
    writer.update(20, 0, {"train_loss": 0.4})
    assert json.loads(path.read_text())["step"] == 10  # within the interval: not rewritten
    writer.update(25, 0, {"val_loss": 0.3})
    record = json.loads(path.read_text())
    assert record["step"] == 25 and record["metrics"] == {"train_loss": 0.4, "val_loss": 0.3}
    writer.update(30, 0, {"train_loss": 0.2}, "finished")
    assert json.loads(path.read_text())["state"] == "finished"
