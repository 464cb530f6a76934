"""How long `tsdia-submit --dry-run` takes, as a multiple of `python -c "import submitit"` (goal: <= 3x).

    python benchmarks/submit_latency.py [--runs 15] [--config configs/example.yml]

Both commands run as fresh processes, interleaved (so a slow spell of the machine hits both alike); the
median of each is reported, the ratio last. The dry run loads and checks the config, checks the experiment
directory and renders submitit's sbatch script: everything a real submit does before `sbatch` itself.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=15, help="runs of each command (after one warm-up each)")
    parser.add_argument("--config", default=str(REPO / "configs" / "example.yml"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        baseline = [sys.executable, "-c", "import submitit"]
        dry_run = [
            sys.executable,
            "-m",
            "tsdia.launch.submit",
            args.config,
            f"training.checkpoint.save_dir={tmp}/exp",
            "--dry-run",
        ]
        timed(baseline, tmp), timed(dry_run, tmp)  # warm the page cache and .pyc files
        base_times, dry_times = [], []
        for _ in range(args.runs):
            base_times.append(timed(baseline, tmp))
            dry_times.append(timed(dry_run, tmp))
    base, dry = statistics.median(base_times), statistics.median(dry_times)
    print(f"python -c 'import submitit':  median {base * 1000:7.1f} ms over {args.runs} runs")
    print(f"tsdia-submit --dry-run:       median {dry * 1000:7.1f} ms over {args.runs} runs")
    print(f"ratio (goal <= 3x): {dry / base:.2f}x")


if __name__ == "__main__":
    main()
