"""The one parser of Slurm durations, against Slurm's documented formats (sbatch --time, squeue %L)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tsdia.slurm_commands import classify_slurm_stop, job_snapshot, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 5400),  # MINUTES
        ("5:30", 330),  # MINUTES:SECONDS (also squeue's time left under an hour)
        ("5:00", 300),
        ("1:02:03", 3723),  # HOURS:MINUTES:SECONDS
        ("2-3", 183600),  # DAYS-HOURS
        ("1-00:30", 88200),  # DAYS-HOURS:MINUTES (not 1 day and 30 seconds)
        ("1-00:00:00", 86400),  # DAYS-HOURS:MINUTES:SECONDS
        ("2-00:00:10", 172810),
        (" 0:45 ", 45),
    ],
)
def test_parse_duration_reads_every_documented_format(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["UNLIMITED", "INVALID", "", "1:60:00", "1-24", "1:2:3:4", "-5", "1h"])
def test_parse_duration_refuses_what_is_not_a_duration(text: str) -> None:
    assert parse_duration(text) is None


def scontrol_says(text: str) -> Callable[[list[str]], str | None]:
    return lambda cmd: f"JobId=7 JobName=x {text} NodeList=n[1-2] ExcNodeList=(null) BatchHost=n1\n"


# What `scontrol show job` said when the trainer got its signal, measured on the local cluster (FACTS §4).
@pytest.mark.parametrize(
    ("said", "signal_name", "end", "by_slurm", "kill_near"),
    [
        (
            "JobState=COMPLETING Reason=None Restarts=1 RunTime=00:00:00 TimeLimit=UNLIMITED",
            "SIGTERM",
            "preempted",
            True,
            True,
        ),  # urgent preempts debug
        (
            "JobState=PENDING Reason=None Restarts=1 RunTime=00:00:00 TimeLimit=365-00:00:00",
            "SIGTERM",
            "node_failure",
            True,
            True,
        ),  # node set DOWN
        (
            "JobState=COMPLETING Reason=None Restarts=0 RunTime=00:00:05 TimeLimit=365-00:00:00",
            "SIGTERM",
            "cancelled",
            False,
            True,
        ),  # scancel
        (
            "JobState=COMPLETING Reason=TimeLimit Restarts=0 RunTime=00:01:20 TimeLimit=00:01:00",
            "SIGTERM",
            "time_limit",
            False,
            True,
        ),  # the limit itself
        (
            "JobState=RUNNING Reason=None Restarts=0 RunTime=00:00:07 TimeLimit=00:01:00",
            "SIGTERM",
            "preempted",
            False,
            False,
        ),  # GraceTime preemption: still running, close to a short limit
        (
            "JobState=RUNNING Reason=None Restarts=0 RunTime=00:08:30 TimeLimit=00:10:00",
            "SIGUSR2",
            "time_limit",
            False,
            False,
        ),  # --signal=USR2@120, 90 s left
        (
            "JobState=RUNNING Reason=None Restarts=0 RunTime=00:00:30 TimeLimit=00:10:00",
            "SIGUSR2",
            "preempted",
            False,
            False,
        ),  # scancel --signal=USR2
    ],
)
def test_slurm_stops_are_told_apart_from_one_scontrol_reading(
    said: str, signal_name: str, end: str, by_slurm: bool, kill_near: bool
) -> None:
    snapshot = job_snapshot("7", run=scontrol_says(said))
    assert snapshot is not None and snapshot.nodes == ("n1", "n2") and snapshot.excluded_nodes == ()
    stop = classify_slurm_stop(snapshot, signal_name, restart_count=0, lead_s=120)
    assert (stop.end, stop.requeued_by_slurm, stop.kill_is_near) == (end, by_slurm, kill_near), stop
    assert stop.state.startswith(said.split()[0].split("=")[1])


def test_a_stop_slurm_cannot_explain_says_so() -> None:
    assert job_snapshot("7", run=lambda cmd: None) is None
    stop = classify_slurm_stop(None, "SIGTERM", 0, 120)
    assert stop.end == "signalled" and "could not be asked" in stop.words
