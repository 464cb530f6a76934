"""Per-sample randomness: a sample's random numbers are a pure function of (seed, epoch, index).

On-the-fly augmentation in a dataset's `__getitem__` usually draws from the global RNGs (`torch`,
`random`, `numpy`). Left alone, what a DataLoader worker draws depends on its seed (taken when the
iterator starts) and on every sample it loaded before, so it changes with `num_workers`, with the
rank that loads the sample and with a resume that skips the first batches of an epoch. Here the
sampler hands each index over together with its epoch (robust to persistent workers, which never see
attribute changes made after they start, and to Accelerate rebuilding the DataLoader around it), and
the dataset wrapper seeds the global RNGs from (seed, epoch, index) right before the user's
`__getitem__` runs: in the worker, or in the main process (`num_workers: 0`), where the main
process's own RNG states are saved and restored around each batch of samples.

User code that keeps generators of its own gets the current sample's seed from `sample_seed()` or a
ready `torch.Generator` from `sample_generator()`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

try:
    import numpy
except ImportError:  # numpy is optional: without it there is no numpy RNG to seed
    numpy = None  # type: ignore[assignment]

__all__ = ["SampleKeySampler", "SeededSamples", "sample_generator", "sample_seed"]

_MASK64 = (1 << 64) - 1
TRAIN_STREAM, VALIDATION_STREAM = 0, 1

# The seed of the sample being loaded in this process (None outside a sample).
_current_seed: int | None = None


def _mix64(value: int) -> int:
    """SplitMix64's finaliser: nearby inputs give unrelated 64-bit outputs."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def seed_of(seed: int, stream: int, epoch: int, index: int) -> int:
    """The 64-bit seed of one sample: the same in every process, worker and attempt."""
    return _mix64(_mix64(_mix64((seed << 1) | stream) ^ epoch) ^ index)


def sample_seed() -> int:
    """The seed of the sample being loaded now (call it inside your dataset's `__getitem__`).

    A pure function of (training.seed, epoch, sample index), whatever worker or rank loads it: seed
    your own generators with it, e.g. `numpy.random.default_rng(sample_seed())`.
    """
    if _current_seed is None:
        raise RuntimeError(
            "sample_seed() is only defined while tsdia loads a sample (inside the dataset's __getitem__ "
            "under a tsdia DataLoader with training.dataloader.seed_samples: true)."
        )
    return _current_seed


def sample_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A `torch.Generator` seeded for the sample being loaded now, independent of the global torch RNG."""
    return torch.Generator(device=device).manual_seed(_mix64(sample_seed() ^ 0x5DEECE66D))


def _seed_global_rngs(seed: int) -> None:
    # Each library gets different bits: torch and numpy both use MT19937, and one 32-bit seed for both
    # would make their streams equal.
    torch.default_generator.manual_seed(seed & 0xFFFFFFFF)
    random.seed(seed)
    if numpy is not None:
        numpy.random.seed(seed >> 32)


def _capture_global_rngs() -> tuple[Any, ...]:
    legacy_numpy = numpy.random.mtrand._rand if numpy is not None else None
    return (
        torch.default_generator.get_state(),
        random.getstate(),
        legacy_numpy.get_state() if legacy_numpy is not None else None,
    )


def _restore_global_rngs(states: tuple[Any, ...]) -> None:
    torch_state, random_state, numpy_state = states
    torch.default_generator.set_state(torch_state)
    random.setstate(random_state)
    if numpy is not None and numpy_state is not None:
        numpy.random.mtrand._rand.set_state(numpy_state)


class SampleKeySampler(Sampler[tuple[int, int]]):
    """Yields `(epoch, index)` keys: a permutation seeded by (seed, epoch), or the plain order.

    Carrying the epoch inside the key is what lets persistent workers (and any worker started before
    `set_epoch`) seed a sample correctly. Accelerate keeps a sampler that is not a `RandomSampler` as
    it is and shards its batches across ranks, so every rank sees the same permutation.
    """

    def __init__(self, size: int, seed: int, shuffle: bool, follow_epochs: bool = True) -> None:
        self.size, self.seed, self.shuffle, self.follow_epochs = size, seed, shuffle, follow_epochs
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer (through Accelerate) before each epoch; fixed keys ignore it."""
        if self.follow_epochs:
            self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        if self.shuffle:
            generator = torch.Generator().manual_seed(_mix64(self.seed ^ _mix64(epoch)))
            order: Sequence[int] = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = range(self.size)
        for index in order:
            yield epoch, index


class SeededSamples(Dataset[Any]):
    """Wraps a map-style dataset: seeds the global RNGs from (seed, stream, epoch, index) per sample.

    Indexed by the `(epoch, index)` keys of `SampleKeySampler`. The DataLoader hands it whole batches
    (`__getitems__`), so in the main process the RNG states are saved and restored once per batch.
    """

    def __init__(self, dataset: Dataset[Any], seed: int, stream: int) -> None:
        self.dataset, self.seed, self.stream = dataset, seed, stream

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> list[Any]:
        global _current_seed
        # In a worker the RNGs belong to us; in the main process dropout and the user's own code draw from
        # them too, so their states must come out of loading exactly as they went in.
        saved = _capture_global_rngs() if get_worker_info() is None else None
        samples = []
        try:
            for epoch, index in keys:
                _current_seed = seed_of(self.seed, self.stream, epoch, index)
                _seed_global_rngs(_current_seed)
                samples.append(self.dataset[index])
        finally:
            _current_seed = None
            if saved is not None:
                _restore_global_rngs(saved)
        return samples
