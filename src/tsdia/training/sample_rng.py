"""Per-sample randomness: a sample's random numbers are a pure function of (seed, epoch, index).

On-the-fly augmentation in a dataset's `__getitem__` usually draws from the global RNGs (`torch`,
`random`, `numpy`). Left alone, what a DataLoader worker draws depends on its seed (taken when the
iterator starts) and on every sample it loaded before, so it changes with `num_workers`, with the
rank that loads the sample and with a resume that skips the first batches of an epoch. Here the
sampler hands each index over together with its epoch (robust to persistent workers, which never see
attribute changes made after they start, and to Accelerate rebuilding the DataLoader around it), and
the dataset wrapper seeds the global RNGs from (seed, epoch, index) right before the user's
`__getitem__` runs: in the worker, or in the main process (`num_workers: 0`), where the main
process's own RNG states are saved and restored around each batch of samples. Only the RNGs the
dataset is seen drawing from are seeded; see `SeededSamples`. (Seeding, saving and comparing the RNGs
themselves is `tsdia.training.global_rngs`.)

User code that keeps generators of its own gets the current sample's seed from `sample_seed()` or a
ready `torch.Generator` from `sample_generator()`.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from tsdia.training.global_rngs import NAMES, GlobalRngs

__all__ = ["SampleKeySampler", "SeededSamples", "sample_generator", "sample_seed"]

_MASK64 = (1 << 64) - 1
TRAIN_STREAM, VALIDATION_STREAM = 0, 1

# The sample being loaded in this process, as (stream base, epoch, index); None outside a sample.
_current_key: tuple[int, int, int] | None = None


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
    if _current_key is None:
        raise RuntimeError(
            "sample_seed() is only defined while tsdia loads a sample (inside the dataset's __getitem__ "
            "under a tsdia DataLoader with training.dataloader.seed_samples: true)."
        )
    return _key_seed(*_current_key)


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

    Only the RNGs the dataset is seen drawing from are seeded (re-seeding one costs microseconds per
    sample, and many datasets draw from one RNG or none): the others are watched, their states compared
    before and after each batch. The batch in which the dataset first draws from a watched RNG is
    loaded again with that RNG seeded, so every sample still sees exactly the states eager seeding would
    give it. What was learned is shared by the loading processes of this DataLoader through shared
    memory, workers of later epochs included, so each RNG costs one reloaded batch per run (or per
    worker that finds it at the same time), not one per worker and epoch.
    """

    def __init__(
        self, dataset: Dataset[Any], seed: int, stream: int, rngs: Sequence[str] = NAMES, lazy: bool = True
    ) -> None:
        self.dataset, self.seed, self.stream, self.rngs = dataset, seed, stream, tuple(rngs)
        self._base = _stream_base(seed, stream)
        # Which of `rngs` the dataset draws from (1: seen drawing); eager seeding starts with all of them.
        self._drawn: Any = multiprocessing.RawArray("b", [0 if lazy else 1] * len(self.rngs))
        self._seeded: GlobalRngs | None = None  # built in the loading process (not pickled)
        self._watched: GlobalRngs | None = None
        self._learned = b""

    def __getstate__(self) -> dict[str, Any]:
        state = {**self.__dict__, "_seeded": None, "_watched": None, "_learned": b""}
        if multiprocessing.context.get_spawning_popen() is None:  # not a worker start: no shared memory
            state["_drawn"] = list(self._drawn)
        return state

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> list[Any]:
        seeded, watched = self._rngs()
        # In a worker the RNGs belong to us; in the main process dropout and the user's own code draw from
        # them too, so their states must come out of loading exactly as they went in.
        main_process = get_worker_info() is None
        saved = seeded.save() if main_process and seeded.names else None
        before = watched.save() if watched.names else None
        try:
            samples = self._load(keys, seeded.seed if seeded.names else None)
        finally:
            if saved is not None:
                seeded.restore(saved)
        if before is not None:
            drawn = watched.drawn_from(before)
            if drawn:  # samples drew from an RNG that was not seeded for them: load them again, seeded
                if main_process:
                    watched.restore(before)
                for name in drawn:
                    self._drawn[self.rngs.index(name)] = 1
                return self.__getitems__(keys)
        return samples

    def _rngs(self) -> tuple[GlobalRngs, GlobalRngs]:
        """The RNGs seeded per sample and those watched, as this DataLoader has learned them so far."""
        learned = bytes(self._drawn)
        if self._seeded is None or self._watched is None or learned != self._learned:
            self._learned = learned
            self._seeded = GlobalRngs([name for name, drawn in zip(self.rngs, learned, strict=True) if drawn])
            self._watched = GlobalRngs(
                [name for name, drawn in zip(self.rngs, learned, strict=True) if not drawn]
            )
        return self._seeded, self._watched

    def _load(self, keys: Sequence[tuple[int, int]], seed_rngs: Callable[[int], None] | None) -> list[Any]:
        """The samples, each loaded with `seed_rngs` (if any) called on its seed first."""
        global _current_key
        samples = []
        dataset, base = self.dataset, self._base
        try:
            if seed_rngs is None:  # nothing to seed: sample_seed() mixes the seed if it is asked for
                for epoch, index in keys:
                    _current_key = base, epoch, index
                    samples.append(dataset[index])
            else:
                # The seeds first, in one tight loop: mixing them between samples, with cold caches, costs more.
                seeds = [_key_seed(base, epoch, index) for epoch, index in keys]
                for (epoch, index), seed in zip(keys, seeds, strict=True):
                    _current_key = base, epoch, index
                    seed_rngs(seed)
                    samples.append(dataset[index])
        finally:
            _current_key = None
        return samples
