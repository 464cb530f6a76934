"""Early stopping: end training when a validation metric has stopped improving.

Evaluated at each validation. Its counters travel in every checkpoint (trainer_state.json,
`early_stopping`), so a resumed run counts on from where the stopped one was and stops at the same step.
A run that early-stopped stays stopped when it is resumed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from tsdia.config.schema import Config, ConfigSource, EarlyStoppingConfig
from tsdia.errors import ConfigError

KEY = "training.early_stopping.metric"


@dataclass
class EarlyStoppingState:
    """What a checkpoint records (JSON): the best value so far and how many validations since."""

    best: float | None = None
    best_step: int = -1
    bad_validations: int = 0  # validations in a row without an improvement of at least min_delta
    stopped_at: int | None = None  # the step at which it stopped training


class EarlyStopping:
    """Counts validations without improvement; `update` says when to stop."""

    def __init__(self, config: EarlyStoppingConfig, source: ConfigSource) -> None:
        if config.metric is None:
            raise ValueError("early stopping needs training.early_stopping.metric")
        self.config = config
        self.metric = config.metric
        self.source = source
        self.state = EarlyStoppingState()

    @property
    def stopped(self) -> bool:
        return self.state.stopped_at is not None

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """Record the validation at `step`; True when training should stop now."""
        if self.metric not in metrics:
            # Checked here, at the first validation, with the experiment directory already made: a model's
            # metric names are known only once it has run, and a probe forward pass before the directory
            # exists would draw from the validation loader and the RNGs that exact resume replays (the
            # loader has checked the name's shape before anything was created). Exit 2, in the run's log.
            raise ConfigError(
                f"{self.source.where(KEY)}: {KEY}: {self.metric!r} is not among this run's validation metrics "
                f"({', '.join(sorted(metrics)) or 'none'}); name one of them."
            )
        value = metrics[self.metric]
        state = self.state
        if not math.isnan(value) and (state.best is None or self._improves(value, state.best)):
            state.best, state.best_step, state.bad_validations = value, step, 0
        else:
            state.bad_validations += 1
        if state.bad_validations >= self.config.patience:
            state.stopped_at = step
        return self.stopped

    def _improves(self, value: float, best: float) -> bool:
        delta = self.config.min_delta
        return value < best - delta if self.config.mode == "min" else value > best + delta

    def reason(self) -> str:
        """One line for the log, `TrainResult.stop_reason` and `tsdia status`."""
        state, config = self.state, self.config
        return (
            f"early_stopping: {self.metric} did not improve by more than {config.min_delta:g} for "
            f"{config.patience} validation{'s' if config.patience > 1 else ''} "
            + (
                f"(best {state.best:.6g} at step {state.best_step})"
                if state.best is not None
                else "(never finite)"
            )
        )

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.state)

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore the counters; a checkpoint from before early stopping was configured starts afresh."""
        self.state = EarlyStoppingState(**state) if state else EarlyStoppingState()


def build_early_stopping(config: Config, has_validation: bool) -> EarlyStopping | None:
    """The run's early stopping (None without `training.early_stopping.metric`); it needs validation data."""
    if config.training.early_stopping.metric is None:
        return None
    if not has_validation:
        raise ConfigError(
            f"{config.source.where(KEY)}: {KEY}: early stopping watches a validation metric, but this run has "
            "no validation data (the dataset factory returned no validation set); remove it or add one."
        )
    return EarlyStopping(config.training.early_stopping, config.source)
