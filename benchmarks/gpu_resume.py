"""On a GPU: a run interrupted and resumed from an asynchronous checkpoint ends bitwise equal to one that
never stopped (deterministic algorithms on, bf16 autocast).

    python benchmarks/gpu_resume.py [--allow-cpu] [--keep DIR]

Three runs of the real command (`python -m tsdia.train configs/example.yml`, small settings: 2 epochs of
8 optimizer steps, a checkpoint every 3): **straight** saves synchronously and runs to the end;
**part** uses `checkpoint.async_save` and stops at step 7 (`max_steps`); **resumed** continues it with
`resume=latest`, async_save on. Each run starts through a small launcher that turns on
`torch.use_deterministic_algorithms(True)` (with `CUBLAS_WORKSPACE_CONFIG=:4096:8`) before tsdia runs.
The final checkpoints' weights (model.safetensors) and optimizer state (optimizer.bin) are compared
tensor by tensor; the ratio line is the fraction that are bitwise equal (goal == 1).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import EXAMPLE_CONFIG, child_env, ratio_line

SETTINGS = [
    "dataset.num_train=128",
    "dataset.num_val=32",
    "training.batch_size=16",
    "training.epochs=2",
    "training.checkpoint.interval=3",
    "training.logging.interval=2",
    "training.logging.wandb=false",
    "training.logging.progress_bar=false",
]
LAUNCHER = (
    "import runpy, sys, torch; torch.use_deterministic_algorithms(True); "
    "sys.argv = ['tsdia.train', *sys.argv[1:]]; runpy.run_module('tsdia.train', run_name='__main__')"
)


def tensors(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every tensor inside a nested state, by its key path."""
    import torch

    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(tensors(value, f"{prefix}/{key}"))
    return out


def final_state(save_dir: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    from tsdia.experiment import checkpoints as store

    latest = store.latest_checkpoint(save_dir)
    if latest is None:
        raise SystemExit(f"no complete checkpoint in {save_dir}")
    state = {f"model/{k}": v for k, v in load_file(latest / "model.safetensors").items()}
    state.update(tensors(torch.load(latest / "optimizer.bin", weights_only=False), "optimizer"))
    return state


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--allow-cpu", action="store_true", help="test the script's plumbing without a GPU")
    parser.add_argument("--keep", metavar="DIR", help="keep the runs' directories in DIR")
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        sys.exit("gpu_resume.py needs a CUDA GPU; pass --allow-cpu to test the plumbing on CPU")
    precision = "'bf16'" if cuda else "'no'"
    print(f"exact resume on {torch.cuda.get_device_name() if cuda else 'CPU (--allow-cpu)'}, {precision}")
    with tempfile.TemporaryDirectory(prefix="tsdia-bench-resume-") as tmp_name:
        tmp = Path(args.keep or tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        env = child_env(tmp, None if cuda else 1, CUBLAS_WORKSPACE_CONFIG=":4096:8")
        common = [*SETTINGS, f"training.mixed_precision={precision}"]
        runs = {
            "straight": [f"training.checkpoint.save_dir={tmp / 'straight'}"],
            "part": [
                f"training.checkpoint.save_dir={tmp / 'part'}",
                "training.checkpoint.async_save=true",
                "training.max_steps=7",
            ],
            "resumed": [
                f"training.checkpoint.save_dir={tmp / 'part'}",
                "training.checkpoint.async_save=true",
                "training.checkpoint.resume=latest",
            ],
        }
        for name, extra in runs.items():
            cmd = [sys.executable, "-c", LAUNCHER, str(EXAMPLE_CONFIG), *common, *extra]
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            print(f"  {name}: exit {result.returncode}", flush=True)
            if result.returncode != 0:
                sys.exit(f"run {name} failed:\n{result.stderr[-3000:]}")
        a, b = final_state(tmp / "straight"), final_state(tmp / "part")
    if sorted(a) != sorted(b):
        sys.exit(f"the final checkpoints hold different tensors: {sorted(set(a) ^ set(b))[:5]}")
    equal = [k for k in a if a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].equal(b[k])]
    for key in sorted(set(a) - set(equal))[:5]:
        print(f"  differs: {key} (max abs diff {(a[key].double() - b[key].double()).abs().max().item():.3g})")
    print(f"{len(equal)} of {len(a)} tensors bitwise equal")
    print(
        ratio_line(
            "gpu exact resume: equal tensors" if cuda else "exact resume: equal tensors",
            "== 1x",
            len(equal) / len(a),
        )
    )


if __name__ == "__main__":
    main()
