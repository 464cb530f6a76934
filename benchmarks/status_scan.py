"""How long `tsdia status` takes over 200 experiment directories, against `python -c "import submitit"`.

    python benchmarks/status_scan.py [--experiments 200] [--runs 7]

Builds N synthetic experiments (logs of two attempts, three complete checkpoints with manifests, a best
link, a progress record, an attempt record; every other one owned by a Slurm job id), then times
`tsdia status DIR --json` as a fresh process, interleaved with the baseline. Slurm is asked once per call
(one squeue, one sacct) when it is installed; the job ids are not real, so Slurm answers quickly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_experiments(root: Path, count: int) -> None:
    sys.path.insert(0, str(REPO / "src"))
    from tsdia.experiment import checkpoints as store
    from tsdia.experiment.attempts import AttemptRecord, record_attempt
    from tsdia.experiment.layout import write_owner
    from tsdia.experiment.progress import ProgressWriter

    for i in range(count):
        exp = root / f"exp{i:03d}"
        (exp / "logs").mkdir(parents=True)
        (exp / "logs" / "training_20261130_010000.log").write_text("x\n" * 200)
        (exp / "logs" / "training_resume_1_20261130_020000.log").write_text("x\n" * 200)
        for step in (100, 200, 300):
            name = store.checkpoint_name(0, step)
            staging = store.begin_checkpoint(exp, name)
            for part in ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
                (staging / part).write_bytes(b"x" * 64)
            store.commit_checkpoint(exp, staging, name, step, 0, {"val_loss": 1.0 / step}, {})
        store.update_best_and_rotate(exp, "val_loss", "min", None)
        ProgressWriter(exp, 1000, 1).update(300, 0, {"train_loss": 0.1})
        record_attempt(exp, AttemptRecord(0, None, 0, 0, 150, "preemption (SIGUSR2)", "t"))
        if i % 2:
            write_owner(exp, {"claim_token": "t", "job_id": str(900000 + i), "executor": "slurm"})
        (exp / "config.yml").write_text(json.dumps({"training": {"checkpoint": {"best_metric": "val_loss"}}}))


def timed(cmd: list[str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiments", type=int, default=200)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        make_experiments(runs, args.experiments)
        status = [sys.executable, "-m", "tsdia.follow.cli", "status", str(runs), "--json", "--all"]
        baseline = [sys.executable, "-c", "import submitit"]
        out = subprocess.run(status, cwd=tmp, check=True, capture_output=True, text=True).stdout
        assert len(json.loads(out)) == args.experiments, "status did not list every experiment"
        timed(baseline, tmp)
        times: dict[str, list[float]] = {"status": [], "baseline": []}
        for _ in range(args.runs):
            times["baseline"].append(timed(baseline, tmp))
            times["status"].append(timed(status, tmp))
    s, b = statistics.median(times["status"]), statistics.median(times["baseline"])
    print(
        f"tsdia status over {args.experiments} experiments: median {s:.3f} s ({s / args.experiments * 1e3:.2f} ms each)"
    )
    print(f"python -c 'import submitit': median {b:.3f} s")
    print(f"ratio tsdia status {args.experiments} experiments / import submitit (goal info): {s / b:.2f}x")


if __name__ == "__main__":
    main()
