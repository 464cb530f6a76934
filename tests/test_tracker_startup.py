"""Trackers started in a background thread: nothing logged before they are ready is lost or reordered."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tsdia.training.tracker_startup import BackgroundTrackers
from tsdia.training.trackers import TensorBoardTracker, Trackers


class Recorder:
    def __init__(self) -> None:
        self.rows: list[tuple[int, float]] = []
        self.finished = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.rows.append((step, metrics["loss"]))

    def finish(self) -> None:
        self.finished = True


def test_records_before_and_during_the_start_keep_their_order() -> None:
    recorder = Recorder()
    release = threading.Event()

    def start() -> Trackers:
        release.wait(10)
        time.sleep(0.01)  # the hand-over races with the logging below
        return Trackers([recorder])

    trackers = BackgroundTrackers(start, configured=True)
    assert trackers  # enabled trackers count as present while they start
    for step in range(5):
        trackers.log({"loss": float(step)}, step)
    release.set()
    for step in range(5, 3000):  # logged while the queue is handed over, then directly
        trackers.log({"loss": float(step)}, step)
    trackers.finish()
    assert recorder.rows == [(s, float(s)) for s in range(3000)]
    assert recorder.finished


def test_finish_waits_for_a_slow_start() -> None:
    recorder = Recorder()

    def start() -> Trackers:
        time.sleep(0.5)
        return Trackers([recorder])

    trackers = BackgroundTrackers(start, configured=True)
    trackers.log({"loss": 1.0}, 1)
    trackers.finish()
    assert recorder.rows == [(1, 1.0)] and recorder.finished


def test_a_failed_start_surfaces_at_the_next_log() -> None:
    def start() -> Trackers:
        raise ConnectionError("wandb: cannot reach the server")

    trackers = BackgroundTrackers(start, configured=True)
    assert trackers.wait_started(10)
    with pytest.raises(ConnectionError, match="cannot reach"):
        trackers.log({"loss": 1.0}, 1)
    for step in range(2, 100):  # no tracker will ever take these: they are not kept
        trackers.log({"loss": 1.0}, step)
    assert trackers._queue == []
    trackers.finish()  # only a warning now


def test_tensorboard_started_late_has_every_scalar(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def start() -> Trackers:
        time.sleep(0.3)
        return Trackers([TensorBoardTracker(str(tmp_path / "tb"), {"a": 1}, "a: 1", 0, resuming=False)])

    trackers = BackgroundTrackers(start, configured=True)
    for step in range(1, 6):
        trackers.log({"loss": float(step)}, step)  # all before the writer exists
    trackers.finish()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(s, float(s)) for s in range(1, 6)]


def test_records_reach_the_trackers_on_their_own_thread_and_finish_delivers_them_all() -> None:
    """`wandb.log` and TensorBoard's scalars cost ~0.5 ms each: the training thread only queues a record."""
    delivering, release = threading.Event(), threading.Event()
    threads: list[str] = []
    recorder = Recorder()

    class Blocking(Recorder):
        def log(self, metrics: dict[str, float], step: int) -> None:
            threads.append(threading.current_thread().name)
            delivering.set()
            release.wait(10)
            recorder.log(metrics, step)

    trackers = BackgroundTrackers(lambda: Trackers([Blocking()]), configured=True)
    trackers.log({"loss": 1.0}, 1)
    assert delivering.wait(10)  # the tracker is busy with record 1 ...
    trackers.log({"loss": 2.0}, 2)  # ... and the caller goes on
    assert recorder.rows == []
    release.set()
    trackers.finish()
    assert recorder.rows == [(1, 1.0), (2, 2.0)]
    assert threads == ["tsdia-trackers", "tsdia-trackers"]
