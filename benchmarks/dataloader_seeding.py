"""The cost of per-sample RNG seeding (`training.dataloader.seed_samples`) on a DataLoader's throughput.

    python benchmarks/dataloader_seeding.py [--epochs 3] [--samples 4096] [--batch-size 32]

Goal: <= 1.02x (seeded / unseeded loading cost) on the `recipe` dataset, with num_workers 0 and 2.

Two deliberately cheap datasets, so the seeding would show: 1 s of 16 kHz audio held in memory per
sample (no file reading, no decoding), augmented on the fly from the three global RNGs:
- **recipe**: what a speech recipe does after decoding: gain (`numpy`), additive noise (`torch`), a
  shift and a speed perturbation (`random`), 80-dim log-mel features, SpecAugment time and frequency
  masks (~1 ms per sample here);
- **minimal** (information only): only gain, noise and shift on the waveform (~0.2 ms per sample): the
  floor, where the fixed cost of seeding is largest relative to the work;
- **torch-only** and **none** (information only, `--datasets`): the minimal waveform with noise from
  `torch` alone, and with no random draw at all: what tsdia's learning of the RNGs a dataset draws from
  saves (one seeded RNG and two watched; three watched).

How, so that a 2% difference is visible on a shared 2-core machine: one real DataLoader per
(dataset, num_workers), fed by tsdia's `SampleKeySampler`, whose dataset alternates batch by batch
between **plain** (`dataset[index]` for each sample: what tsdia did before) and **seeded** (tsdia's
`SeededSamples`: the RNGs seeded per sample; in the main process with num_workers 0, with its RNG
states saved and restored around the batch). Each batch measures, where it is loaded (worker or main
process), the CPU time (`thread_time`) of loading its samples, and reports it with the batch. The two
variants thus run interleaved in the same processes under the same load. The ratio is the summed
seeded cost over the summed plain cost; collation, inter-process transfer and the loop cost the same
for both, so the loader's throughput changes by less than this ratio (it is an upper bound).
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

import numpy
import torch
from common import ratio_line
from torch.utils.data import DataLoader, Dataset, default_collate

from tsdia.training.sample_rng import TRAIN_STREAM, SampleKeySampler, SeededSamples

SAMPLE_RATE = 16_000
N_FFT, HOP, N_MELS = 400, 160, 80


class CheapAugmentedAudio(Dataset[torch.Tensor]):
    """In-memory clips, augmented per sample from torch, random and numpy (no I/O, no decoding)."""

    def __init__(self, size: int, kind: str, clips: int = 64) -> None:
        self.size, self.kind = size, kind
        self.clips = torch.randn(clips, SAMPLE_RATE, generator=torch.Generator().manual_seed(0))
        self.window = torch.hann_window(N_FFT)
        self.mel = torch.rand(N_FFT // 2 + 1, N_MELS, generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        clip = self.clips[index % len(self.clips)]
        if self.kind == "none":
            return torch.roll(clip * 0.9 + 0.01 * clip, SAMPLE_RATE // 20)
        if self.kind == "torch-only":
            return torch.roll(clip * 0.9 + 0.01 * torch.randn(SAMPLE_RATE), SAMPLE_RATE // 20)
        gain = float(numpy.random.uniform(0.5, 1.5))
        wave = torch.roll(clip * gain + 0.01 * torch.randn(SAMPLE_RATE), random.randint(0, SAMPLE_RATE // 10))
        if self.kind == "minimal":
            return wave
        speed = random.choice((0.9, 1.0, 1.1))  # speed perturbation, resampled to a fixed length after
        length = int(SAMPLE_RATE / speed)
        wave = torch.nn.functional.interpolate(wave[None, None], size=length, mode="linear")[0, 0]
        wave = torch.nn.functional.interpolate(wave[None, None], size=SAMPLE_RATE, mode="linear")[0, 0]
        power = torch.stft(wave, N_FFT, HOP, window=self.window, return_complex=True).abs().pow(2)
        feats = (power.T @ self.mel + 1e-6).log()
        t0, width = random.randint(0, feats.shape[0] - 20), int(torch.randint(0, 20, ()))
        feats[t0 : t0 + width] = 0.0  # SpecAugment: a time mask ...
        f0, height = int(torch.randint(0, N_MELS - 10, ())), int(numpy.random.randint(0, 10))
        feats[:, f0 : f0 + height] = 0.0  # ... and a frequency mask
        return feats


class Alternating(Dataset[Any]):
    """Loads batch after batch alternately plain and seeded, and appends (variant, CPU seconds) to each."""

    def __init__(self, dataset: Dataset[Any], seed: int) -> None:
        self.dataset, self.seeded, self.batches = dataset, SeededSamples(dataset, seed, TRAIN_STREAM), 0

    def __len__(self) -> int:
        return len(self.seeded)

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        self.batches += 1  # (per process: each worker alternates on its own)
        seeded = self.batches % 2 == 0
        start = time.thread_time()
        samples = self.seeded.__getitems__(keys) if seeded else [self.dataset[index] for _, index in keys]
        return [*samples, ("cost", seeded, time.thread_time() - start)]


def collate_with_cost(items: list[Any]) -> tuple[Any, Any]:
    return items[-1], default_collate(items[:-1])


def measure(dataset: Dataset[Any], num_workers: int, args: argparse.Namespace) -> dict[bool, list[float]]:
    """Per-batch CPU seconds of loading, by variant (False: plain, True: seeded)."""
    keys = SampleKeySampler(len(dataset), seed=0, shuffle=True)  # type: ignore[arg-type]
    loader = DataLoader(
        Alternating(dataset, seed=0),
        sampler=keys,
        batch_size=args.batch_size,
        num_workers=num_workers,
        collate_fn=collate_with_cost,
    )
    costs: dict[bool, list[float]] = {False: [], True: []}
    for epoch in range(args.epochs + 1):  # epoch 0 warms up (allocator, forks) and is not counted
        keys.set_epoch(epoch)
        for (_, seeded, seconds), _batch in loader:
            if epoch:
                costs[seeded].append(seconds)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["recipe", "minimal"],
        choices=["recipe", "minimal", "torch-only", "none"],
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    print(
        f"{args.samples} samples per epoch, batch {args.batch_size}, {args.epochs} epochs; batches alternate "
        "plain/seeded; CPU time of loading, per sample:"
    )
    ratios = []
    for name in args.datasets:
        dataset = CheapAugmentedAudio(args.samples, kind=name)
        for workers in args.workers:
            costs = measure(dataset, workers, args)
            n = min(len(costs[False]), len(costs[True]))
            plain, seeded = sum(costs[False][:n]), sum(costs[True][:n])
            per = args.batch_size * n
            print(
                f"  {name:7s} num_workers={workers}: plain {plain / per * 1e6:7.1f} us, seeded "
                f"{seeded / per * 1e6:7.1f} us ({(seeded - plain) / per * 1e6:+.1f} us; {n} batches each)"
            )
            ratios.append((name, workers, seeded / plain))
    for name, workers, value in ratios:
        goal = "<= 1.02x" if name == "recipe" else "info"
        print(ratio_line(f"seeded/plain loading, {name}, num_workers={workers}", goal, value))


if __name__ == "__main__":
    main()
