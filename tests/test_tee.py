"""The console tee: fd-level capture and the progress-bar collapsing, on real processes."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tsdia.training.tee import _LineCollapser


def collapse(parts: list[bytes], interval: float = 30.0) -> bytes:
    sink = io.BytesIO()
    collapser = _LineCollapser(sink, threading.Lock(), interval)
    for part in parts:
        collapser.feed(part)
    collapser.flush_pending()
    return sink.getvalue()


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        ([b"a\nb\n"], b"a\nb\n"),
        ([b"par", b"tial\n"], b"partial\n"),
        (
            [b"\rbar 1", b"\rbar 2", b"\rbar 3\n"],
            b"bar 1\nbar 3\n",
        ),  # first redraw shown, then the final state
        (
            [b"\rbar 1", b"\r      \r", b"message\n"],
            b"bar 1\nmessage\n",
        ),  # tqdm clears the bar before a write
        ([b"\rbar 1\r      \rmessage\n"], b"message\n"),
        ([b"windows\r\n"], b"windows\n"),
        ([b"no newline at exit"], b"no newline at exit\n"),
        ([b"\n\n"], b"\n\n"),
        ([b"a\nb", b"c\n\rbar 1\rbar 2\n", b"x\ny\n"], b"a\nbc\nbar 2\nx\ny\n"),  # fast path and back
        ([b"\rbar 1", b"\n", b"x\n"], b"bar 1\nx\n"),
    ],
)
def test_collapser(parts: list[bytes], expected: bytes) -> None:
    assert collapse(parts) == expected


def test_collapser_throttles_redraws() -> None:
    redraws = [f"\rstep {i}".encode() for i in range(10_000)]
    out = collapse([*redraws, b"\n"], interval=3600)
    assert out == b"step 0\nstep 9999\n"


def test_tee_captures_every_channel(tmp_path: Path) -> None:
    """print, stderr, C-level writes, a child process, and a crash's traceback all reach console and file."""
    log = tmp_path / "run.log"
    script = f"""
import os, subprocess, sys, time
from tsdia.training.logging_utils import setup_file_logger
tee = setup_file_logger({str(log)!r}, progress_interval=0.0)
print("from print")
print("from stderr", file=sys.stderr)
os.write(1, b"from os.write\\n")
subprocess.run(["sh", "-c", "echo from child"], check=True)
import logging, warnings
logging.getLogger("x").warning("from logging")
warnings.warn("from warnings")
for i in range(3):
    sys.stderr.write(f"\\rprogress {{i}}"); sys.stderr.flush(); time.sleep(0.01)
sys.stderr.write("\\n")
try:
    raise ValueError("crash")
except ValueError:
    import traceback
    tee.write_file_only(traceback.format_exc())
tee.close()
print("after close")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    text = log.read_text()
    for expected in [
        "from print",
        "from stderr",
        "from os.write",
        "from child",
        "from logging",
        "from warnings",
    ]:
        assert expected in text, expected
        assert expected in result.stdout + result.stderr
    assert "progress 2" in text and "\r" not in text
    assert "ValueError: crash" in text and "ValueError: crash" not in result.stderr
    assert "after close" in result.stdout and "after close" not in text
