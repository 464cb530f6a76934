"""How long an interval checkpoint blocks the training loop: synchronous vs `checkpoint.async_save`.

A ~100M-parameter model with AdamW state (~1.2 GB per checkpoint) trains (on CPU, or on the GPU with
`--device cuda`); every few steps tsdia's `Checkpointer` saves. We time the `save()` call itself, which is
what the loop waits for: the whole write when synchronous; the copy of the state into the reused host
buffers (plus committing the previous background write) when asynchronous. Modes are interleaved within
one process (same memory, same disk), several rounds, and the median per mode is compared. The floor is
the pure copy of the same tensors (model and optimizer state) into preallocated host buffers, pinned on a
GPU: the device-to-host bandwidth. Ratios printed: async/sync (goal <= 0.1) and async/copy (goal <= 1.5
on a GPU; on CPU it is a memcpy and shown for information).

    .venv/bin/python benchmarks/checkpoint_blocking.py [--rounds 3] [--params-m 100] [--device cuda]
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
from common import ratio_line

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
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU")
    accelerator = Accelerator(cpu=not cuda)
    model = build(args.params_m)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = torch.randn(16, 2048, device=accelerator.device)
    n_params = sum(p.numel() for p in model.parameters())

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def train(steps: int) -> None:
        for _ in range(steps):
            model(batch).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        sync()  # the save starts from an idle device, as the time of the copy alone does

    def state_tensors() -> list[torch.Tensor]:
        opt = [t for s in optimizer.state_dict()["state"].values() for t in s.values() if torch.is_tensor(t)]
        return [*model.state_dict().values(), *opt]

    def time_copy(buffers: list[torch.Tensor]) -> float:
        started = time.perf_counter()
        for buffer, tensor in zip(buffers, state_tensors(), strict=True):
            buffer.copy_(tensor, non_blocking=cuda)
        sync()
        return time.perf_counter() - started

    train(1)  # creates the optimizer state that every checkpoint carries
    root = Path(tempfile.mkdtemp(prefix="tsdia-ckpt-bench-"))
    blocked: dict[str, list[float]] = {"sync": [], "async": [], "copy": []}
    # The floor: the same tensors into preallocated host buffers (pinned when they come from a GPU).
    floor_buffers = [torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda) for t in state_tensors()]
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
                if mode == "async":
                    # The background write finishes before anything else is timed (it would slow it down).
                    started = time.perf_counter()
                    checkpointer.commit_pending()
                    waited = time.perf_counter() - started
                    print(
                        f"round {round_} async write finished {waited:.3f} s later (not blocking)", flush=True
                    )
            took = time_copy(floor_buffers)
            if round_:
                blocked["copy"].append(took)
            print(f"round {round_} copy  of the state to host buffers {took:.3f} s", flush=True)
        host_bytes = checkpointers["async"].buffers.nbytes
        for checkpointer in checkpointers.values():
            checkpointer.commit_pending()
        size = sum(
            f.stat().st_size for f in next((root / "sync").glob("checkpoint-*")).rglob("*") if f.is_file()
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    synchronous, background = statistics.median(blocked["sync"]), statistics.median(blocked["async"])
    copy = statistics.median(blocked["copy"])
    where = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"model: {n_params / 1e6:.0f}M parameters on {where}, checkpoint {size / 1e9:.2f} GB")
    print(f"host buffers held by async_save: {host_bytes / 1e9:.2f} GB{' (pinned)' if cuda else ''}")
    print(
        f"median blocking per save: sync {synchronous:.3f} s, async {background:.3f} s, "
        f"pure copy to host {copy:.3f} s ({(host_bytes / copy) / 1e9:.1f} GB/s)"
    )
    prefix = "gpu " if cuda else ""
    print(ratio_line(f"{prefix}async/sync blocking", "<= 0.1x", background / synchronous))
    print(ratio_line(f"{prefix}async blocking/pure copy", "<= 1.5x" if cuda else "info", background / copy))


if __name__ == "__main__":
    main()
