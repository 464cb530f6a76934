"""`logs/progress.json`: how far the current attempt got, rewritten atomically at every log interval.

Rank 0 writes it; `tsdia status` reads it (with no tracker and no Slurm needed) for the step, the step
rate and an ETA. A reader sees the old or the new record, never a torn one.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tsdia.experiment.layout import LOGS_DIR
from tsdia.fileio import atomic_write_text

PROGRESS_FILE = "progress.json"  # in logs/
RATE_WINDOW = 8  # log records the step rate is averaged over


@dataclass
class ProgressRecord:
    """The newest progress of an experiment's current attempt."""

    step: int
    total_steps: int
    epoch: int
    state: str  # "running", "finished" or "stopped"
    steps_per_s: float | None = None  # over the last few log intervals
    metrics: dict[str, float] = field(default_factory=dict)  # latest logged values (train and val)
    attempt: int = 0  # N of training_resume_N (0: the first attempt)
    updated: float = 0.0  # time.time() of this record
    pid: int = 0
    host: str = ""


def progress_path(save_dir: Path) -> Path:
    return save_dir / LOGS_DIR / PROGRESS_FILE


def read_progress(save_dir: Path) -> ProgressRecord | None:
    """The record, or None when there is none yet (or it is unreadable)."""
    try:
        data = json.loads(progress_path(save_dir).read_text())
        return ProgressRecord(**data)
    except (OSError, ValueError, TypeError):
        return None


class ProgressWriter:
    """Keeps `logs/progress.json` current; cheap enough to call at every log interval."""

    def __init__(self, save_dir: Path, total_steps: int, attempt: int, min_interval_s: float = 0.0) -> None:
        self.path = progress_path(save_dir)
        self.total_steps = total_steps
        self.attempt = attempt
        # Training-loss lines come every few milliseconds with small steps: the file is rewritten at most
        # this often for them (validation results and state changes are written at once).
        self.min_interval_s = min_interval_s
        self._written_at: float | None = None
        self.metrics: dict[str, float] = {}
        self._recent: deque[tuple[float, int]] = deque(maxlen=RATE_WINDOW + 1)

    def update(self, step: int, epoch: int, metrics: dict[str, Any], state: str = "running") -> None:
        now = time.time()
        self.metrics.update({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        if not self._recent or self._recent[-1][1] != step:
            self._recent.append((now, step))
        rate = None
        if len(self._recent) > 1:
            (t0, s0), (t1, s1) = self._recent[0], self._recent[-1]
            rate = (s1 - s0) / (t1 - t0) if t1 > t0 else None
        due = (
            self._written_at is None
            or state != "running"
            or any(key.startswith("val_") for key in metrics)
            or now - self._written_at >= self.min_interval_s
        )
        if not due:
            return
        self._written_at = now
        record = ProgressRecord(
            step=step,
            total_steps=self.total_steps,
            epoch=epoch,
            state=state,
            steps_per_s=rate,
            metrics=dict(self.metrics),
            attempt=self.attempt,
            updated=now,
            pid=os.getpid(),
            host=socket.gethostname(),
        )
        atomic_write_text(self.path, json.dumps(asdict(record), indent=2), durable=False)
