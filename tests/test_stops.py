"""Every stop saves: SIGTERM to every process (WandB's service and DataLoader workers included), a tracker
that dies mid-run, Ctrl-C (first SIGINT saves and exits 130, a second one aborts), in real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import EXAMPLE, REPO, SMALL, quiet_env, run_train, with_plugins
from tsdia.cluster import SLURM_FROM_SCRIPT_VAR, detect
from tsdia.config.loader import config_from_dict
from tsdia.config.schema import ConfigSource, SlurmConfig
from tsdia.errors import EXIT_INTERRUPTED, EXIT_STOPPED
from tsdia.experiment.attempts import AttemptRecord, nodes_to_exclude, read_attempts
from tsdia.training.after_stop import StopFlow
from tsdia.training.attempt import Attempt, decide_on_rank_zero
from tsdia.training.logging_utils import record_wandb_loss, reserve_wandb_run, save_wandb_info
from tsdia.training.tracker_startup import BackgroundTrackers
from tsdia.training.trackers import Trackers, WandbSettings, WandbTracker

pytestmark = pytest.mark.slow

# 128 examples, batch 16 -> 8 steps/epoch, 2 epochs = 16 steps; 0.3 s per step, a checkpoint every 3 steps.
SLOW = [
    *SMALL,
    "model.target=crashy:SlowModel",
    "model.step_seconds=0.3",
    "training.logging.interval=1",
    "training.logging.progress_bar=false",
]
FINAL = "checkpoint-epoch1-step16"


def env_for(tmp_path: Path) -> dict[str, str]:
    return with_plugins(quiet_env(tmp_path))


def start(tmp_path: Path, save_dir: Path, *args: str, session: bool = True) -> subprocess.Popen[str]:
    """tsdia-train in its own session, so that `killpg` reaches every process of it as Slurm's cgroup does."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tsdia.train",
            str(EXAMPLE),
            *SLOW,
            f"training.checkpoint.save_dir={save_dir}",
            *args,
        ],
        cwd=REPO,
        env=env_for(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=session,
    )


def wait_for_checkpoint(save_dir: Path, proc: subprocess.Popen[str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not list(save_dir.glob("checkpoint-epoch*-step*/manifest.json")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.1)


def wait_for_wandb(save_dir: Path, proc: subprocess.Popen[str], timeout: float = 90) -> list[int]:
    """The pids of the trainer's wandb-core once WandB has started (in the background, after the first step)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        cores = children_named(proc.pid, "wandb-core")
        if cores and _wandb_run_started(save_dir):
            return cores
        time.sleep(0.2)
    return children_named(proc.pid, "wandb-core")


def _wandb_run_started(save_dir: Path) -> bool:
    """wandb_info.json holds the run id from the attempt's start; the offline run directory once WandB is up."""
    try:
        return bool(json.loads((save_dir / "wandb_info.json").read_text()).get("offline_run_dir"))
    except (OSError, ValueError):
        return False


def children_named(pid: int, name: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == pid and comm == name:
            found.append(int(entry.name))
    return found


def reference(tmp_path: Path) -> dict:  # type: ignore[type-arg]
    full = tmp_path / "full"
    done = run_train(
        tmp_path, *SLOW, "model.step_seconds=0", f"training.checkpoint.save_dir={full}", env=env_for(tmp_path)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(full / FINAL / "model.safetensors"))


def resume_to_end(tmp_path: Path, save_dir: Path) -> dict:  # type: ignore[type-arg]
    done = run_train(
        tmp_path,
        *SLOW,
        "model.step_seconds=0",
        f"training.checkpoint.save_dir={save_dir}",
        "training.checkpoint.resume=latest",
        env=env_for(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(save_dir / FINAL / "model.safetensors"))


def assert_equal(a: dict, b: dict) -> None:  # type: ignore[type-arg]
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), "the stop changed the final weights"


def saved_steps(save_dir: Path) -> list[int]:
    return sorted(
        int(p.parent.name.rsplit("step", 1)[1]) for p in save_dir.glob("checkpoint-*/manifest.json")
    )


def test_sigterm_to_every_process_saves_and_resumes_bitwise(tmp_path: Path) -> None:
    """The issue's repro: SIGTERM to the trainer, wandb-core and a DataLoader worker at once (killpg), with
    WandB and TensorBoard logging every step: a stop checkpoint, a recorded stop, no traceback, exit 4."""
    expected = reference(tmp_path)
    save_dir = tmp_path / "stopped"
    proc = start(
        tmp_path,
        save_dir,
        "training.logging.wandb=true",
        "training.logging.tensorboard=true",
        "training.num_workers=1",
        "model.step_seconds=0.6",  # room for WandB's background start under load before the stop
    )
    wait_for_checkpoint(save_dir, proc)
    assert wait_for_wandb(save_dir, proc), "wandb's service is not a child of the trainer"
    before = saved_steps(save_dir)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, out + err
    assert "Traceback" not in out + err
    log = next((save_dir / "logs").glob("training_*.log")).read_text()
    assert "Traceback" not in log and "Received SIGTERM" in log
    after = saved_steps(save_dir)
    # The stop checkpoint: a new one, or the interval checkpoint of the very step the stop was agreed at
    # (the signal can land between that save and the stop check); the attempt record below says which.
    assert after[-1] >= before[-1], (before, after)
    (attempt,) = read_attempts(save_dir)
    assert (attempt.end, attempt.reason, attempt.stop_step) == (
        "signalled",
        "stop requested (SIGTERM)",
        after[-1],
    )
    assert attempt.nodes  # this host
    assert_equal(expected, resume_to_end(tmp_path, save_dir))
    records = read_attempts(save_dir)
    assert [a.end for a in records] == ["signalled", "completed"]


def test_a_dead_tracker_service_is_dropped_with_one_warning_and_training_goes_on(tmp_path: Path) -> None:
    """wandb-core killed mid-run (not the trainer): one warning, training, checkpoints and TensorBoard go on,
    wandb_info.json says from which step WandB has nothing; the run completes with exit 0."""
    save_dir = tmp_path / "lost"
    proc = start(tmp_path, save_dir, "training.logging.wandb=true", "training.logging.tensorboard=true")
    wait_for_checkpoint(save_dir, proc)
    (core,) = wait_for_wandb(save_dir, proc)
    os.kill(core, signal.SIGKILL)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, out + err
    assert "Traceback" not in out + err
    warnings = [line for line in (out + err).splitlines() if "WandB failed at step" in line]
    assert len(warnings) == 1, warnings
    assert "disabled for the rest of this attempt" in warnings[0]
    info = json.loads((save_dir / "wandb_info.json").read_text())
    (lost,) = info["lost"]
    assert lost["attempt"] == 0 and 3 <= lost["since_step"] <= 16 and lost["error"]
    assert (save_dir / FINAL / "manifest.json").exists()
    assert [a.end for a in read_attempts(save_dir)] == ["completed"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(save_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == list(range(1, 17))  # TensorBoard lost nothing


def test_ctrl_c_saves_records_interrupted_and_exits_130(tmp_path: Path) -> None:
    expected = reference(tmp_path)
    save_dir = tmp_path / "interrupted"
    proc = start(tmp_path, save_dir, "training.logging.wandb=true", "training.num_workers=1")
    wait_for_checkpoint(save_dir, proc)
    before = saved_steps(save_dir)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group, DataLoader worker included
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, out + err
    assert "Ctrl-C: saving a checkpoint after the current step" in err and "Ctrl-C again to abort" in err
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err
    after = saved_steps(save_dir)
    assert after[-1] > before[-1]
    (attempt,) = read_attempts(save_dir)
    assert (attempt.end, attempt.reason, attempt.stop_step) == (
        "interrupted",
        "interrupted (SIGINT)",
        after[-1],
    )
    assert_equal(expected, resume_to_end(tmp_path, save_dir))


def test_a_second_ctrl_c_aborts_at_once_and_the_newest_checkpoint_stays_valid(tmp_path: Path) -> None:
    save_dir = tmp_path / "aborted"
    proc = start(tmp_path, save_dir, "model.step_seconds=2.0", "training.logging.wandb=false")
    wait_for_checkpoint(save_dir, proc)
    before = saved_steps(save_dir)
    # The manifest appears before the save returns: a SIGINT now would stop at that very step, maybe
    # before the second one comes. Half a second later the run is inside the next 2-second step.
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.2)  # inside the current step: the stop has not been reached yet
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, out + err
    assert "aborted (Ctrl-C)" in err
    assert saved_steps(save_dir) == before  # no stop checkpoint
    (attempt,) = read_attempts(save_dir)
    assert attempt.end == "aborted"
    done = run_train(
        tmp_path,
        *SLOW,
        "model.step_seconds=0",
        f"training.checkpoint.save_dir={save_dir}",
        "training.checkpoint.resume=latest",
        env=env_for(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"step{before[-1]}" in done.stdout.split("Resuming from", 1)[1].splitlines()[0]


def test_ctrl_c_under_torchrun_stops_both_ranks_at_one_step(tmp_path: Path) -> None:
    """Ctrl-C reaches torchrun (the terminal's foreground process), which forwards SIGINT to its workers."""
    save_dir = tmp_path / "torchrun"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "tsdia.train",
            str(EXAMPLE),
            *SLOW,
            "training.logging.wandb=false",
            "training.preemption.check_interval=2",
            f"training.checkpoint.save_dir={save_dir}",
        ],
        cwd=REPO,
        env=env_for(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_checkpoint(save_dir, proc)
    before = saved_steps(save_dir)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err[-3000:]  # torchrun re-raises the SIGINT it received (its own traceback)
    assert "Stopped: interrupted (SIGINT) at step" in out + err, err[-3000:]
    after = saved_steps(save_dir)
    assert after[-1] > before[-1] and after[-1] % 2 == 0  # agreed at a check_interval step
    (attempt,) = read_attempts(save_dir)
    assert (attempt.end, attempt.stop_step) == ("interrupted", after[-1])
    assert err.count("Ctrl-C: saving a checkpoint") == 1  # one notice per node


def record(end: str, nodes: list[str]) -> AttemptRecord:
    return AttemptRecord(0, "7", 0, 0, 3, end, "t", end=end, nodes=nodes)


@pytest.mark.parametrize(
    ("history", "excluded"),
    [
        ([record("crash", ["n1", "n2"]), record("crash", ["n2", "n3"])], ["n2"]),
        ([record("crash", ["n1"]), record("hang", ["n1"])], ["n1"]),  # any failure counts, hangs too
        (
            [record("crash", ["n1"]), record("preempted", ["n1"]), record("crash", ["n1"])],
            [],
        ),  # not consecutive
        ([record("crash", ["n1"]), record("crash", ["n2"])], []),  # no node in both
        ([record("crash", ["n1"])], []),
    ],
)
def test_a_node_in_two_consecutive_failed_attempts_is_excluded(
    history: list[AttemptRecord], excluded: list[str]
) -> None:
    assert nodes_to_exclude(history) == excluded


def test_attempts_files_without_the_new_fields_still_read(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    old = {"resume_index": 0, "job_id": "5", "restart_count": 0, "start_step": 0, "stop_step": 4}
    old |= {"reason": "crash", "time": "t"}
    newer = {**old, "reason": "preempted", "end": "preempted", "nodes": ["n1"], "from_the_future": 1}
    (tmp_path / "checkpoints" / "attempts.json").write_text(json.dumps([old, newer]))
    first, second = read_attempts(tmp_path)
    assert (first.end, first.nodes, first.failed) == ("", [], True)
    assert (second.end, second.nodes, second.failed) == ("preempted", ["n1"], False)


def test_trackers_drop_a_wandb_run_whose_service_died(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real wandb client against a killed wandb-core: the fan-out survives and reports the loss once."""
    for key, value in quiet_env(tmp_path).items():
        if key.startswith("WANDB_"):
            monkeypatch.setenv(key, value)
    tracker = WandbTracker(WandbSettings("p", None, "r", "offline", str(tmp_path)), {}, None)
    lost: list[tuple[int, str]] = []
    trackers = Trackers([tracker], on_lost=lambda t, step, err: lost.append((step, type(err).__name__)))
    trackers.log({"x": 1.0}, 1)
    for pid in children_named(os.getpid(), "wandb-core"):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    trackers.log({"x": 2.0}, 2)
    trackers.log({"x": 3.0}, 3)
    trackers.finish()
    assert len(lost) == 1 and lost[0][0] == 2, lost
    assert not trackers and "WandB" in trackers.lost


@pytest.mark.parametrize("in_container", [False, True])
def test_a_container_job_leaves_slurm_to_its_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], in_container: bool
) -> None:
    """Inside the container scontrol cannot reach Slurm (each call waited up to 60 s before the save):
    the job script exports TSDIA_SLURM_FROM_SCRIPT=1, and tsdia then neither asks nor requeues."""
    calls = tmp_path / "scontrol-calls"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    env = {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "0"}
    if in_container:
        env[SLURM_FROM_SCRIPT_VAR] = "1"
    cluster = detect(env)
    assert cluster.talks_to_slurm is not in_container
    flow = StopFlow(tmp_path, cluster, SlurmConfig(max_requeues=3), resume_index=0)
    flow.on_signal("SIGUSR2")
    flow.on_agreed_stop("SIGUSR2")
    plan = flow.plan(start_step=0, stop_step=4, signal_name="SIGUSR2")
    flow.requeue(plan)
    assert plan.requeue  # the exit status still asks for the requeue: the script does it
    if in_container:
        assert not calls.exists()
        assert "the job script requeues the job" in capsys.readouterr().out
    else:
        assert "show job" in calls.read_text() and "requeue 77" in calls.read_text()


def test_the_wandb_run_id_is_fixed_before_wandb_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop's SIGTERM reaches wandb-core too; if it kills it while WandB starts (in the background), the
    attempt records the loss, and the requeued attempt must still continue the same run, not open another."""
    for key, value in quiet_env(tmp_path).items():
        if key.startswith("WANDB_"):
            monkeypatch.setenv(key, value)
    settings = WandbSettings("p", None, "r", "offline", str(tmp_path))
    run_id = reserve_wandb_run(tmp_path, settings)  # what start_trackers does before the background start
    record_wandb_loss(tmp_path, 0, 0, RuntimeError("wandb-core killed while starting"))
    info = json.loads((tmp_path / "wandb_info.json").read_text())
    assert info["run_id"] == run_id and info["lost"][0]["since_step"] == 0
    assert reserve_wandb_run(tmp_path, settings) == run_id  # the next attempt
    tracker = WandbTracker(settings, {}, run_id)  # real wandb, offline: the run takes the reserved id
    try:
        assert tracker.run.id == run_id
        save_wandb_info(tracker, tmp_path)
    finally:
        tracker.finish()
    info = json.loads((tmp_path / "wandb_info.json").read_text())
    assert info["run_id"] == run_id and info["lost"] and info["offline_run_dir"]


def test_start_trackers_records_the_run_id_before_wandb_is_let_start(tmp_path: Path) -> None:
    """The order that matters: wandb_info.json has the run id while the background start still waits."""
    raw = {
        "training": {
            "checkpoint": {"save_dir": str(tmp_path / "exp")},
            "logging": {"wandb": True, "wandb_mode": "offline", "tensorboard": False},
        }
    }
    config = config_from_dict(raw, ConfigSource(path=""))
    cluster = detect({})
    decision, lock = decide_on_rank_zero(config, cluster)
    attempt = Attempt(config, cluster, decision, lock)
    try:
        trackers = attempt.start_trackers({}, start_step=0)
        assert isinstance(trackers, BackgroundTrackers) and not trackers._ready.is_set()  # WandB not started
        run_id = json.loads((tmp_path / "exp" / "wandb_info.json").read_text())["run_id"]
        assert len(run_id) == 8 and run_id.isalnum()
    finally:
        if lock is not None:
            lock.release()
