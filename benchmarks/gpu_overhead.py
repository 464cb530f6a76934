"""On a GPU: steady-state steps/s of tsdia's Trainer vs a bare Accelerate loop, under DDP and ZeRO-2.

    benchmarks/gpu.sh                       # the wrapper: checks, optional DeepSpeed wheel, this script
    python benchmarks/gpu_overhead.py [--rounds 2] [--steps 40] [--d-model 1024] [--layers 16] ...

Goals: tsdia >= 0.98x the bare loop's steps/s in each mode, and <= 1.05x its peak GPU memory.

Both variants are launched by `torchrun --standalone --nproc_per_node <GPUs>` and train the same scaled-up
TargetSpeakerVAD (transformer encoder, default d_model 1024 x 16 layers, ~200M parameters, bf16 autocast,
batch 64 x 512 frames per GPU: several GiB of activations and a GPU-bound step), the same data
(4 DataLoader workers), AdamW, clipping and seed:

- **tsdia**: `python -m tsdia.train configs/example.yml ...` with its log tee, progress bar, loss/lr every
  10 steps, TensorBoard and offline WandB when installed (the table says which), no interval
  checkpoints (a 200M-parameter checkpoint measures the disk, which the CPU benchmarks cover);
  `distributed.deepspeed.zero_stage=2` for the ZeRO-2 row.
- **bare**: `Accelerator(mixed_precision="bf16")` (plus `DeepSpeedPlugin` with the same ZeRO-2 JSON tsdia
  derives), prepare, backward, clip, step, scheduler, `loss.item()` every 10 steps.

"DDP" with one GPU runs world size 1 (the table's `world` and Accelerate's distributed type say what
ran); with several visible GPUs it is real multi-GPU DDP.

Timing: the model (`bench_plugins.TimedTSVAD`) calls `torch.cuda.synchronize()` and reads the clock at the
start of training forward call warmup + 1 and warmup + steps + 1, on rank 0, and writes the result to a
file; the benchmark then kills the run's process group (no final validation or checkpoint is needed).
Runs are interleaved (tsdia and bare alternate, order rotated per round); medians are compared. A time
budget keeps the whole script under 8 minutes: a run starts only if the slowest run so far still fits
in `--budget-s` (400 s), and no run outlives `--hard-limit-s` (430 s); the table says when runs were
skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import EXAMPLE_CONFIG, child_env, example_sections, median, ratio_line

MODES = ("ddp", "zero2")
GOAL = 0.98
MEMORY_GOAL = 1.05


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def settings(args: argparse.Namespace, world: int, cuda: bool) -> dict[str, Any]:
    example = example_sections()
    total = args.warmup + args.steps + 1
    return {
        "model": {
            "feat_dim": example["model"]["feat_dim"],
            "emb_dim": example["model"]["emb_dim"],
            "encoder": "transformer",
            "d_model": args.d_model,
            "num_layers": args.layers,
            "num_heads": args.heads,
            "dropout": 0.1,
            "timing_warmup": args.warmup,
            "timing_steps": args.steps,
        },
        "dataset": {
            "num_frames": args.frames,
            "num_train": (total + 2) * args.batch_size * world,
            "num_val": 64,
            "feat_dim": example["dataset"]["feat_dim"],
            "emb_dim": example["dataset"]["emb_dim"],
        },
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "seed": example["training"]["seed"],
        "lr": 3e-4,
        "max_grad_norm": 1.0,
        "total_steps": total,
        "log_interval": 10,
        "mixed_precision": "bf16" if cuda else "no",
        "world": world,
    }


def deepspeed_json(s: dict[str, Any]) -> dict[str, Any]:
    """What tsdia's `distributed.deepspeed.zero_stage: 2` produces for these settings."""
    return {
        "train_micro_batch_size_per_gpu": s["batch_size"],
        "gradient_accumulation_steps": 1,
        "train_batch_size": s["batch_size"] * s["world"],
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": s["mixed_precision"] == "bf16"},
        "fp16": {"enabled": False},
        "gradient_clipping": s["max_grad_norm"],
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def torchrun(world: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]


def tsdia_command(s: dict[str, Any], mode: str, save_dir: Path, trackers: dict[str, bool]) -> list[str]:
    m, d = s["model"], s["dataset"]
    overrides = {
        "model.target": "bench_plugins:TimedTSVAD",
        **{f"model.{k}": v for k, v in m.items()},
        **{f"dataset.{k}": v for k, v in d.items()},
        "training.batch_size": s["batch_size"],
        "training.num_workers": s["num_workers"],
        "training.mixed_precision": f"'{s['mixed_precision']}'",  # quoted: YAML reads a bare no as false
        "training.max_grad_norm": s["max_grad_norm"],
        "training.optimizer.lr": s["lr"],
        "training.max_steps": s["total_steps"],
        "training.checkpoint.interval": "null",
        "training.logging.interval": s["log_interval"],
        "training.logging.tensorboard": trackers["tensorboard"],
        "training.logging.wandb": trackers["wandb"],
        "training.logging.wandb_mode": "offline",
        "training.checkpoint.save_dir": str(save_dir),
    }
    if mode == "zero2":
        overrides["distributed.deepspeed.zero_stage"] = 2
    rendered = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items()]
    return [*torchrun(s["world"]), "-m", "tsdia.train", str(EXAMPLE_CONFIG), *rendered]


def child_bare(s: dict[str, Any], mode: str) -> None:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, set_seed
    from bench_plugins import TimedTSVAD

    from tsdia.examples.tsvad import build_datasets

    set_seed(s["seed"])
    model = TimedTSVAD(**s["model"])
    train_set, _ = build_datasets(**s["dataset"])
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=s["batch_size"],
        shuffle=True,
        num_workers=s["num_workers"],
        generator=torch.Generator().manual_seed(s["seed"]),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    cuda = torch.cuda.is_available()
    plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_json(s)) if mode == "zero2" else None
    handlers = [] if cuda or plugin is None else [InitProcessGroupKwargs(backend="gloo")]  # CPU test mode
    accelerator = Accelerator(
        cpu=not cuda and plugin is None,
        mixed_precision=s["mixed_precision"],
        deepspeed_plugin=plugin,
        kwargs_handlers=handlers,
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)
    model.train()
    step = 0
    while step < s["total_steps"]:
        for batch in loader:
            loss = model(batch)["loss"]
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), s["max_grad_norm"])
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            step += 1
            if step % s["log_interval"] == 0 and accelerator.is_main_process:
                print(f"step {step} loss {loss.item():.4f}", flush=True)
            if step >= s["total_steps"]:
                break


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`, from /proc (no psutil needed on the GPU machine)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL a run: its process group and every descendant (torchrun starts each rank in a new session)."""
    tree = descendants(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for child in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(c) for c in tree):
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


RUNNING: set[int] = set()  # process ids of runs in flight, killed if this script is stopped


def _stop(signum: int, frame: Any) -> None:
    for pid in list(RUNNING):
        kill_tree(pid)
    sys.exit(f"stopped by signal {signal.Signals(signum).name}; the run in flight was killed")


def run_one(cmd: list[str], env: dict[str, str], log: Path, timing: Path, timeout_s: float) -> dict[str, Any]:
    """Start `cmd` in its own process group; once the window's timing is written, kill the group."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        RUNNING.add(proc.pid)
        deadline = time.monotonic() + timeout_s
        try:
            while not timing.exists():
                if proc.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    return {"error": f"timed out after {timeout_s:.0f} s (log: {log})"}
                time.sleep(0.2)
        finally:
            kill_tree(proc.pid)
            proc.wait()
            RUNNING.discard(proc.pid)
    if not timing.exists():
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower() and "elastic" not in ln][-3:]
        tail = "\n    ".join(errors or lines[-8:])
        return {"error": f"exited {proc.returncode} without timing (log: {log}):\n    {tail}"}
    result: dict[str, Any] = json.loads(timing.read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2, help="runs of each variant per mode, interleaved")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64, help="per GPU")
    parser.add_argument("--frames", type=int, default=512, help="sequence length (at most 512)")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--budget-s", type=float, default=400, help="stop starting runs after this long")
    parser.add_argument("--run-timeout-s", type=float, default=240, help="one run's limit")
    parser.add_argument(
        "--hard-limit-s", type=float, default=430, help="no run outlives this (from the start)"
    )
    parser.add_argument("--keep", metavar="DIR", help="keep logs and experiment directories in DIR")
    parser.add_argument("--allow-cpu", action="store_true", help="test the script's plumbing without a GPU")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--child-settings", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_bare(json.loads(Path(args.child_settings).read_text()), args.child)
        return

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if not 1 <= args.frames <= 512:
        parser.error("--frames: TargetSpeakerVAD's positions cover at most 512 frames")
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        sys.exit(
            f"gpu_overhead.py needs a CUDA GPU, and torch {torch.__version__} (CUDA build: "
            f"{torch.version.cuda}) sees none. Run it on a GPU machine (see BENCHMARKS.md), or pass "
            "--allow-cpu to test the plumbing with a tiny model."
        )
    world = torch.cuda.device_count() if cuda else 1
    if not cuda:
        print("--allow-cpu: a plumbing test on CPU, not a measurement")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    skipped: dict[str, str] = {}
    if "zero2" in modes:
        missing = [m for m in ("deepspeed", "transformers") if not have(m)]
        if missing:
            skipped["zero2"] = f"not installed: {', '.join(missing)} (see BENCHMARKS.md: WHEELS=...)"
    trackers = {"tensorboard": have("tensorboard"), "wandb": have("wandb")}
    s = settings(args, world, cuda)
    device = torch.cuda.get_device_name() if cuda else "CPU"
    print(
        f"{device} x{world}; torch {torch.__version__}; TargetSpeakerVAD transformer d_model={args.d_model} "
        f"layers={args.layers}, batch {args.batch_size} x {args.frames} frames per GPU, {s['mixed_precision']}; "
        f"{args.steps} timed steps after {args.warmup}; tsdia trackers: "
        f"{', '.join(k for k, v in trackers.items() if v) or 'none installed'}",
        flush=True,
    )
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    errors: dict[tuple[str, str], str] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tsdia-bench-gpu-") as tmp_name:
        tmp = Path(args.keep or tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        env = child_env(tmp, None if cuda else 1)
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
        spec = tmp / "settings.json"
        spec.write_text(json.dumps(s))
        budget_hit = False
        durations: dict[tuple[str, str], float] = {}
        for r in range(args.rounds):
            for mode in modes:
                if mode in skipped:
                    continue
                for variant in ("tsdia", "bare") if r % 2 == 0 else ("bare", "tsdia"):
                    key = (mode, variant)
                    if key in errors:
                        continue
                    elapsed = time.monotonic() - started
                    # Start a run only if one like it (the slowest so far) still fits in the budget.
                    if elapsed + max(durations.values(), default=0.0) > args.budget_s:
                        budget_hit = True
                        continue
                    out = tmp / f"{mode}-{variant}-{r}"
                    out.mkdir()
                    timing = out / "timing.json"
                    if variant == "tsdia":
                        cmd = tsdia_command(s, mode, out / "exp", trackers)
                    else:
                        cmd = [*torchrun(world), __file__, "--child", mode, "--child-settings", str(spec)]
                    timeout = min(args.run_timeout_s, args.hard_limit_s - elapsed)
                    run_started = time.monotonic()
                    res = run_one(
                        cmd, {**env, "BENCH_TIMING_FILE": str(timing)}, out / "output.log", timing, timeout
                    )
                    durations[key] = max(durations.get(key, 0.0), time.monotonic() - run_started)
                    if "error" in res:
                        errors[key] = res["error"]
                        print(f"  {mode} {variant}: FAILED: {res['error']}", flush=True)
                        continue
                    results.setdefault(key, []).append(res)
                    print(
                        f"  round {r + 1} {mode:5s} {variant:5s} {res['steps'] / res['window_s']:8.3f} steps/s "
                        f"peak {res.get('peak_mem_gib', 0):.1f} GiB ({res.get('distributed_type')}, "
                        f"world {res.get('world_size')}) [{time.monotonic() - started:.0f} s]",
                        flush=True,
                    )
    print()
    header = f"{'mode':6s} {'world':>5s} {'dist type':>10s} {'bare st/s':>10s} {'tsdia st/s':>10s} {'tsdia/bare':>10s} {'goal':>7s} {'met?':>5s} {'peak GiB':>8s}  runs"
    print(header)
    ratios: list[tuple[str, float]] = []
    for mode in modes:
        if mode in skipped:
            print(f"{mode:6s} skipped: {skipped[mode]}")
            continue
        bare, tsdia = results.get((mode, "bare"), []), results.get((mode, "tsdia"), [])
        if not bare or not tsdia:
            why = errors.get((mode, "tsdia")) or errors.get((mode, "bare")) or "time budget"
            print(f"{mode:6s} not measured: {why.splitlines()[0]}")
            continue
        b = median([x["steps"] / x["window_s"] for x in bare])
        t = median([x["steps"] / x["window_s"] for x in tsdia])
        ratio = t / b
        ratios.append((mode, ratio))
        peak = max(x.get("peak_mem_gib", 0.0) for x in bare + tsdia)
        print(
            f"{mode:6s} {tsdia[0].get('world_size', world)!s:>5s} {tsdia[0].get('distributed_type', '?'):>10s} "
            f"{b:10.3f} {t:10.3f} {ratio:9.3f}x {'>=' + str(GOAL):>7s} {'yes' if ratio >= GOAL else 'NO':>5s} "
            f"{peak:8.1f}  {len(bare)}+{len(tsdia)}"
        )
    if budget_hit:
        print(f"(the {args.budget_s:.0f} s budget stopped some runs: fewer runs than --rounds)")
    for mode, ratio in ratios:
        print(ratio_line(f"gpu {mode} tsdia/bare", f">= {GOAL}x", ratio))
    for mode, _ in ratios:  # peak GPU memory (torch.cuda.max_memory_allocated on rank 0), tsdia over bare
        bare_peak = median([x.get("peak_mem_gib", 0.0) for x in results[(mode, "bare")]])
        tsdia_peak = median([x.get("peak_mem_gib", 0.0) for x in results[(mode, "tsdia")]])
        if bare_peak > 0:
            print(
                ratio_line(f"gpu {mode} peak memory tsdia/bare", f"<= {MEMORY_GOAL}x", tsdia_peak / bare_peak)
            )
        else:
            print(f"{mode}: no peak GPU memory measured (not on a GPU)")
    if not ratios:
        sys.exit("no mode was measured")


if __name__ == "__main__":
    main()
