"""DataLoaders built the way exact resume needs them: seeded generators, no global RNG use."""

from __future__ import annotations

import signal
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from tsdia.config.schema import TrainingConfig


def ignore_stop_signals(worker_id: int) -> None:
    """Workers leave stop signals to the main process, which saves and then ends them.

    Slurm signals every process of the job and a terminal's Ctrl-C reaches the whole foreground process
    group: a worker that died of it would turn the stop into a "worker exited unexpectedly" crash.
    """
    for name in ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT"):
        signal.signal(signal.Signals[name], signal.SIG_IGN)


def build_dataloaders(
    train_set: Dataset[Any], val_set: Dataset[Any] | None, config: TrainingConfig
) -> tuple[DataLoader[Any], DataLoader[Any] | None]:
    """Shuffled training loader and sequential validation loader, each with its own seeded generator.

    A loader without a generator draws its worker seed from torch's global RNG every time it is
    iterated, so validation would shift the dropout masks of later training steps and a resumed run
    (which skips a validation) would diverge.
    """
    train = DataLoader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=config.num_workers,
        collate_fn=getattr(train_set, "collate_fn", None),
        generator=torch.Generator().manual_seed(config.seed),
        worker_init_fn=ignore_stop_signals,
    )
    val = None
    if val_set is not None:
        val = DataLoader(
            val_set,
            batch_size=config.validation.batch_size or config.batch_size,
            shuffle=False,
            num_workers=config.num_workers,
            collate_fn=getattr(val_set, "collate_fn", None),
            generator=torch.Generator().manual_seed(config.seed + 1),
            worker_init_fn=ignore_stop_signals,
        )
    return train, val
