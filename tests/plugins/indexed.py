"""The example's data with each sample's index, and a model that prints the indices it trains on.

A resume on another geometry must go on from the same global sample: the printed indices of all its
attempts together cover the epoch once, with no sample trained on twice and none skipped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from tsdia.examples.tsvad import TargetSpeakerVAD
from tsdia.examples.tsvad import build_datasets as clean_datasets


class Indexed(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, clean: Any) -> None:
        self.clean = clean

    def __len__(self) -> int:
        return len(self.clean)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {**self.clean[index], "index": torch.tensor(index)}


def build_datasets(**kwargs: Any) -> tuple[Indexed, Any]:
    train, val = clean_datasets(**kwargs)
    return Indexed(train), val


class IndexReportingModel(TargetSpeakerVAD):
    def forward(self, batch):  # type: ignore[no-untyped-def]
        import torch.distributed as dist

        if self.training:
            rank = dist.get_rank() if dist.is_initialized() else 0
            indices = ",".join(str(int(i)) for i in batch["index"])
            print(f"TRAIN_SAMPLES rank={rank} {indices}", flush=True)
        return super().forward({k: v for k, v in batch.items() if k != "index"})
