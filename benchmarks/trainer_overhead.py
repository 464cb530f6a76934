"""Steady-state optimizer steps/s: tsdia's Trainer vs a bare Accelerate loop vs PyTorch Lightning.

    python benchmarks/trainer_overhead.py [--runs 3] [--warmup 10] [--steps 100] [--threads 1]

Goal: tsdia >= 0.98x the bare loop, and ahead of Lightning.

Every variant trains the same model (configs/example.yml's TargetSpeakerVAD), on the same synthetic data,
batch size, optimizer (AdamW, cosine schedule), gradient clipping, seed and number of steps, each in a
fresh process with the same pinned thread count (`OMP_NUM_THREADS`, `torch.set_num_threads`):

- **tsdia**: `python -m tsdia.train configs/example.yml ...`, the real command: console tee into the log
  file, TensorBoard and WandB (offline, files in a temp dir), tqdm bar, loss/lr logged every
  `--log-interval` steps, atomic named checkpoints every `--checkpoint-interval` steps with rotation.
- **bare**: a plain Accelerate loop (`Accelerator(cpu=True)`, prepare, backward, clip, step, scheduler),
  printing `loss.item()` every `--log-interval` steps and `accelerator.save_state` at the same interval.
- **lightning**: `lightning.Trainer` with TensorBoardLogger + WandbLogger (offline), a LearningRateMonitor,
  ModelCheckpoint every `--checkpoint-interval` steps, the progress bar and `gradient_clip_val`.

How steady state is measured: the model itself (`bench_plugins.TimedTSVAD`, or `TimedMLP` with
`--small`, loaded into every variant) reads `time.perf_counter()` at the start of the first training
forward call after `warmup` steps and `steps` calls later. In the variants that log to WandB the window
waits until WandB has started: tsdia starts its trackers in a background thread after the first step,
and importing wandb and `wandb.init` (seconds of CPU) is start-up, which the others pay before their
first step; every run has `--slack` extra steps for that wait. The window holds exactly `steps` whole
optimizer steps, with their data loading, logging and the checkpoints that fall inside it (at the
default settings two), and excludes start-up (imports, tracker init, the first steps' warm-up) and the
end (final validation and checkpoint, tracker shutdown). steps/s = steps / window.

Runs are interleaved (round r runs every variant once, in an order rotated by r) so a slow spell of
this shared machine hits every variant alike; the median of each variant's runs is reported. Other
people's jobs on a shared machine take the core away in spells of seconds, which can cost a run 30%.
Every variant is compute-bound on one thread, so its process tree (including wandb's service) uses
about one core's worth of CPU time over the window when the machine leaves it alone; a run whose
CPU time / wall time falls below `--min-cpu-share` (0.9) was disturbed and is rerun (at most
`--retries` times; the count is printed). tsdia's own waits (a whole checkpoint save, fsync included,
takes 10-20 ms here) are far below that threshold. Steps per CPU-second are reported too (of the
process tree, of the training process, of its training thread): figures that load on the machine
disturbs less than wall time, though a neighbour can still slow the work itself. Threads
default to 1: on a 2-core machine where the trackers' helper processes (wandb's service) and the tee's
thread need a core too, 2 torch threads would measure CPU oversubscription, not the kit; on a GPU
node those helpers run on otherwise idle cores.

Extra variants (`--variants`): `tsdia-quiet` (tsdia without trackers and progress bar: splits the cost
up), `tsdia-unseeded` (without the per-sample RNG seeding that makes on-the-fly augmentation exact: its
cost per step is the batch size times the per-sample cost, see `dataloader_seeding.py`) and `bare-again` (a second, identical bare loop: an A/A test that shows how far apart two identical
variants land on this machine, i.e. the resolution of the ratio).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
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
    run_logged,
)

VARIANTS = ("bare", "tsdia", "lightning")
# tsdia-quiet: tsdia without trackers or progress bar (splits the cost up); tsdia-unseeded: tsdia without
# the per-sample RNG seeding (training.dataloader.seed_samples: false); bare-again: a second, identical
# bare loop (an A/A test: how far apart two identical variants land on this machine).
EXTRA_VARIANTS = ("tsdia-quiet", "tsdia-unseeded", "bare-again")
# --small: a 3-layer MLP on precomputed tensors (bench_plugins.TimedMLP, tensor_datasets): a step of
# ~1-2 ms on one thread, where the loop's own per-step costs show (GPU-like step times).
SMALL_MODEL = {"features": 64, "hidden": 256, "outputs": 8}
SMALL_BATCH = 16


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the variants share, from configs/example.yml plus the command line."""
    example = example_sections()
    training = example["training"]
    # The window closes in the forward of step (start + steps); it starts after the warm-up, and for variants
    # with WandB once WandB has started (tsdia starts it in the background): --slack steps leave room.
    total = args.warmup + args.steps + 1 + args.slack
    if args.small:  # the loop's own per-step costs dominate
        model_target, model = "bench_plugins:TimedMLP", dict(SMALL_MODEL)
        dataset_target = "bench_plugins:tensor_datasets"
        dataset = {"features": SMALL_MODEL["features"], "outputs": SMALL_MODEL["outputs"], "num_train": 0}
        batch_size = SMALL_BATCH
    else:  # the example model; one epoch covers every step, so no epoch end (validation) is in the window
        model_target, model = "bench_plugins:TimedTSVAD", component_kwargs(example["model"])
        dataset_target, dataset = example["dataset"]["target"], component_kwargs(example["dataset"])
        batch_size = training["batch_size"]
    dataset["num_train"] = max(dataset["num_train"], (total + 1) * batch_size)
    return {
        "model_target": model_target,
        "dataset_target": dataset_target,
        "model": {
            **model,
            "timing_warmup": args.warmup,
            "timing_steps": args.steps,
        },
        "dataset": dataset,
        "batch_size": batch_size,
        "seed": training["seed"],
        "lr": float(training["optimizer"]["lr"]),
        "weight_decay": float(training["optimizer"].get("weight_decay", 0.01)),
        "warmup_steps": training["scheduler"]["warmup_steps"],
        "epochs": training["epochs"],
        "max_grad_norm": training["max_grad_norm"],
        "total_steps": total,
        "checkpoint_interval": args.checkpoint_interval,
        "log_interval": args.log_interval,
    }


def tsdia_command(s: dict[str, Any], save_dir: Path, quiet: bool, seeded: bool = True) -> list[str]:
    overrides = {  # whole sections: the example's dataset keys do not fit another dataset target
        "model": json.dumps({"target": s["model_target"], **s["model"]}),
        "dataset": json.dumps({"target": s["dataset_target"], **s["dataset"]}),
        "training.batch_size": s["batch_size"],
        "training.max_steps": s["total_steps"],
        "training.checkpoint.interval": s["checkpoint_interval"] or "null",
        "training.logging.interval": s["log_interval"],
        "training.logging.tensorboard": not quiet,
        "training.logging.wandb": not quiet,
        "training.logging.wandb_mode": "offline",
        "training.logging.progress_bar": not quiet,
        "training.dataloader.seed_samples": seeded,
        "training.checkpoint.save_dir": str(save_dir),
    }
    rendered = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items()]
    return [sys.executable, "-m", "tsdia.train", str(EXAMPLE_CONFIG), *rendered]


def lr_multiplier(s: dict[str, Any]) -> Any:
    """Linear warm-up then cosine over the schedule's epochs, as configs/example.yml asks for."""
    steps_per_epoch = math.ceil(s["dataset"]["num_train"] / s["batch_size"])
    schedule = steps_per_epoch * s["epochs"]
    warm = s["warmup_steps"]

    def multiplier(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, schedule - warm))))

    return multiplier


def build_common(s: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    import torch
    from accelerate.utils import set_seed

    from tsdia.config.schema import ConfigSource
    from tsdia.training.components import load_target

    set_seed(s["seed"])
    model = load_target(s["model_target"], "model.target", ConfigSource())(**s["model"])
    train_set, _ = load_target(s["dataset_target"], "dataset.target", ConfigSource())(**s["dataset"])
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=s["batch_size"],
        shuffle=True,
        generator=torch.Generator().manual_seed(s["seed"]),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(s))
    return model, loader, optimizer, scheduler


def child_bare(s: dict[str, Any], out_dir: Path) -> None:
    from accelerate import Accelerator

    model, loader, optimizer, scheduler = build_common(s)
    accelerator = Accelerator(cpu=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)
    step = 0
    model.train()
    while step < s["total_steps"]:
        for batch in loader:
            loss = model(batch)["loss"]
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), s["max_grad_norm"])
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            step += 1
            if step % s["log_interval"] == 0:
                print(f"step {step} loss {loss.item():.4f} lr {scheduler.get_last_lr()[0]:.2e}", flush=True)
            if s["checkpoint_interval"] and step % s["checkpoint_interval"] == 0:
                accelerator.save_state(str(out_dir / f"checkpoint-{step}"), safe_serialization=True)
            if step >= s["total_steps"]:
                break


def child_lightning(s: dict[str, Any], out_dir: Path) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    model, loader, optimizer, scheduler = build_common(s)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss: torch.Tensor = self.model(batch)["loss"]
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self) -> Any:
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    callbacks: list[Any] = [LearningRateMonitor(logging_interval="step")]
    if s["checkpoint_interval"]:
        callbacks.append(
            ModelCheckpoint(
                dirpath=str(out_dir / "checkpoints"),
                every_n_train_steps=s["checkpoint_interval"],
                save_top_k=-1,
            )
        )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=s["total_steps"],
        logger=[
            TensorBoardLogger(str(out_dir), name="tensorboard"),
            WandbLogger(project="bench", save_dir=str(out_dir), offline=True),
        ],
        callbacks=callbacks,
        enable_checkpointing=bool(s["checkpoint_interval"]),
        log_every_n_steps=s["log_interval"],
        gradient_clip_val=s["max_grad_norm"],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=True,
        enable_model_summary=True,
    )
    trainer.fit(Module(), train_dataloaders=loader)


def run_variant(variant: str, s: dict[str, Any], tmp: Path, index: int, threads: int) -> dict[str, Any]:
    out_dir = tmp / f"{variant}-{index}"
    out_dir.mkdir()
    timing = out_dir / "timing.json"
    env = child_env(tmp, threads, BENCH_TIMING_FILE=str(timing))
    if variant in ("tsdia", "tsdia-unseeded", "lightning"):  # the variants that log to WandB
        env["BENCH_WAIT_FOR_WANDB"] = "1"
    if variant.startswith("tsdia"):
        cmd = tsdia_command(
            s, out_dir / "exp", quiet=variant == "tsdia-quiet", seeded=variant != "tsdia-unseeded"
        )
    else:
        spec = out_dir / "settings.json"
        spec.write_text(json.dumps(s))
        child = "bare" if variant == "bare-again" else variant
        cmd = [sys.executable, __file__, "--child", child, "--child-settings", str(spec)]
    run_logged(cmd, env, out_dir / "output.log", cwd=out_dir)
    if not timing.exists():
        sys.exit(f"{variant}: the model wrote no timing (see {out_dir / 'output.log'})")
    result: dict[str, Any] = json.loads(timing.read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each variant, interleaved")
    parser.add_argument("--warmup", type=int, default=10, help="steps before the timed window")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps in the timed window")
    parser.add_argument(
        "--slack",
        type=int,
        help="extra steps in every run, so the window can wait for WandB's start (default: 3000 with --small, "
        "else 100)",
    )
    parser.add_argument("--checkpoint-interval", type=int, default=50, help="0: no interval checkpoints")
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch/OMP threads in every variant")
    parser.add_argument(
        "--small", action="store_true", help="a tiny model: ~1-2 ms steps (per-step overhead)"
    )
    parser.add_argument(
        "--min-cpu-share",
        type=float,
        default=0.9,
        help="a run whose process tree got less of a core than this was disturbed by other load: rerun it",
    )
    parser.add_argument("--retries", type=int, default=2, help="reruns of a disturbed run (then it is kept)")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, from {', '.join(VARIANTS + EXTRA_VARIANTS)} (bare is required)",
    )
    parser.add_argument("--keep", metavar="DIR", help="keep every run's files (logs, checkpoints) in DIR")
    parser.add_argument("--child", choices=("bare", "lightning"), help=argparse.SUPPRESS)
    parser.add_argument("--child-settings", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        s = json.loads(Path(args.child_settings).read_text())
        out_dir = Path(args.child_settings).parent
        (child_bare if args.child == "bare" else child_lightning)(s, out_dir)
        return

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS + EXTRA_VARIANTS)
    if unknown or "bare" not in variants:
        parser.error(f"--variants: need bare, and only {VARIANTS + EXTRA_VARIANTS}; got {variants}")
    if "lightning" in variants:
        try:
            import lightning  # noqa: F401
        except ImportError:
            print("lightning is not installed (pip install lightning): measuring without it")
            variants.remove("lightning")
    if args.slack is None:
        args.slack = 3000 if args.small else 100
    s = settings(args)
    print(
        f"{args.steps} timed steps after {args.warmup} warm-up steps, batch {s['batch_size']}, "
        f"checkpoint every {args.checkpoint_interval or 'never'}, log every {args.log_interval}, "
        f"{args.threads} thread(s), {args.runs} interleaved runs per variant",
        flush=True,
    )
    rates: dict[str, list[float]] = {v: [] for v in variants}
    cpu_rates: dict[str, list[float]] = {v: [] for v in variants}
    main_rates: dict[str, list[float]] = {v: [] for v in variants}
    thread_rates: dict[str, list[float]] = {v: [] for v in variants}
    helper_shares: dict[str, list[float]] = {v: [] for v in variants}
    threads_seen: set[int] = set()
    disturbed = dict.fromkeys(variants, 0)
    with tempfile.TemporaryDirectory(prefix="tsdia-bench-") as tmp_name:
        tmp = Path(args.keep or tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        for r in range(args.runs):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for variant in order:
                for attempt in range(args.retries + 1):
                    timing = run_variant(variant, s, tmp, r * 100 + attempt, args.threads)
                    share = timing["cpu_s"] / timing["window_s"]  # of one core, by the whole process tree
                    rate = timing["steps"] / timing["window_s"]
                    cpu_rate = timing["steps"] / timing["cpu_s"]
                    helpers = timing["cpu_helpers_s"] / timing["window_s"]
                    note = ""
                    if share < args.min_cpu_share:
                        disturbed[variant] += 1
                        retry = attempt < args.retries
                        note = f"  disturbed: CPU share {share:.2f} ({'retrying' if retry else 'kept'})"
                    print(
                        f"  run {r + 1}/{args.runs} {variant:12s} {rate:7.2f} steps/s "
                        f"{cpu_rate:7.2f} steps/CPU-s, helper processes {helpers:.1%} of a core{note}",
                        flush=True,
                    )
                    if share >= args.min_cpu_share or attempt == args.retries:
                        break
                threads_seen.add(timing["threads"])
                rates[variant].append(rate)
                cpu_rates[variant].append(cpu_rate)
                main_rates[variant].append(timing["steps"] / timing["cpu_main_s"])
                thread_rates[variant].append(timing["steps"] / timing["cpu_training_thread_s"])
                helper_shares[variant].append(helpers)
    if len(threads_seen) != 1:
        sys.exit(f"variants ran with different torch thread counts: {sorted(threads_seen)}")
    if any(disturbed.values()):
        print(f"runs disturbed by other load (CPU share < {args.min_cpu_share}), rerun: {disturbed}")
    medians = {v: median(rates[v]) for v in variants}
    cpu_medians = {v: median(cpu_rates[v]) for v in variants}
    print(
        f"{'variant':12s} {'median steps/s':>14s} {'steps/CPU-s':>12s} {'process':>8s} {'thread':>7s} "
        f"{'helpers':>8s}  runs (steps/s)"
    )
    for v in variants:
        print(
            f"{v:12s} {medians[v]:14.2f} {cpu_medians[v]:12.2f} {median(main_rates[v]):8.2f} "
            f"{median(thread_rates[v]):7.2f} "
            f"{median(helper_shares[v]):8.1%}  {fmt_runs(rates[v])}"
        )
    print(
        "(steps per CPU-second of: the whole process tree; the training process (all its threads); its "
        "training thread alone. helpers: CPU of its child processes, e.g. wandb's service, as a share of one core)"
    )
    # CPU seconds of the whole process tree per step: much less disturbed by other load than wall time.
    if "tsdia" in variants:
        print(
            ratio_line("tsdia/bare steps per CPU-second", "info", cpu_medians["tsdia"] / cpu_medians["bare"])
        )
    for v in variants:
        if v not in ("bare", "tsdia"):
            print(ratio_line(f"{v}/bare", "info", medians[v] / medians["bare"]))
    if "tsdia" in variants and "lightning" in variants:
        print(ratio_line("tsdia/lightning", "> 1x", medians["tsdia"] / medians["lightning"]))
    for v in variants:  # what each variant adds to a step, in microseconds (wall time, medians)
        if v != "bare":
            print(
                f"per-step overhead {v} vs bare: {(1 / medians[v] - 1 / medians['bare']) * 1e6:+.0f} us "
                f"(bare step {1e3 / medians['bare']:.2f} ms)"
            )
    if "tsdia" in variants:
        goal = ">= 0.95x" if args.small else ">= 0.98x"
        print(ratio_line("tsdia/bare", goal, medians["tsdia"] / medians["bare"]))


if __name__ == "__main__":
    main()
