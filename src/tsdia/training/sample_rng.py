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

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from tsdia.training.global_rngs import NAMES, GlobalRngs

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


def _stream_base(seed: int, stream: int) -> int:
    return _mix64((seed << 1) | stream)


def seed_of(seed: int, stream: int, epoch: int, index: int) -> int:
    """The 64-bit seed of one sample: the same in every process, worker and attempt.

    Distinct for every (epoch, index) below 2**24 epochs and 2**40 samples; one mixing round per
    sample (the stream's part is computed once), as this runs for every sample loaded.
    """
    return _key_seed(_stream_base(seed, stream), epoch, index)


def _key_seed(base: int, epoch: int, index: int) -> int:
    return _mix64(base ^ ((epoch << 40) | index))


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

    def __init__(self, dataset: Dataset[Any], seed: int, stream: int, rngs: Sequence[str] = NAMES) -> None:
        self.dataset, self.seed, self.stream, self.rngs = dataset, seed, stream, tuple(rngs)
        self._base = _stream_base(seed, stream)
        self._global_rngs: GlobalRngs | None = None  # built in the loading process (not pickled)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_global_rngs": None}

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> list[Any]:
        global _current_seed
        if self._global_rngs is None:
            self._global_rngs = GlobalRngs(self.rngs)
        rngs = self._global_rngs
        # In a worker the RNGs belong to us; in the main process dropout and the user's own code draw from
        # them too, so their states must come out of loading exactly as they went in.
        saved = rngs.save() if get_worker_info() is None else None
        samples = []
        dataset, seed_rngs = self.dataset, rngs.seed
        # The seeds first, in one tight loop: mixing them between samples, with cold caches, costs more.
        seeds = [_key_seed(self._base, epoch, index) for epoch, index in keys]
        try:
            for (_, index), seed in zip(keys, seeds, strict=True):
                _current_seed = seed
                seed_rngs(seed)
                samples.append(dataset[index])
        finally:
            _current_seed = None
            if saved is not None:
                rngs.restore(saved)
        return samples
