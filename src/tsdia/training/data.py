"""DataLoaders built the way exact resume needs them: seeded order, per-sample seeded RNGs, no global RNG use."""

from __future__ import annotations

import logging
import signal
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from tsdia.config.schema import TrainingConfig
from tsdia.errors import ConfigError
from tsdia.training.sample_rng import TRAIN_STREAM, VALIDATION_STREAM, SampleKeySampler, SeededSamples

logger = logging.getLogger(__name__)


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
    (which skips a validation) would diverge. With `dataloader.seed_samples` each sample is loaded
    under RNGs seeded from (seed, epoch, index) (see `tsdia.training.sample_rng`).
    """
    train = _loader(train_set, config, config.batch_size, TRAIN_STREAM, shuffle=True)
    val = None
    if val_set is not None:
        batch_size = config.validation.batch_size or config.batch_size
        val = _loader(val_set, config, batch_size, VALIDATION_STREAM, shuffle=False)
    return train, val


def _loader(
    dataset: Dataset[Any], config: TrainingConfig, batch_size: int, stream: int, shuffle: bool
) -> DataLoader[Any]:
    options = config.dataloader
    training = stream == TRAIN_STREAM
    kwargs: dict[str, Any] = {
        "batch_size": batch_size,
        "num_workers": config.num_workers,
        "collate_fn": getattr(dataset, "collate_fn", None),
        "generator": torch.Generator().manual_seed(config.seed + stream),
        "worker_init_fn": ignore_stop_signals,
        "pin_memory": torch.cuda.is_available() if options.pin_memory is None else options.pin_memory,
        "drop_last": options.drop_last and training,
    }
    if config.num_workers > 0:  # (PyTorch refuses both without workers; the config loader says so first)
        kwargs["persistent_workers"] = options.persistent_workers
        kwargs["prefetch_factor"] = options.prefetch_factor
    if isinstance(dataset, IterableDataset):
        if training:
            logger.warning(
                "The training set is an IterableDataset: tsdia cannot seed its samples by index nor restart "
                "it at a position, so exact resume is NOT claimed for this run (a resume replays the "
                "epoch's stream and drops the batches already trained on; that is exact only if the stream "
                "and its randomness depend on nothing but the epoch and the worker)."
            )
        return DataLoader(dataset, **kwargs)
    size = len(dataset)  # type: ignore[arg-type]
    if kwargs["drop_last"] and size < batch_size:
        raise ConfigError(
            f"training.dataloader.drop_last: true drops every batch: the training set has {size} samples, "
            f"fewer than training.batch_size={batch_size}; lower the batch size or set drop_last: false."
        )
    if not options.seed_samples:
        sampler: Any = (
            torch.utils.data.RandomSampler(range(size), generator=kwargs["generator"]) if shuffle else None
        )
        return DataLoader(dataset, sampler=sampler, **kwargs)
    keys = SampleKeySampler(size, config.seed + stream, shuffle=shuffle, follow_epochs=training)
    seeded = SeededSamples(dataset, config.seed, stream, rngs=options.sample_rngs)
    return DataLoader(seeded, sampler=keys, **kwargs)


def shutdown_workers(*loaders: Any) -> None:
    """End the worker processes a loader keeps (persistent workers), once everything is saved.

    Accelerate's prepared loaders iterate through a `base_dataloader`, which holds the live iterator.
    """
    for loader in loaders:
        base = getattr(loader, "base_dataloader", loader)
        iterator = getattr(base, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            base._iterator = None
