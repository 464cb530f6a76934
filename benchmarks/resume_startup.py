"""Resume start-up: process start -> first resumed optimizer step, vs plain import + `load_state`.

    python benchmarks/resume_startup.py [--runs 5]

No goal is set in the issue: this measures what the kit adds to a restart (a requeued job pays it).

- **tsdia**: `tsdia-train configs/example.yml ... training.checkpoint.resume=latest` on a copy of an
  experiment made once beforehand (3 steps of the example model, TensorBoard and offline WandB on, as
  in the example). It parses and checks the config, decides resume on the experiment directory, starts
  the log tee, writes the resume log, restarts both trackers (the same WandB run id, TensorBoard purged
  past the checkpoint), prepares the model, loads the checkpoint (model, optimizer, scheduler, RNG
  states) and skips the batches already seen.
- **plain** (the baseline): `python -c '...'` that imports torch and accelerate, builds the same model,
  optimizer, scheduler and DataLoader, prepares them and calls `accelerator.load_state(checkpoint)` on
  the same checkpoint, then runs its first step.

Both use the model `bench_plugins.MarkerTSVAD`, which records `time.time()` at the start of its first
training forward, i.e. when the first resumed optimizer step begins. Start-up = that time minus the
parent's `time.time()` just before it started the process (Python's own start is in both). Runs are
interleaved (a rotated order per round); medians compared. Threads are pinned to 1 in both.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

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

BASE_STEPS = 3

PLAIN = """
import sys, json
import torch, accelerate
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from bench_plugins import MarkerTSVAD
from tsdia.examples.tsvad import build_datasets

s = json.load(open(sys.argv[1]))
set_seed(s["seed"])
model = MarkerTSVAD(**s["model"])
train_set, _ = build_datasets(**s["dataset"])
loader = torch.utils.data.DataLoader(
    train_set, batch_size=s["batch_size"], shuffle=True, generator=torch.Generator().manual_seed(s["seed"])
)
optimizer = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=0.01)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
accelerator.register_for_checkpointing(scheduler)
accelerator.load_state(s["checkpoint"])
for batch in accelerator.skip_first_batches(loader, s["skip"]):
    loss = model(batch)["loss"]
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    break
"""


def tsdia_train() -> list[str]:
    script = Path(sys.executable).parent / "tsdia-train"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tsdia.train"]


def overrides(save_dir: Path, max_steps: int) -> list[str]:
    return [
        "model.target=bench_plugins:MarkerTSVAD",
        "training.logging.wandb_mode=offline",
        f"training.max_steps={max_steps}",
        f"training.checkpoint.save_dir={save_dir}",
    ]


def timed(cmd: list[str], env: dict[str, str], log: Path, marker: Path) -> float:
    marker.unlink(missing_ok=True)
    env = {**env, "BENCH_TIMING_FILE": str(marker)}
    started = time.time()
    run_logged(cmd, env, log)
    if not marker.exists():
        sys.exit(f"{cmd[0]}: no first step was marked (see {log})")
    return float(json.loads(marker.read_text())["marked_at_epoch_s"]) - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="runs of each, interleaved")
    parser.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE", help="extra override for the resume"
    )
    args = parser.parse_args()

    example = example_sections()
    times: dict[str, list[float]] = {"tsdia": [], "plain": []}
    with tempfile.TemporaryDirectory(prefix="tsdia-bench-resume-") as tmp_name:
        tmp = Path(tmp_name)
        env = child_env(tmp, 1)
        base = tmp / "base"
        run_logged([*tsdia_train(), str(EXAMPLE_CONFIG), *overrides(base, BASE_STEPS)], env, tmp / "base.log")
        checkpoints = sorted(base.glob(f"checkpoint-epoch*-step{BASE_STEPS}"))
        if not checkpoints:
            sys.exit(f"the base run left no checkpoint of step {BASE_STEPS} in {base}")
        settings = {
            "model": component_kwargs(example["model"]),
            "dataset": component_kwargs(example["dataset"]),
            "batch_size": example["training"]["batch_size"],
            "seed": example["training"]["seed"],
            "lr": float(example["training"]["optimizer"]["lr"]),
            "checkpoint": str(checkpoints[0]),
            "skip": BASE_STEPS,
        }
        (tmp / "plain.json").write_text(json.dumps(settings))
        for r in range(args.runs + 1):  # round 0 warms the page cache and .pyc files, and is dropped
            for variant in ("tsdia", "plain") if r % 2 else ("plain", "tsdia"):
                if variant == "tsdia":
                    exp = tmp / f"exp-{r}"
                    shutil.copytree(base, exp, symlinks=True)
                    cmd = [
                        *tsdia_train(),
                        str(EXAMPLE_CONFIG),
                        *overrides(exp, BASE_STEPS + 1),
                        "training.checkpoint.resume=latest",
                        *args.override,
                    ]
                else:
                    cmd = [sys.executable, "-c", PLAIN, str(tmp / "plain.json")]
                took = timed(cmd, env, tmp / f"{variant}-{r}.log", tmp / "marker.json")
                if variant == "tsdia":
                    text = (tmp / f"{variant}-{r}.log").read_text(errors="replace")
                    if f"Resumed at step {BASE_STEPS}" not in text:
                        sys.exit(f"tsdia did not resume at step {BASE_STEPS}:\n{text[-3000:]}")
                    shutil.rmtree(tmp / f"exp-{r}", ignore_errors=True)
                if r:
                    times[variant].append(took)
                    print(f"  run {r}/{args.runs} {variant:6s} {took:.2f} s", flush=True)
    tsdia, plain = median(times["tsdia"]), median(times["plain"])
    print(f"tsdia-train resume=latest -> first step: median {tsdia:.2f} s  {fmt_runs(times['tsdia'])}")
    print(f"import + load_state -> first step:       median {plain:.2f} s  {fmt_runs(times['plain'])}")
    print(ratio_line("tsdia resume/plain load_state", "info", tsdia / plain))


if __name__ == "__main__":
    main()
