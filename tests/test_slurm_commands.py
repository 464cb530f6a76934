"""The one parser of Slurm durations, against Slurm's documented formats (sbatch --time, squeue %L)."""

from __future__ import annotations

import pytest

from tsdia.slurm_commands import parse_duration, time_left_s


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


def test_time_left_reads_squeue_output() -> None:
    calls: list[list[str]] = []

    def squeue(cmd: list[str]) -> str | None:
        calls.append(cmd)
        return "1-00:30:00\n"

    assert time_left_s("42", run=squeue) == 88200
    assert calls == [["squeue", "-h", "-j", "42", "-o", "%L"]]
    assert time_left_s("42", run=lambda cmd: None) is None
