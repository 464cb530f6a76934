"""The cost of per-sample RNG seeding (`training.dataloader.seed_samples`) on a DataLoader's throughput.

    python benchmarks/dataloader_seeding.py [--rounds 7] [--samples 4096] [--batch-size 32]

Goal: <= 1.02x (seeded time / unseeded time for one epoch), with num_workers 0 and 2.

The dataset is deliberately cheap, so the seeding would show: 1 s of 16 kHz audio held in memory per
sample, augmented on the fly the way speech recipes do it, from the three global RNGs (additive noise
from `torch`, a random shift from `random`, a gain from `numpy`); ~100-250 us per sample here. Real
recipes read and decode audio, and cost far more per sample, which makes the seeding's share smaller.

Both variants are tsdia's own `build_dataloaders`, differing only in `seed_samples`:
- **plain**: a `RandomSampler` over the dataset (what tsdia built before per-sample seeding);
- **seeded**: `(epoch, index)` keys and the RNGs seeded per sample (in the workers; with num_workers 0
  in the main process, whose RNG states are saved and restored once per batch).

One epoch is timed from its first batch to its last (worker start-up excluded: it does not depend on
the seeding), in one process; variants are interleaved (a rotated order per round), medians reported.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

import numpy
import torch
from common import fmt_runs, median, ratio_line
from torch.utils.data import Dataset

from tsdia.config.loader import config_from_dict
from tsdia.config.schema import ConfigSource
from tsdia.training.data import build_dataloaders

SAMPLE_RATE = 16_000


class CheapAugmentedAudio(Dataset[torch.Tensor]):
    """In-memory clips, augmented per sample from torch, random and numpy (no I/O, no decoding)."""

    def __init__(self, size: int, clips: int = 64) -> None:
        self.size = size
        self.clips = torch.randn(clips, SAMPLE_RATE, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        clip = self.clips[index % len(self.clips)]
        gain = float(numpy.random.uniform(0.5, 1.5))
        noisy = clip * gain + 0.01 * torch.randn(SAMPLE_RATE)
        return torch.roll(noisy, random.randint(0, SAMPLE_RATE // 10))


def build_loader(dataset: Dataset[Any], num_workers: int, batch_size: int, seeded: bool) -> Any:
    raw = {
        "training": {
            "batch_size": batch_size,
            "num_workers": num_workers,
            "dataloader": {"seed_samples": seeded},
            "checkpoint": {"save_dir": "unused"},
        }
    }
    training = config_from_dict(raw, ConfigSource(path="benchmark")).training
    return build_dataloaders(dataset, None, training)[0]


def time_epoch(loader: Any) -> float:
    """Seconds from the first batch to the end of the epoch."""
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    for _ in batches:
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)

    dataset = CheapAugmentedAudio(args.samples)
    variants = [(w, seeded) for w in args.workers for seeded in (False, True)]
    loaders = {v: build_loader(dataset, v[0], args.batch_size, v[1]) for v in variants}
    times: dict[tuple[int, bool], list[float]] = {v: [] for v in variants}
    per_sample = {v: time_epoch(loaders[v]) for v in variants}  # warm-up (imports, allocator), not counted
    for r in range(args.rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            times[v].append(time_epoch(loaders[v]))
    samples = args.samples - args.batch_size  # the first batch is not timed
    print(f"{args.samples} samples, batch {args.batch_size}, {args.rounds} interleaved rounds (medians):")
    for v in variants:
        per_sample[v] = median(times[v]) / samples
        name = f"num_workers={v[0]} {'seeded' if v[1] else 'plain'}"
        print(f"  {name:24s} {per_sample[v] * 1e6:7.1f} us/sample  epochs(s): {fmt_runs(times[v])}")
    for w in args.workers:
        cost = (per_sample[(w, True)] - per_sample[(w, False)]) * 1e6
        print(f"  num_workers={w}: seeding costs {cost:+.1f} us per sample")
    for w in args.workers:
        value = median(times[(w, True)]) / median(times[(w, False)])
        print(ratio_line(f"seeded/plain epoch, num_workers={w}", "<= 1.02x", value))


if __name__ == "__main__":
    main()
