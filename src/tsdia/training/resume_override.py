"""`resume_policy: override`: after the checkpoint is loaded, the config's new values take effect.

Loading restores the optimizer's hyperparameters, the scheduler's base learning rates and the data
position as they were saved; under `override` they are replaced here by what the config says now, so a
new lr is the lr. The data position is re-derived from the global number of samples the epoch has
consumed when the batch geometry (batch size, gradient accumulation, world size) changed.
"""

from __future__ import annotations

import logging
from typing import Any

from tsdia.config.schema import TrainingConfig
from tsdia.experiment.config_change import WORLD_SIZE_KEY, ConfigChange

logger = logging.getLogger(__name__)

_GEOMETRY = ("training.batch_size", "training.gradient_accumulation_steps", WORLD_SIZE_KEY)


def samples_in_epoch(batches_in_epoch: int, batch_size: int, world_size: int, dataset_len: int | None) -> int:
    """Samples of the epoch consumed by all ranks together (at most the dataset's length)."""
    samples = batches_in_epoch * batch_size * world_size
    return min(samples, dataset_len) if dataset_len is not None else samples


def apply_override(
    change: ConfigChange,
    training: TrainingConfig,
    optimizer: Any,
    scheduler: Any,
    progress: Any,
    *,
    world_size: int,
    batches_per_epoch: int,
    dataset_len: int | None,
    accelerator: Any = None,
) -> None:
    """Apply the overridden (tied) changes to the loaded optimizer, scheduler and data position."""
    keys = {c.key for c in change.overridden}
    if not keys:
        return
    set_optimizer_hyperparameters(optimizer, training)
    reset_schedule(scheduler, training.optimizer.lr)
    logger.info(
        "resume_policy: override: optimizer hyperparameters and learning-rate schedule set from the config "
        "(lr now %.6g at step %d); exact resume is no longer claimed.",
        float(scheduler.get_last_lr()[0]),
        progress.global_step,
    )
    if "training.epochs" in keys:
        logger.info(
            "resume_policy: override: training.epochs changed: the schedule now spans %d epochs and "
            "continues at step %d of it.",
            training.epochs,
            progress.global_step,
        )
    if keys & set(_GEOMETRY):
        rederive_position(change, training, progress, world_size, batches_per_epoch, dataset_len, accelerator)


def set_optimizer_hyperparameters(optimizer: Any, training: TrainingConfig) -> None:
    """Every param group takes the config's values for the hyperparameters it has (lr, betas, ...)."""
    values = training.optimizer.settings()  # a target's keyword arguments too
    for group in optimizer.param_groups:
        for key, value in values.items():
            if key == "params" or key not in group:
                continue
            group[key] = tuple(value) if isinstance(group[key], tuple) else value
        group["initial_lr"] = training.optimizer.lr


def reset_schedule(scheduler: Any, lr: float) -> None:
    """The schedule's base lr becomes `lr`; the current lr is the schedule's value at its current step."""
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [lr for _ in groups]
    step = scheduler.last_epoch
    if hasattr(scheduler, "lr_lambdas"):  # LambdaLR: every tsdia schedule
        lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    elif hasattr(scheduler, "_get_closed_form_lr"):
        lrs = list(scheduler._get_closed_form_lr())
    else:
        logger.warning(
            "resume_policy: override: %s has no closed form; the lr restarts from %g.", type(scheduler), lr
        )
        lrs = list(scheduler.base_lrs)
    for group, value in zip(groups, lrs, strict=True):
        group["lr"] = value
    scheduler._last_lr = lrs


def rederive_position(
    change: ConfigChange,
    training: TrainingConfig,
    progress: Any,
    world_size: int,
    batches_per_epoch: int,
    dataset_len: int | None,
    accelerator: Any = None,
) -> None:
    """Convert the epoch's global sample count into this geometry's batch count (rounded down).

    A checkpoint without the sample count (older tsdia) derives it from the recorded batch size and
    world size. The samples between the new position and the old one are trained on again.
    """
    old_batch = _old_int(change, "training.batch_size", training.batch_size)
    old_world = change.old_world_size or world_size
    seen = progress.samples_in_epoch
    if seen < 0:
        seen = samples_in_epoch(progress.batches_in_epoch, old_batch, old_world, dataset_len)
    per_batch = training.batch_size * world_size
    accumulation = training.gradient_accumulation_steps
    if dataset_len is not None and seen >= dataset_len:
        batches = batches_per_epoch  # the epoch was complete
    else:
        batches = min(seen // per_batch // accumulation * accumulation, batches_per_epoch)
    replayed = max(seen - batches * per_batch, 0)
    logger.info(
        "resume_policy: override: data position re-derived from the global sample count: %d samples of "
        "epoch %d seen (batch %d on %d ranks x %d) -> batch %d on %d ranks x %d; %d samples replayed.",
        seen,
        progress.epoch,
        progress.batches_in_epoch,
        old_world,
        old_batch,
        batches,
        world_size,
        training.batch_size,
        replayed,
    )
    progress.batches_in_epoch = batches
    progress.samples_in_epoch = batches * per_batch
    if accelerator is not None and hasattr(accelerator, "step"):
        accelerator.step = 0  # gradient accumulation restarts its count at the (rounded) position


def _old_int(change: ConfigChange, key: str, default: int) -> int:
    for c in change.changes:
        if c.key == key:
            try:
                return int(c.old)
            except ValueError:
                return default
    return default
