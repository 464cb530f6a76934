"""How long an interval checkpoint blocks the training loop: synchronous vs `checkpoint.async_save`.

A ~100M-parameter model with AdamW state (~1.2 GB per checkpoint) trains on CPU; every few steps tsdia's
`Checkpointer` saves. We time the `save()` call itself, which is what the loop waits for: the whole write
when synchronous; the fork plus committing the previous background write when asynchronous. Modes are
interleaved within one process (same memory, same disk), several rounds, and the median per mode is
compared. The ratio (async / sync) is printed last; the goal is <= 0.1.

    .venv/bin/python benchmarks/checkpoint_blocking.py [--rounds 3] [--params-m 100]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from tsdia.config.schema import CheckpointConfig
from tsdia.training.checkpointer import Checkpointer


def build(params_m: int) -> torch.nn.Module:
    width = 2048
    layers = max(1, round(params_m * 1e6 / (width * width + width)))
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="saves per mode (after one warm-up save each)")
    parser.add_argument("--params-m", type=int, default=100, help="model size in millions of parameters")
    parser.add_argument("--steps-between", type=int, default=6, help="training steps between two saves")
    args = parser.parse_args()

    accelerator = Accelerator(cpu=True)
    model = build(args.params_m)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = torch.randn(16, 2048)
    n_params = sum(p.numel() for p in model.parameters())

    def train(steps: int) -> None:
        for _ in range(steps):
            model(batch).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()

    train(1)  # creates the optimizer state that every checkpoint carries
    root = Path(tempfile.mkdtemp(prefix="tsdia-ckpt-bench-"))
    blocked: dict[str, list[float]] = {"sync": [], "async": []}
    step = 0
    try:
        checkpointers = {}
        for mode in ("sync", "async"):
            save_dir = root / mode
            (save_dir / "checkpoints").mkdir(parents=True)
            config = CheckpointConfig(save_dir=str(save_dir), async_save=mode == "async", save_total_limit=2)
            checkpointers[mode] = Checkpointer(
                accelerator, save_dir, config, deepspeed=False, resume_from=None
            )
        for round_ in range(args.rounds + 1):  # round 0 warms up both modes
            for mode, checkpointer in checkpointers.items():
                train(args.steps_between)
                step += 1
                started = time.perf_counter()
                checkpointer.save(model, 0, step, {}, {"global_step": step}, final=False)
                took = time.perf_counter() - started
                if round_:
                    blocked[mode].append(took)
                print(f"round {round_} {mode:5s} save blocked the loop {took:.3f} s", flush=True)
        for checkpointer in checkpointers.values():
            checkpointer.commit_pending()
        size = sum(
            f.stat().st_size for f in next((root / "sync").glob("checkpoint-*")).rglob("*") if f.is_file()
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    sync, background = statistics.median(blocked["sync"]), statistics.median(blocked["async"])
    print(f"model: {n_params / 1e6:.0f}M parameters, checkpoint {size / 1e9:.2f} GB")
    print(f"median blocking per save: sync {sync:.3f} s, async {background:.3f} s")
    print(f"ratio async/sync blocking: {background / sync:.3f} (goal <= 0.1)")


if __name__ == "__main__":
    main()
