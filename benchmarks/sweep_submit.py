"""Submitting a 64-member sweep against one single-experiment submit (goal: <= 2x), on a real Slurm cluster.

    python benchmarks/sweep_submit.py [--members 64] [--runs 3]       (needs slurm/dev-cluster.sh start)

Both are fresh `tsdia-submit` processes, interleaved; every job they queue is cancelled at once (held with
`--begin=now+1hour`, so nothing runs). A sweep loads the config once, checks every member, claims all
directories and makes one `sbatch` call for the whole array.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["training.logging.wandb=false", "model.num_layers=1", "slurm.sbatch_extra={begin: now+1hour}"]


def submit(cwd: str, save_dir: str, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "tsdia.launch.submit", str(REPO / "configs" / "example.yml")]
    start = time.perf_counter()
    done = subprocess.run(
        [*cmd, f"training.checkpoint.save_dir={save_dir}", *TINY, *extra],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"submit failed:\n{done.stdout}{done.stderr}")
    for job in set(re.findall(r"(?:Slurm job|job array) (\d+)", done.stdout)):
        subprocess.run(["scancel", job], check=False)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("sbatch") is None:
        raise SystemExit("needs a Slurm cluster: sudo slurm/dev-cluster.sh start")
    seeds = ",".join(str(i) for i in range(args.members))
    times: dict[str, list[float]] = {"single": [], "sweep": []}
    with tempfile.TemporaryDirectory() as tmp:
        submit(tmp, f"{tmp}/warm", [])  # imports and the page cache
        for i in range(args.runs):
            times["single"].append(submit(tmp, f"{tmp}/single{i}", []))
            times["sweep"].append(submit(tmp, f"{tmp}/sweep{i}", ["--sweep", f"training.seed={seeds}"]))
        members = json.loads(Path(f"{tmp}/sweep0/sweep.json").read_text())["members"]
        assert len(members) == args.members and len({m["job_id"] for m in members}) == args.members
    single, swept = statistics.median(times["single"]), statistics.median(times["sweep"])
    print(
        f"single-experiment submit: median {single:.2f} s ({', '.join(f'{t:.2f}' for t in times['single'])})"
    )
    print(
        f"{args.members}-member sweep submit: median {swept:.2f} s ({', '.join(f'{t:.2f}' for t in times['sweep'])})"
    )
    print(f"ratio sweep of {args.members} / single submit (goal <= 2x): {swept / single:.2f}x")


if __name__ == "__main__":
    main()
