"""Steady-state optimizer steps/s: tsdia's Trainer vs a bare Accelerate loop vs PyTorch Lightning.

    python benchmarks/trainer_overhead.py [--runs 3] [--warmup 10] [--steps 100] [--block-steps 2] [--small]

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

How steady state is measured: every variant of a launch starts at once, in its own process. The model
(`bench_plugins.TimedTSVAD`, or `TimedMLP` with `--small`, loaded into every variant) joins the
parent's baton ring (`baton.py`) at the start of its first training forward call after `warmup` steps;
in the variants that log to WandB only once WandB has started (tsdia starts its trackers in a background
thread after the first step, and importing wandb and `wandb.init`, seconds of CPU, is start-up, which
the others pay before their first step; every run has `--slack` extra steps for that wait). The parent
then hands out turns: each variant in turn runs `--block-steps` whole optimizer steps (with their data
loading, logging and the checkpoints that fall inside them) while the others wait, round after round,
in an order rotated every round, until each has run `--steps` timed steps. Start-up and the end
(final validation and checkpoint, tracker shutdown) are never timed. steps/s = timed steps / the sum of
a variant's block times, over all launches.

Why blocks: whole runs one after another could not resolve 5% on this shared VM (two identical bare
loops a minute apart differed by up to 25%: its speed drifts over seconds to minutes). Taking turns
every ~0.1 s puts every variant under the same drift, and the training threads of all variants are
pinned to one CPU (`--cpu`; the two vCPUs differ), so two identical bare loops (`bare-again`, the A/A
check) land within ~2%. Helper threads and processes (the tee, WandB's service) run on the other core,
as they would on a GPU node's spare cores. The training thread's CPU time per step is printed too, and
how many blocks got less than 90% of a CPU (load from outside, or a variant's own waits). Threads
default to 1: on a 2-core machine where the trackers' helper processes and the tee's thread need a
core too, 2 torch threads would measure CPU oversubscription, not the kit.

Extra variants (`--variants`): `tsdia-quiet` (tsdia without trackers and progress bar: splits the cost
up), `tsdia-unseeded` (without the per-sample RNG seeding that makes on-the-fly augmentation exact: its
cost per step is the batch size times the per-sample cost, see `dataloader_seeding.py`) and `bare-again` (a second, identical bare loop: an A/A test that shows how far apart two identical
variants land on this machine, i.e. the resolution of the ratio).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from baton import Ring, pinned_cpu
from common import EXAMPLE_CONFIG, child_env, component_kwargs, example_sections, fmt_runs, ratio_line

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


def start_variant(
    variant: str, s: dict[str, Any], tmp: Path, launch: int, threads: int, baton: dict[str, str]
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start one variant's process (it joins the ring when its timed steps begin); its log file."""
    out_dir = tmp / f"{variant}-{launch}"
    out_dir.mkdir()
    env = child_env(tmp, threads, **baton)
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
    log = out_dir / "output.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, env=env, cwd=out_dir, stdout=out, stderr=subprocess.STDOUT)
    return process, log


def launch(
    variants: list[str], s: dict[str, Any], tmp: Path, index: int, args: argparse.Namespace, cpu: int | None
) -> dict[str, list[tuple[float, float]]]:
    """One launch: every variant at once, taking turns block by block; each variant's (wall, CPU) per block."""
    directory = tmp / f"launch-{index}"
    directory.mkdir()
    ring = Ring(directory)
    started = {
        v: start_variant(v, s, directory, index, args.threads, ring.env(v, args.block_steps, cpu))
        for v in variants
    }
    processes = {v: process for v, (process, _) in started.items()}
    try:
        ring.gather(processes, {v: log for v, (_, log) in started.items()})
        blocks: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
        for b in range(args.steps // args.block_steps):
            for variant in variants[b % len(variants) :] + variants[: b % len(variants)]:
                blocks[variant].append(ring.turn(variant))
        ring.stop(variants)
        for variant, (process, log) in started.items():
            if process.wait() != 0:
                tail = log.read_text(errors="replace")[-4000:]
                sys.exit(f"{variant} failed (exit {process.returncode}):\n{tail}")
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
    return blocks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs", type=int, default=3, help="launches; each runs every variant once, interleaved"
    )
    parser.add_argument("--warmup", type=int, default=10, help="steps before the timed blocks")
    parser.add_argument("--steps", type=int, default=100, help="timed optimizer steps per variant and launch")
    parser.add_argument(
        "--block-steps", type=int, help="steps per turn (default: 20 with --small, else 2); divides --steps"
    )
    parser.add_argument(
        "--slack",
        type=int,
        help="extra steps in every run, so the timing can wait for WandB's start (default: 3000 with --small, "
        "else 100)",
    )
    parser.add_argument("--checkpoint-interval", type=int, default=50, help="0: no interval checkpoints")
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch/OMP threads in every variant")
    parser.add_argument(
        "--cpu", type=int, help="the CPU every training thread is pinned to (default: the last; -1: none)"
    )
    parser.add_argument(
        "--small", action="store_true", help="a tiny model: ~1-2 ms steps (per-step overhead)"
    )
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
    if args.block_steps is None:
        args.block_steps = 20 if args.small else 2
    if args.steps % args.block_steps:
        parser.error(f"--steps {args.steps} is not a multiple of --block-steps {args.block_steps}")
    cpu = pinned_cpu(args.cpu)
    s = settings(args)
    print(
        f"{args.steps} timed steps per variant and launch in blocks of {args.block_steps}, after "
        f"{args.warmup} warm-up steps; batch {s['batch_size']}, checkpoint every "
        f"{args.checkpoint_interval or 'never'}, log every {args.log_interval}, {args.threads} thread(s), "
        f"training threads on CPU {cpu if cpu is not None else 'any'}; {args.runs} launch(es)",
        flush=True,
    )
    launches: list[dict[str, list[tuple[float, float]]]] = []
    with tempfile.TemporaryDirectory(prefix="tsdia-bench-") as tmp_name:
        tmp = Path(args.keep or tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        for r in range(args.runs):
            launches.append(launch(variants, s, tmp, r, args, cpu))
            rates = {v: args.steps / sum(w for w, _ in launches[-1][v]) for v in variants}
            print(
                f"  launch {r + 1}/{args.runs}: "
                + ", ".join(f"{v} {rates[v]:.1f}" for v in variants)
                + " steps/s",
                flush=True,
            )
    report(variants, launches, args)


def report(
    variants: list[str], launches: list[dict[str, list[tuple[float, float]]]], args: argparse.Namespace
) -> None:
    """Steps/s over all launches' blocks, per-step overhead in microseconds, and the ratio lines."""
    steps = args.steps * len(launches)
    wall = {v: sum(w for blocks in launches for w, _ in blocks[v]) for v in variants}
    cpu = {v: sum(c for blocks in launches for _, c in blocks[v]) for v in variants}
    rate = {v: steps / wall[v] for v in variants}
    print(
        f"{'variant':14s} {'steps/s':>8s} {'ms/step':>8s} {'thread CPU ms/step':>19s}  per launch (steps/s)"
    )
    for v in variants:
        per_launch = [args.steps / sum(w for w, _ in blocks[v]) for blocks in launches]
        print(
            f"{v:14s} {rate[v]:8.2f} {wall[v] / steps * 1e3:8.3f} {cpu[v] / steps * 1e3:19.3f}  "
            f"{fmt_runs(per_launch)}"
        )
    disturbed = {v: sum(c < 0.9 * w for blocks in launches for w, c in blocks[v]) for v in variants}
    print(
        f"blocks whose training thread got < 90% of its CPU (other load, or the variant's own waits): {disturbed} "
        f"of {steps // args.block_steps} each"
    )
    for v in variants:  # what each variant adds to a step, in microseconds
        if v != "bare":
            print(
                f"per-step overhead {v} vs bare: {(wall[v] - wall['bare']) / steps * 1e6:+.0f} us "
                f"(bare step {wall['bare'] / steps * 1e3:.3f} ms)"
            )
    for v in variants:
        if v not in ("bare", "tsdia"):
            print(ratio_line(f"{v}/bare", "info", rate[v] / rate["bare"]))
    if "tsdia" in variants and "lightning" in variants:
        print(ratio_line("tsdia/lightning", "> 1x", rate["tsdia"] / rate["lightning"]))
    if "tsdia" in variants:
        goal = ">= 0.95x" if args.small else ">= 0.98x"
        print(ratio_line("tsdia/bare", goal, rate["tsdia"] / rate["bare"]))


if __name__ == "__main__":
    main()
