"""A user dataset that augments on the fly from the global RNGs, as speech recipes do.

Noise from `torch`, a time shift from `random` and a gain from `numpy`, all drawn inside `__getitem__`
in whatever process loads the sample (a DataLoader worker, or the main process with num_workers: 0).
"""

from __future__ import annotations

import random
from typing import Any

import numpy
import torch
from torch.utils.data import Dataset

from tsdia.examples.tsvad import build_datasets as clean_datasets


class Augmented(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, clean: Any, max_shift: int = 10) -> None:
        self.clean, self.max_shift = clean, max_shift

    def __len__(self) -> int:
        return len(self.clean)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = dict(self.clean[index])
        shift = random.randint(-self.max_shift, self.max_shift)
        gain = float(numpy.random.uniform(0.8, 1.2))
        noisy = item["features"] * gain + 0.1 * torch.randn(item["features"].shape)
        item["features"] = torch.roll(noisy, shift, dims=0)
        item["labels"] = torch.roll(item["labels"], shift, dims=0)
        return item


def build_datasets(**kwargs: Any) -> tuple[Augmented, Any]:
    """The example's mixtures, training set augmented (validation clean, as usual)."""
    train, val = clean_datasets(**kwargs)
    return Augmented(train), val
