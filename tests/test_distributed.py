"""Two real processes (torchrun, gloo on CPU): rank-zero decisions, synchronisation, DeepSpeed, exact resume."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import EXAMPLE, REPO, quiet_env, tree, with_plugins
from tsdia.errors import directory_exists_message

pytestmark = pytest.mark.slow

# 256 examples, 2 ranks x batch 16 -> 8 optimizer steps per epoch.
SMALL2 = [
    "dataset.num_train=256",
    "dataset.num_val=64",
    "training.batch_size=16",
    "training.epochs=2",
    "training.logging.interval=1",
    "training.logging.wandb=false",
    "training.logging.progress_bar=false",
    "training.checkpoint.interval=100",
    "model.num_layers=1",
    "model.target=crashy:RankReportingModel",
]


def torchrun(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = quiet_env(tmp_path)
    with_plugins(env)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*command, "-m", "tsdia.train", str(EXAMPLE), *SMALL2, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def checksums(save_dir: Path) -> dict[int, list[str]]:
    """PARAM_CHECKSUM lines per rank, read from each rank's own log files."""
    found: dict[int, list[str]] = {}
    for log in sorted((save_dir / "logs").rglob("training_*.log")):
        for rank, value in re.findall(r"PARAM_CHECKSUM rank=(\d+) value=(\S+)", log.read_text()):
            found.setdefault(int(rank), []).append(value)
    return found


def final_weights(save_dir: Path) -> dict:  # type: ignore[type-arg]
    return load_file(str(save_dir / "checkpoint-epoch1-step16" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:  # type: ignore[type-arg]
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].equal(b[name]), name


def exact_resume(tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    full, part = tmp_path / "full", tmp_path / "part"
    result = torchrun(tmp_path, *extra, f"training.checkpoint.save_dir={full}")
    assert result.returncode == 0, result.stderr[-3000:]
    result = torchrun(tmp_path, *extra, f"training.checkpoint.save_dir={part}", "training.max_steps=5")
    assert result.returncode == 0, result.stderr[-3000:]
    result = torchrun(
        tmp_path, *extra, f"training.checkpoint.save_dir={part}", "training.checkpoint.resume=latest"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return full, part


def test_ddp_synchronises_and_resumes_exactly(tmp_path: Path) -> None:
    full, part = exact_resume(tmp_path)
    # Ranks see different shards; identical parameters on both ranks at every validation prove that the
    # gradients were averaged (unsynchronised ranks drift apart after the first step).
    sums = checksums(full)
    assert len(sums[0]) == 2 and sums[0] == sums[1]
    assert_same_weights(final_weights(full), final_weights(part))
    hparams = json.loads((full / "hyperparameters.json").read_text())
    assert (
        hparams["world_size"] == 2 and hparams["effective_batch_size"] == 32 and hparams["zero_stage"] is None
    )
    # one training_*.log per attempt; the other rank's output in logs/ranks/
    assert len(list((part / "logs").glob("training_*.log"))) == 2
    assert len(list((part / "logs" / "ranks").glob("training_*.rank1.log"))) == 2


def test_zero2_resumes_exactly_with_an_ema(tmp_path: Path) -> None:
    """ZeRO-2 on 2 ranks resumes bitwise, and so does an EMA of the weights (ZeRO 1/2 keep the full
    parameters on every rank): the final weights and every EMA file both runs have are equal."""
    full, part = exact_resume(
        tmp_path,
        "distributed.deepspeed.zero_stage=2",
        "training.ema.decay=0.8",
        "training.checkpoint.save_total_limit=null",
        "training.checkpoint.interval=3",
    )
    assert_same_weights(final_weights(full), final_weights(part))
    final = full / "checkpoint-epoch1-step16"
    assert (final / "pytorch_model").is_dir()  # DeepSpeed's sharded states
    assert json.loads((full / "hyperparameters.json").read_text())["zero_stage"] == 2
    assert (full / "best_checkpoint").is_symlink()
    for name in ("checkpoint-epoch0-step3", "checkpoint-epoch1-step16"):
        assert_same_weights(
            load_file(str(full / name / "ema.safetensors")), load_file(str(part / name / "ema.safetensors"))
        )
    index = json.loads((full / "checkpoints" / "index.json").read_text())
    assert "val_ema_loss" in index["checkpoints"][-1]["metrics"]


def test_zero3_trains(tmp_path: Path) -> None:
    save_dir = tmp_path / "z3"
    result = torchrun(
        tmp_path, "distributed.deepspeed.zero_stage=3", f"training.checkpoint.save_dir={save_dir}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    weights = final_weights(save_dir)
    assert weights and all(t.numel() > 0 for t in weights.values())  # gathered, not ZeRO-3 placeholders


def test_refusal_on_both_ranks(tmp_path: Path) -> None:
    save_dir = tmp_path / "taken"
    save_dir.mkdir()
    (save_dir / "precious.txt").write_text("keep me")
    before = tree(save_dir)
    result = torchrun(tmp_path, f"training.checkpoint.save_dir={save_dir}", timeout=60)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count("ERROR: Checkpoint directory already exists!") == 2  # every rank raised
    assert directory_exists_message(str(save_dir)) in output
    assert tree(save_dir) == before


def test_crash_on_rank_one_stops_every_rank(tmp_path: Path) -> None:
    save_dir = tmp_path / "crash"
    result = torchrun(
        tmp_path,
        "model.crash_on_rank=1",
        "model.crash_at_call=3",
        f"training.checkpoint.save_dir={save_dir}",
        timeout=120,
    )
    assert result.returncode != 0
    rank1_log = next((save_dir / "logs" / "ranks").glob("training_*.rank1.log")).read_text()
    assert "Traceback" in rank1_log and "RuntimeError: boom on rank 1" in rank1_log
    # and the experiment can be resumed afterwards
    resumed = torchrun(
        tmp_path, f"training.checkpoint.save_dir={save_dir}", "training.checkpoint.resume=latest"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
