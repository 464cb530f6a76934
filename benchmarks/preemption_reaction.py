"""Preemption reaction: SIGUSR2 to a training process -> process exited with a new checkpoint on disk.

    python benchmarks/preemption_reaction.py [--runs 3] [--d-model 768] [--layers 4]

Goal: close to 1x a plain `accelerator.save_state` of the same state (read as <= 1.5x), and far inside
Slurm's signal lead time (`slurm.signal_lead_s`, 120 s by default).

- **tsdia**: `python -m tsdia.train configs/example.yml ...` (TensorBoard and offline WandB on, as in the
  example) with a larger TargetSpeakerVAD (default d_model 768, 4 layers: ~29M parameters, ~350 MB of
  checkpoint with AdamW's moments) so the checkpoint, not start-up noise, is what a reaction is made of;
  batch 1 of 10 frames keeps a step short. After the first interval checkpoint (step k, default 3), as
  soon as step k + 1 has begun (the model, `bench_plugins.MarkerTSVAD`, writes a marker file in that
  step's forward) the benchmark sends SIGUSR2 and times until the process has exited; it then checks
  the exit code (4: stopped and saved, outside Slurm) and that the checkpoint of step k + 1 is complete. The reaction holds: the rest of the step in flight (one process checks the flag after every
  step; with several ranks they agree every `training.preemption.check_interval` steps, so up to that
  many steps more), the collective save (fsynced, manifest, rename), recording the attempt, closing the
  trackers (WandB's finish), the tee and the interpreter's exit.
- **plain save** (the baseline): a separate process builds the same model, optimizer, scheduler and
  Accelerator, takes one step, saves once to warm up (the signalled save is tsdia's second save too),
  `os.sync()`s (tsdia fsyncs each checkpoint, so its next save starts without dirty pages), then
  times one `accelerator.save_state(dir, safe_serialization=True)`. Also reported (information):
  the time from that save's start until the plain process has exited, since the interpreter's own
  teardown after a save (torch's, with the model in memory) is part of any job's reaction.

Runs are interleaved (tsdia, plain, tsdia, plain, ...) and the medians compared. Threads are pinned to 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    EXAMPLE_CONFIG,
    child_env,
    component_kwargs,
    example_sections,
    fmt_runs,
    median,
    ratio_line,
)

SIGNAL_LEAD_S = 120  # slurm.signal_lead_s's default
EXIT_STOPPED = 4  # tsdia.errors.EXIT_STOPPED: stopped and saved, not requeued (no Slurm job)


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = component_kwargs(example_sections()["model"])
    kwargs.update(d_model=args.d_model, num_layers=args.layers, num_heads=args.heads)
    return kwargs


def tsdia_run(args: argparse.Namespace, tmp: Path, index: int) -> dict[str, float]:
    save_dir = tmp / f"tsdia-{index}"
    interval = args.checkpoint_interval
    marker = tmp / f"tsdia-{index}.marker.json"
    overrides = [
        "model.target=bench_plugins:MarkerTSVAD",
        f"model.mark_at_call={interval + 1}",
        f"model.d_model={args.d_model}",
        f"model.num_layers={args.layers}",
        f"model.num_heads={args.heads}",
        f"dataset.num_frames={args.frames}",
        f"training.batch_size={args.batch_size}",
        f"training.checkpoint.interval={interval}",
        "training.logging.wandb_mode=offline",
        f"training.checkpoint.save_dir={save_dir}",
        *args.override,
    ]
    cmd = [sys.executable, "-m", "tsdia.train", str(EXAMPLE_CONFIG), *overrides]
    log = tmp / f"tsdia-{index}.log"
    env = child_env(tmp, 1, BENCH_TIMING_FILE=str(marker))
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not marker.exists():  # step interval + 1 has begun: the first checkpoint is complete
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                sys.exit(
                    f"tsdia never began step {interval + 1} (exit {proc.poll()}):\n{log.read_text()[-4000:]}"
                )
            time.sleep(0.002)
        sent = time.perf_counter()
        proc.send_signal(signal.SIGUSR2)
        code = proc.wait(timeout=600)
        reaction = time.perf_counter() - sent
    text = log.read_text(errors="replace")
    if code != EXIT_STOPPED:
        sys.exit(f"tsdia exited {code}, expected {EXIT_STOPPED} (stopped and saved):\n{text[-4000:]}")
    from tsdia.experiment.checkpoints import latest_checkpoint, read_manifest

    latest = latest_checkpoint(save_dir)
    manifest = read_manifest(latest) if latest else None
    if manifest is None or manifest.step != interval + 1:
        sys.exit(f"no complete checkpoint of step {interval + 1} in {save_dir}:\n{text[-4000:]}")
    saves = re.findall(r"Saved (checkpoint-\S+) in ([0-9.]+)s", text)
    in_process_save = float(saves[-1][1]) if saves else float("nan")
    step_s = float(json.loads(marker.read_text()).get("step_s", float("nan")))
    return {"reaction_s": reaction, "save_s": in_process_save, "stop_step": manifest.step, "step_s": step_s}


def plain_child(settings_path: Path) -> None:
    """The baseline process: same state, one warm-up save, then one timed `save_state`."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from bench_plugins import pin_threads

    from tsdia.examples.tsvad import TargetSpeakerVAD, build_datasets

    s = json.loads(settings_path.read_text())
    pin_threads()
    set_seed(s["seed"])
    model = TargetSpeakerVAD(**s["model"])
    train_set, _ = build_datasets(**s["dataset"])
    loader = torch.utils.data.DataLoader(train_set, batch_size=s["batch_size"], shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    accelerator = Accelerator(cpu=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)
    loss = model(next(iter(loader)))["loss"]
    accelerator.backward(loss)
    optimizer.step()
    scheduler.step()
    out = settings_path.parent
    accelerator.save_state(str(out / "warm-up"), safe_serialization=True)
    # tsdia fsyncs every checkpoint, so its signalled save starts with no dirty pages from the previous one;
    # start the timed plain save from the same clean state (else it races the warm-up's writeback).
    os.sync()
    started_epoch, started = time.time(), time.perf_counter()
    accelerator.save_state(str(out / "timed"), safe_serialization=True)
    took = time.perf_counter() - started
    (out / "save.json").write_text(json.dumps({"save_s": took, "started_epoch_s": started_epoch}))


def plain_run(args: argparse.Namespace, tmp: Path, index: int) -> tuple[float, float]:
    """(save_state seconds, seconds from the save's start to the process's exit)."""
    example = example_sections()
    out = tmp / f"plain-{index}"
    out.mkdir()
    settings = {
        "model": model_kwargs(args),
        "dataset": {**component_kwargs(example["dataset"]), "num_frames": args.frames},
        "batch_size": args.batch_size,
        "seed": example["training"]["seed"],
        "lr": float(example["training"]["optimizer"]["lr"]),
    }
    (out / "settings.json").write_text(json.dumps(settings))
    cmd = [sys.executable, __file__, "--child-settings", str(out / "settings.json")]
    proc = subprocess.run(cmd, env=child_env(tmp, 1), capture_output=True, text=True)
    exited = time.time()
    if proc.returncode != 0:
        sys.exit(f"plain save child failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = json.loads((out / "save.json").read_text())
    return result["save_s"], exited - result["started_epoch_s"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each, interleaved")
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--checkpoint-interval", type=int, default=3, help="the first checkpoint's step")
    parser.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE", help="extra tsdia-train override"
    )
    parser.add_argument("--child-settings", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_settings:
        plain_child(Path(args.child_settings))
        return

    reactions: list[float] = []
    tsdia_saves: list[float] = []
    step_times: list[float] = []
    plain_saves: list[float] = []
    plain_exits: list[float] = []
    print(
        f"TargetSpeakerVAD d_model={args.d_model} layers={args.layers}, batch {args.batch_size} x "
        f"{args.frames} frames, signal after the step-{args.checkpoint_interval} checkpoint, {args.runs} runs",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="tsdia-bench-preempt-") as tmp_name:
        tmp = Path(tmp_name)
        for r in range(args.runs):
            result = tsdia_run(args, tmp, r)
            reactions.append(result["reaction_s"])
            tsdia_saves.append(result["save_s"])
            step_times.append(result["step_s"])
            plain_save, plain_exit = plain_run(args, tmp, r)
            plain_saves.append(plain_save)
            plain_exits.append(plain_exit)
            print(
                f"  run {r + 1}/{args.runs}: reaction {result['reaction_s']:.2f} s (stopped at step "
                f"{result['stop_step']:.0f}; tsdia's save inside it {result['save_s']:.2f} s), "
                f"plain save_state {plain_save:.2f} s ({plain_exit:.2f} s to its exit)",
                flush=True,
            )
            for path in tmp.glob("*-[0-9]*"):  # checkpoints are large: keep the disk use of one run
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
    reaction, plain = median(reactions), median(plain_saves)
    print(f"signal -> exited, checkpoint on disk: median {reaction:.2f} s  {fmt_runs(reactions)}")
    print(
        f"  of which tsdia's save (its log):    median {median(tsdia_saves):.2f} s  {fmt_runs(tsdia_saves)}"
    )
    print(f"  and the step in flight, at most:    median {median(step_times):.2f} s  {fmt_runs(step_times)}")
    print(f"plain accelerator.save_state:       median {plain:.2f} s  {fmt_runs(plain_saves)}")
    print(f"plain save_state, then exit:        median {median(plain_exits):.2f} s  {fmt_runs(plain_exits)}")
    # The plain process's exit (interpreter teardown: ~0.5 s for `import torch` alone here, more with a
    # large model in memory) is a cost any PyTorch job pays after its last save; tsdia's reaction has it too.
    print(ratio_line("reaction/(plain save + exit)", "info", reaction / median(plain_exits)))
    print(ratio_line(f"reaction/signal lead {SIGNAL_LEAD_S} s", "< 1x", reaction / SIGNAL_LEAD_S))
    print(ratio_line("reaction/plain save", "<= 1.5x", reaction / plain))


if __name__ == "__main__":
    main()
