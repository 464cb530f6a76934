"""The hang watchdog: its clock and judgement in-process, then a real 2-rank run that hangs on rank 1."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXAMPLE, REPO, quiet_env, with_plugins
from tsdia.errors import EXIT_HANG
from tsdia.experiment.attempts import AttemptRecord
from tsdia.training.after_stop import decide_requeue
from tsdia.training.watchdog import HangReport, HangWatchdog, stuck_ranks

TIMEOUT_S = 5
# 256 examples, 2 ranks x batch 16 -> 8 optimizer steps per epoch, 2 epochs; a checkpoint every 3 steps.
HANG2 = [
    "model.target=crashy:HangingModel",
    "model.num_layers=1",
    "model.step_seconds=0",
    "dataset.num_train=256",
    "dataset.num_val=32",
    "training.batch_size=16",
    "training.epochs=2",
    "training.checkpoint.interval=3",
    "training.logging.interval=1",
    "training.logging.progress_bar=false",
    f"training.watchdog.timeout_s={TIMEOUT_S}",
    "distributed.env={TSDIA_PROBE: from-config}",
]


def beat(rank: int, step: int, phase: str, state: str = "dumped", age: float = 0.0) -> dict[str, object]:
    return {"rank": rank, "step": step, "phase": phase, "state": state, "written_at": 1000.0 - age}


def test_stuck_ranks_are_the_ones_furthest_behind() -> None:
    beats = {0: beat(0, 4, "backward"), 1: beat(1, 4, "forward"), 2: beat(2, 4, "backward")}
    assert stuck_ranks(beats, 3, 1000.0, 10) == [1]  # the others wait for it in backward's all-reduce
    beats[2] = beat(2, 3, "after step")  # a rank a whole step behind
    assert stuck_ranks(beats, 3, 1000.0, 10) == [2]
    beats[2] = beat(2, 4, "backward", state="running", age=60)  # frozen: its heartbeat thread is silent
    assert stuck_ranks(beats, 3, 1000.0, 10) == [2]
    assert stuck_ranks({0: beat(0, 4, "forward")}, 2, 1000.0, 10) == [1]  # never wrote one: gone


def test_a_hang_is_requeued_unless_requeue_on_hang_is_off() -> None:
    history = [AttemptRecord(0, "1", 0, 0, 5, "hang", "t")]
    assert decide_requeue(history, 0, 3, crashed=True, requeue_on_crash=False, hung=True)[0]
    no, why = decide_requeue(
        history, 0, 3, crashed=True, requeue_on_crash=False, hung=True, requeue_on_hang=False
    )
    assert not no and "requeue_on_hang" in why
    # counted like a crash: requeued when crashes are
    assert decide_requeue(history, 0, 3, True, requeue_on_crash=True, hung=True, requeue_on_hang=False)[0]
    assert not decide_requeue(history, 3, 3, crashed=True, requeue_on_crash=False, hung=True)[0]  # bounded


class Exited(Exception):
    pass


def watchdog(
    tmp_path: Path, timeout_s: float | None, min_timeout_s: float = 0.5
) -> tuple[HangWatchdog, dict]:
    seen: dict = {}

    def exit_process(code: int) -> None:
        seen["exit"] = code

    wd = HangWatchdog(
        directory=tmp_path / "wd",
        rank=0,
        world_size=1,
        timeout_s=timeout_s,
        min_timeout_s=min_timeout_s,
        on_hang=lambda report: seen.setdefault("report", report) is None,
        before_exit=lambda: seen.setdefault("drained", True),
        exit_process=exit_process,
    )
    return wd, seen


def wait_for(seen: dict, key: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while key not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
    return key in seen


def test_fires_after_the_timeout_dumps_stacks_and_exits_with_exit_hang(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    wd, seen = watchdog(tmp_path, timeout_s=0.5)
    wd.start()
    wd.step_done(1)
    wd.step_done(2)
    wd.phase = "forward"
    assert wait_for(seen, "exit", 10)
    wd.stop()
    assert seen["exit"] == EXIT_HANG and seen["drained"]
    report: HangReport = seen["report"]
    assert (report.step, report.phase, report.stuck_ranks) == (2, "forward", [0])
    err = capfd.readouterr().err
    assert "HANG on rank 0" in err and "after step 2 in phase 'forward'" in err
    assert "in test_fires_after_the_timeout" in err  # the training thread's stack, dumped by faulthandler
    assert json.loads((tmp_path / "wd" / "rank0.json").read_text())["state"] == "dumped"


def test_a_rank_follows_a_peer_that_reported_a_hang(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A rank whose own clock has not run out (here: not even armed) still dumps and exits."""
    seen: dict = {}
    wd = HangWatchdog(
        directory=tmp_path / "wd",
        rank=1,
        world_size=2,
        timeout_s=60,
        min_timeout_s=60,
        on_hang=None,
        before_exit=lambda: None,
        exit_process=lambda code: seen.setdefault("exit", code),
    )
    wd.start()
    (tmp_path / "wd" / "hang").write_text("0")
    (tmp_path / "wd" / "recorded").touch()  # rank 0 has recorded it: no need to wait
    assert wait_for(seen, "exit", 30)
    wd.stop()
    assert seen["exit"] == EXIT_HANG
    err = capfd.readouterr().err
    assert "HANG on rank 1" in err and "rank 0 reported a hang" in err
    assert json.loads((tmp_path / "wd" / "rank1.json").read_text())["state"] == "dumped"


def test_start_up_first_validation_and_first_save_are_not_watched(tmp_path: Path) -> None:
    wd, seen = watchdog(tmp_path, timeout_s=0.3)
    wd.start()
    time.sleep(0.8)  # start-up and the first step: not armed yet
    wd.step_done(1)
    with wd.watching("validation"):
        time.sleep(0.8)  # the first validation of the attempt: no measure of it yet
    wd.step_done(2)
    assert "exit" not in seen
    with wd.watching("validation"):  # the second may take 10 x the first before it counts as a hang
        time.sleep(0.8)
    assert "exit" not in seen
    wd.stop()


def test_derived_timeout_follows_the_slowest_recent_step(tmp_path: Path) -> None:
    wd, _ = watchdog(tmp_path, timeout_s=None, min_timeout_s=1.0)
    assert wd.timeout_s() == 1.0  # the floor until steps are measured
    wd.step_done(1)  # the first step is never a sample (start-up, compilation)
    time.sleep(0.3)
    wd.step_done(2)
    assert 3.0 <= wd.timeout_s() < 5.0  # 10 x ~0.3 s


def torchrun_hang(tmp_path: Path, save_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = with_plugins(quiet_env(tmp_path))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [
            *command,
            "-m",
            "tsdia.train",
            str(EXAMPLE),
            *HANG2,
            f"training.checkpoint.save_dir={save_dir}",
            *args,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,  # distributed.timeout_s (600 s) would end a hang far later: the watchdog did it
    )


@pytest.mark.slow
def test_hang_on_rank_one_dumps_both_stacks_and_records_the_stuck_rank(tmp_path: Path) -> None:
    save_dir = tmp_path / "hang"
    done = torchrun_hang(tmp_path, save_dir, "model.hang_at_call=5")
    assert done.returncode != 0
    assert len(re.findall(rf"exitcode\s*: {EXIT_HANG} ", done.stderr)) == 2, done.stderr[-3000:]  # both ranks

    attempts = json.loads((save_dir / "checkpoints" / "attempts.json").read_text())
    assert [(a["reason"], a["stop_step"], a["ranks"]) for a in attempts] == [("hang", 4, [1])]
    ranks = attempts[0]["hang"]["ranks"]
    assert (ranks["0"]["phase"], ranks["1"]["phase"]) == ("backward", "forward")
    # Both noticed within a heartbeat (1 s here) of the timeout, not at distributed.timeout_s.
    assert all(TIMEOUT_S <= r["idle_s"] < TIMEOUT_S + 2 for r in ranks.values()), ranks

    rank0 = next((save_dir / "logs").glob("training_*.log")).read_text()
    rank1 = next((save_dir / "logs" / "ranks").glob("training_*.rank1.log")).read_text()
    assert "Distributed start-up: world size 2 (1 node(s) x 2 process(es))" in rank0
    assert "backend gloo" in rank0 and "all-reduce check passed" in rank0
    for rank, text in ((0, rank0), (1, rank1)):
        assert f"HANG on rank {rank}" in text and "Current thread" in text, text[-2000:]
    assert re.search(r"crashy\.py\", line \d+ in forward", rank1)
    assert "Stopped: hang after step 4" in rank0 and "stuck rank(s) [1]" in rank0
    assert "plugin: TSDIA_PROBE=from-config" in rank1  # distributed.env reached the rank's process
    hparams = json.loads((save_dir / "hyperparameters.json").read_text())
    assert hparams["distributed_env"] == {"TSDIA_PROBE": "from-config"}
