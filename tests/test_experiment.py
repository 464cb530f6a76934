"""Rank 0's directory decision: fresh, resume, refuse, and the submit-time claim token."""

from __future__ import annotations

from pathlib import Path

import pytest

from tsdia.errors import CheckpointDirectoryExistsError, CheckpointError, ExperimentInUseError
from tsdia.experiment import OWNER_FILE, ExperimentLock, claim_experiment, write_owner
from tsdia.training import checkpoint_store as store


def checkpoint(save_dir: Path, step: int) -> Path:
    name = store.checkpoint_name(0, step)
    staging = store.begin_checkpoint(save_dir, name)
    (staging / "model.safetensors").write_bytes(b"x")
    return store.commit_checkpoint(save_dir, staging, name, step, 0, {}, {})


def test_fresh_then_refused(tmp_path: Path) -> None:
    save_dir = tmp_path / "a" / "exp"
    decision = claim_experiment(str(save_dir), None)
    assert decision.action == "fresh" and decision.created_dir and save_dir.is_dir()
    assert decision.log_name.startswith("training_") and decision.resume_index == 0
    with pytest.raises(CheckpointDirectoryExistsError):
        claim_experiment(str(save_dir), None)


def test_resume_latest(tmp_path: Path) -> None:
    save_dir = tmp_path / "exp"
    assert claim_experiment(str(save_dir), "latest").action == "fresh"  # nothing there yet: start
    (save_dir / "logs").mkdir()
    (save_dir / "logs" / "training_20260101_000000.log").write_text("")
    decision = claim_experiment(str(save_dir), "latest")
    assert decision.action == "resume" and decision.resume_from is None  # no checkpoint yet: from step 0
    checkpoint(save_dir, 3)
    latest = checkpoint(save_dir, 7)
    (save_dir / "logs" / "training_resume_1_20260101_000001.log").write_text("")
    decision = claim_experiment(str(save_dir), "latest")
    assert decision.resume_from == str(latest) and decision.resume_index == 2
    assert decision.log_name.startswith("training_resume_2_")


def test_resume_latest_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(CheckpointError, match="not a tsdia experiment"):
        claim_experiment(str(tmp_path), "latest")


def test_claim_token_lets_the_job_in_and_keeps_others_out(tmp_path: Path) -> None:
    save_dir = tmp_path / "exp"
    save_dir.mkdir()
    write_owner(save_dir, {"claim_token": "t1", "job_id": "42"})
    first = claim_experiment(str(save_dir), None, "t1")
    assert first.action == "fresh" and first.created_dir and "job 42" in first.note
    with pytest.raises(CheckpointDirectoryExistsError):
        claim_experiment(str(save_dir), None, "someone-else")
    with pytest.raises(CheckpointDirectoryExistsError):
        claim_experiment(str(save_dir), None)
    (save_dir / "logs").mkdir()
    own = checkpoint(save_dir, 5)
    requeued = claim_experiment(str(save_dir), None, "t1")  # the same job after a requeue
    assert requeued.action == "resume" and requeued.resume_from == str(own) and requeued.resume_index == 1


def test_claimed_job_started_from_an_explicit_checkpoint(tmp_path: Path) -> None:
    source = tmp_path / "old"
    start = checkpoint(source, 9)
    save_dir = tmp_path / "new"
    save_dir.mkdir()
    write_owner(save_dir, {"claim_token": "t2", "job_id": "7"})
    first = claim_experiment(str(save_dir), str(start), "t2")
    assert first.action == "resume" and first.resume_from == str(start.resolve()) and first.created_dir
    (save_dir / "logs").mkdir()
    again = claim_experiment(str(save_dir), str(start), "t2")  # requeued before its own first checkpoint
    assert again.resume_from == str(start.resolve())
    own = checkpoint(save_dir, 12)
    later = claim_experiment(str(save_dir), str(start), "t2")  # requeued after saving: continue from its own
    assert later.resume_from == str(own)
    assert (save_dir / OWNER_FILE).exists()


def test_lock_keeps_a_second_live_run_out(tmp_path: Path) -> None:
    lock = ExperimentLock(str(tmp_path))
    lock.acquire("99")
    with pytest.raises(ExperimentInUseError, match="Slurm job 99"):
        ExperimentLock(str(tmp_path)).acquire()
    lock.release()
    ExperimentLock(str(tmp_path)).acquire()
