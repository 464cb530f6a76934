"""Names inside an experiment directory, and the owner record that `tsdia-submit` writes there."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from tsdia.fileio import atomic_write_text

LOGS_DIR = "logs"
RANK_LOGS_DIR = (
    "ranks"  # logs/ranks/: the other ranks' output, so logs/training_*.log is one file per attempt
)
CONFIG_FILE = "config.yml"
LOCK_FILE = ".tsdia.lock"
OWNER_FILE = ".tsdia-owner.json"  # the claim token (and job id) owning this directory
SWEEP_FILE = "sweep.json"  # in a sweep directory: the sweep and its members (tsdia.launch.sweep)
STORE_DIR = "checkpoints"  # staging area, index and attempt records; named checkpoints live beside it
_RESUME_LOG = re.compile(r"^training_resume_(\d+)_\d{8}_\d{6}\.log$")


def now_timestamp() -> str:
    """YYYYmmdd_HHMMSS, as in the log file names."""
    return time.strftime("%Y%m%d_%H%M%S")


def has_started(root: Path) -> bool:
    """A run has started in this experiment (it made logs/)."""
    return (root / LOGS_DIR).is_dir()


def is_experiment(root: Path) -> bool:
    """`root` is a tsdia experiment: a run started there, or it was claimed (config copy or owner record)."""
    return has_started(root) or (root / CONFIG_FILE).exists() or (root / OWNER_FILE).exists()


def next_resume_index(root: Path) -> int:
    """N for the next `training_resume_N` log: one more than the highest so far."""
    logs = root / LOGS_DIR
    found = [int(m.group(1)) for p in logs.glob("training_resume_*.log") if (m := _RESUME_LOG.match(p.name))]
    return max(found, default=0) + 1


def read_owner(root: Path) -> dict[str, Any] | None:
    """The owner record, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads((root / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_owner(root: Path, record: dict[str, Any], durable: bool = True) -> None:
    atomic_write_text(root / OWNER_FILE, json.dumps(record, indent=2), durable)
