"""What a training run reports (`TrainResult`) and the counters every checkpoint carries (`Progress`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tsdia.training.early_stopping import EarlyStopping


@dataclass
class TrainResult:
    """What a finished `Trainer.train()` reports."""

    save_dir: str
    global_step: int
    epoch: int
    last_checkpoint: str | None
    best_checkpoint: str | None
    val_metrics: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False  # a stop signal ended this attempt before the end (exit 3/4, resumable)
    # Why training ended before its planned end: the stop signal (e.g. SIGUSR2) when `stopped_early`; or
    # "early_stopping: ..." when early stopping ended it, a normal, completed end (`stopped_early` False).
    stop_reason: str | None = None
    requeued: bool = False  # the Slurm job was put back in the queue and will resume by itself
    end: str | None = None  # how a stopped attempt ended (attempts.json's `end`, e.g. "interrupted")


@dataclass
class Progress:
    """Counters saved in every checkpoint (Accelerate does not store the step)."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    last_val_step: int = -1  # global step of the latest validation
    # The geometry the state was saved under, so a resume with another one can find its place (-1/0: older).
    samples_in_epoch: int = -1  # samples of the epoch consumed by all ranks together
    world_size: int = 0


def checkpoint_state(progress: Progress, early_stopping: EarlyStopping | None) -> dict[str, Any]:
    """A checkpoint's trainer_state.json: the counters, and early stopping's when it is on."""
    state: dict[str, Any] = asdict(progress)
    if early_stopping is not None:
        state["early_stopping"] = early_stopping.state_dict()
    return state


def restore_state(state: dict[str, Any], early_stopping: EarlyStopping | None) -> Progress:
    """The counters of a checkpoint's trainer_state.json; early stopping's are restored into it (a
    checkpoint saved without them starts its counting afresh)."""
    stopping = state.pop("early_stopping", None)
    if early_stopping is not None:
        early_stopping.load_state_dict(stopping)
    return Progress(**state)
