"""`checkpoints/attempts.json`: one record per attempt that stopped or crashed, oldest first."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tsdia.experiment.layout import STORE_DIR
from tsdia.fileio import atomic_write_text

ATTEMPTS_FILE = "attempts.json"  # in checkpoints/


@dataclass
class AttemptRecord:
    """What one stopped (or crashed) attempt did: for the requeue bound, and for people."""

    resume_index: int
    job_id: str | None
    restart_count: int
    start_step: int
    stop_step: int
    reason: str
    time: str
    stuck_ranks: list[int] | None = None  # a hang: the ranks furthest behind (the others waited for them)
    hang: dict[str, Any] | None = None  # a hang: timeout and where every rank was (step, phase, idle seconds)


def attempts_path(save_dir: Path) -> Path:
    return save_dir / STORE_DIR / ATTEMPTS_FILE


def record_attempt(save_dir: Path, attempt: AttemptRecord) -> list[AttemptRecord]:
    """Append to `checkpoints/attempts.json` (rank 0) and return the whole history."""
    path = attempts_path(save_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    history = read_attempts(save_dir)
    history.append(attempt)
    atomic_write_text(path, json.dumps([asdict(a) for a in history], indent=2))
    return history


def read_attempts(save_dir: Path) -> list[AttemptRecord]:
    """The history of an experiment's stopped attempts ([] when there is none or it is unreadable)."""
    try:
        return [AttemptRecord(**item) for item in json.loads(attempts_path(save_dir).read_text())]
    except (OSError, ValueError, TypeError):
        return []
