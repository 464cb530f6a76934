"""`checkpoints/attempts.json`: one record per attempt (completed, stopped, crashed), oldest first.

Files written before a field existed still read: missing fields take their defaults, unknown ones are
ignored (a newer tsdia may add more).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tsdia.experiment.layout import STORE_DIR
from tsdia.fileio import atomic_write_text

ATTEMPTS_FILE = "attempts.json"  # in checkpoints/


# How an attempt ended (`AttemptRecord.end`). The failed ones count toward excluding a node.
ENDS = (
    "completed",
    "preempted",
    "time_limit",
    "cancelled",
    "node_failure",
    "interrupted",  # Ctrl-C (SIGINT)
    "signalled",  # a stop signal Slurm could not explain (or no Slurm)
    "aborted",  # a second Ctrl-C: no stop checkpoint
    "crash",
    "hang",
)
FAILED_ENDS = frozenset({"crash", "hang"})


@dataclass
class AttemptRecord:
    """What one attempt did and how it ended: for the requeue bounds, the node exclusion, and for people."""

    resume_index: int
    job_id: str | None
    restart_count: int
    start_step: int
    stop_step: int
    reason: str  # in words, e.g. "preempted (SIGTERM; requeued by Slurm)", "crash"
    time: str
    end: str = ""  # one of ENDS ("" in files older than this field)
    nodes: list[str] = field(default_factory=list)  # the attempt's nodes (Slurm's node list, else this host)
    ranks: list[int] = field(default_factory=list)  # ranks that failed or hung, when known
    slurm_state: str | None = None  # JobState/Reason when the stop signal arrived, e.g. "COMPLETING/None"
    excluded_nodes: list[str] = field(default_factory=list)  # nodes the requeue after this attempt excluded

    hang: dict[str, Any] | None = None  # a hang: timeout and where every rank was (step, phase, idle seconds)

    @property
    def failed(self) -> bool:
        return self.end in FAILED_ENDS or (not self.end and self.reason == "crash")


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
    known = {f.name for f in fields(AttemptRecord)}
    try:
        items = json.loads(attempts_path(save_dir).read_text())
        return [AttemptRecord(**{k: v for k, v in item.items() if k in known}) for item in items]
    except (OSError, ValueError, TypeError, AttributeError):
        return []


def nodes_to_exclude(history: list[AttemptRecord]) -> list[str]:
    """Nodes that were part of the last two attempts when both failed (crash or hang), sorted.

    One failure says little (a bug, a bad batch); the same node under two failures in a row is the
    cheapest suspect to take out of the job's next allocation.
    """
    if len(history) < 2 or not (history[-1].failed and history[-2].failed):
        return []
    return sorted(set(history[-1].nodes) & set(history[-2].nodes))
