"""Rank 0's directory decision: fresh, resume, refuse, and the submit-time claim token."""

from __future__ import annotations

from pathlib import Path

import pytest

from tsdia.errors import CheckpointDirectoryExistsError, CheckpointError, ExperimentInUseError
from tsdia.experiment import checkpoints as store
from tsdia.experiment.claim import check_can_submit, claim_for_submit
from tsdia.experiment.decision import decide, open_experiment
from tsdia.experiment.layout import OWNER_FILE, write_owner
from tsdia.experiment.lock import ExperimentLock


def checkpoint(save_dir: Path, step: int) -> Path:
    name = store.checkpoint_name(0, step)
    staging = store.begin_checkpoint(save_dir, name)
    (staging / "model.safetensors").write_bytes(b"x")
    return store.commit_checkpoint(save_dir, staging, name, step, 0, {}, {})


def test_fresh_then_refused(tmp_path: Path) -> None:
    save_dir = tmp_path / "a" / "exp"
    decision = open_experiment(str(save_dir), None)
    assert decision.action == "fresh" and decision.created_dir and save_dir.is_dir()
    assert decision.log_name.startswith("training_") and decision.resume_index == 0
    with pytest.raises(CheckpointDirectoryExistsError):
        open_experiment(str(save_dir), None)


def test_resume_latest(tmp_path: Path) -> None:
    save_dir = tmp_path / "exp"
    assert open_experiment(str(save_dir), "latest").action == "fresh"  # nothing there yet: start
    (save_dir / "logs").mkdir()
    (save_dir / "logs" / "training_20260101_000000.log").write_text("")
    decision = open_experiment(str(save_dir), "latest")
    assert decision.action == "resume" and decision.resume_from is None  # no checkpoint yet: from step 0
    checkpoint(save_dir, 3)
    latest = checkpoint(save_dir, 7)
    (save_dir / "logs" / "training_resume_1_20260101_000001.log").write_text("")
    decision = open_experiment(str(save_dir), "latest")
    assert decision.resume_from == str(latest) and decision.resume_index == 2
    assert decision.log_name.startswith("training_resume_2_")


def test_resume_latest_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(CheckpointError, match="not a tsdia experiment"):
        open_experiment(str(tmp_path), "latest")


def test_claim_token_lets_the_job_in_and_keeps_others_out(tmp_path: Path) -> None:
    save_dir = tmp_path / "exp"
    save_dir.mkdir()
    write_owner(save_dir, {"claim_token": "t1", "job_id": "42"})
    first = open_experiment(str(save_dir), None, "t1")
    assert first.action == "fresh" and first.created_dir and "job 42" in first.note
    with pytest.raises(CheckpointDirectoryExistsError):
        open_experiment(str(save_dir), None, "someone-else")
    with pytest.raises(CheckpointDirectoryExistsError):
        open_experiment(str(save_dir), None)
    (save_dir / "logs").mkdir()
    own = checkpoint(save_dir, 5)
    requeued = open_experiment(str(save_dir), None, "t1")  # the same job after a requeue
    assert requeued.action == "resume" and requeued.resume_from == str(own) and requeued.resume_index == 1


def test_claimed_job_started_from_an_explicit_checkpoint(tmp_path: Path) -> None:
    source = tmp_path / "old"
    start = checkpoint(source, 9)
    save_dir = tmp_path / "new"
    save_dir.mkdir()
    write_owner(save_dir, {"claim_token": "t2", "job_id": "7"})
    first = open_experiment(str(save_dir), str(start), "t2")
    assert first.action == "resume" and first.resume_from == str(start.resolve()) and first.created_dir
    (save_dir / "logs").mkdir()
    again = open_experiment(str(save_dir), str(start), "t2")  # requeued before its own first checkpoint
    assert again.resume_from == str(start.resolve())
    own = checkpoint(save_dir, 12)
    later = open_experiment(str(save_dir), str(start), "t2")  # requeued after saving: continue from its own
    assert later.resume_from == str(own)
    assert (save_dir / OWNER_FILE).exists()


def test_lock_keeps_a_second_live_run_out(tmp_path: Path) -> None:
    lock = ExperimentLock(str(tmp_path))
    lock.acquire("99")
    with pytest.raises(ExperimentInUseError, match="Slurm job 99"):
        ExperimentLock(str(tmp_path)).acquire()
    lock.release()
    ExperimentLock(str(tmp_path)).acquire()


def _make_state(root: Path, state: str, tmp_path: Path) -> None:
    """An experiment directory in one of the states a user meets."""
    if state == "missing":
        return
    root.mkdir()
    if state == "foreign":
        (root / "data.csv").write_text("1,2")
    elif state == "owner_only":  # submitted, but the job never started (cancelled while pending)
        write_owner(root, {"claim_token": "old", "job_id": "5", "executor": "slurm"})
    elif state == "config_only":
        (root / "config.yml").write_text("training: {}\n")
    elif state in ("started", "with_checkpoint"):
        (root / "logs").mkdir()
        if state == "with_checkpoint":
            checkpoint(root, 4)


STATES = ["missing", "empty", "foreign", "owner_only", "config_only", "started", "with_checkpoint"]


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("resume", [None, "latest", "checkpoint"])
def test_submit_side_and_job_side_decide_alike(tmp_path: Path, state: str, resume: str | None) -> None:
    """One rule: what tsdia-submit accepts at submit time, a job without a claim token accepts too."""
    root = tmp_path / "exp"
    _make_state(root, state, tmp_path)
    if resume == "checkpoint":
        resume = str(checkpoint(tmp_path / "source", 2))

    def outcome(call):  # type: ignore[no-untyped-def]
        try:
            decision = call()
        except Exception as err:
            return type(err).__name__
        return (decision.action, decision.resume_from, decision.created_dir)

    submit_side = outcome(lambda: check_can_submit(str(root), resume))
    job_side = outcome(lambda: decide(str(root), resume))
    assert submit_side == job_side


def test_a_directory_claimed_but_never_started_resumes_as_a_fresh_start(tmp_path: Path) -> None:
    root = tmp_path / "exp"
    _make_state(root, "owner_only", tmp_path)
    claim = claim_for_submit(str(root), "latest", "cfg.yml", [], "slurm", job_is_active=lambda job: False)
    job = open_experiment(str(root), "latest", claim.token)
    assert job.action == "fresh" and job.created_dir and job.resume_index == 0
    plain = open_experiment(str(root), "latest")  # tsdia-train on the same directory agrees
    assert plain.action == "fresh" and plain.resume_index == 0
