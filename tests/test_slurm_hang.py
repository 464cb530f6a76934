"""A hang on the real local Slurm cluster: the watchdog dumps stacks, records `hang`, requeues; the rerun
completes with the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest_slurm import slurm_cluster  # noqa: F401 - the session fixture
from test_slurm_preemption import job_state, submit, wait_finished, wait_until
from test_watchdog import HANG2, torchrun_hang

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]


def test_hang_on_rank_one_requeues_and_completes_bitwise_equal(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    done = torchrun_hang(tmp_path, reference, "model.hang_at_call=0")
    assert done.returncode == 0, done.stderr[-3000:]

    save_dir = tmp_path / "hung"
    job_id = submit(
        tmp_path,
        save_dir,
        *HANG2,
        "model.hang_at_call=6",  # rank 1 blocks in its 6th training forward: step 6 never completes
        f"model.once_marker={tmp_path / 'hung-once'}",  # ... in the first attempt only
        "slurm.nodes=2",
        "training.logging.wandb=false",
        "model.step_seconds=0.1",
    )
    wait_until(lambda: job_state(job_id)[2] >= 1, 240, "the requeue after the hang")
    state, code, restarts = wait_finished(job_id, 300)
    assert (state, restarts) == ("COMPLETED", 1), (state, code, restarts)

    attempts = json.loads((save_dir / "checkpoints" / "attempts.json").read_text())
    assert [a["end"] for a in attempts] == ["hang", "completed"], attempts
    hang = attempts[0]
    assert (hang["reason"], hang["stop_step"], hang["ranks"], hang["restart_count"]) == (
        "hang",
        5,
        [1],
        0,
    )
    assert {r["phase"] for r in hang["hang"]["ranks"].values()} == {"forward", "backward"}
    first = next(p for p in (save_dir / "logs").glob("training_2*.log"))
    rank0 = first.read_text()
    rank1 = (save_dir / "logs" / "ranks" / first.name.replace(".log", ".rank1.log")).read_text()
    for rank, text in ((0, rank0), (1, rank1)):
        assert f"HANG on rank {rank}" in text and "(most recent call first)" in text, text[-2000:]
    assert re.search(r"crashy\.py\", line \d+ in forward", rank1)  # where rank 1 was stuck
    assert "Stopped: hang after step 5" in rank0 and "requeueing: requeue 1 of at most" in rank0

    a = load_file(str(reference / "checkpoint-epoch1-step16" / "model.safetensors"))
    b = load_file(str(save_dir / "checkpoint-epoch1-step16" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), "the hang changed the final weights"
