"""Stopping on a signal: flag-only handler, agreed step, collective save, bounded requeue, exact resume."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import SMALL, Scenarios, quiet_env, run_train, with_plugins
from test_distributed import torchrun
from tsdia.errors import EXIT_STOPPED
from tsdia.experiment.attempts import AttemptRecord
from tsdia.training.after_stop import decide_requeue


def attempt(start: int, stop: int) -> AttemptRecord:
    return AttemptRecord(0, "1", 0, start, stop, "preemption (SIGUSR2)", "t")


def test_requeue_bounds() -> None:
    assert decide_requeue([attempt(0, 5)], 0, 3, False, False)[0]
    assert not decide_requeue([attempt(0, 5)], 3, 3, False, False)[0]  # max_requeues reached
    ok, why = decide_requeue([attempt(0, 5)], 0, 3, True, False)
    assert not ok and "crash" in why
    assert decide_requeue([attempt(0, 5)], 0, 3, True, True)[0]
    stuck = [attempt(5, 5), attempt(5, 5), attempt(5, 5)]
    ok, why = decide_requeue(stuck, 1, 10, False, False)
    assert not ok and "no new step" in why
    assert decide_requeue([*stuck, attempt(5, 9)], 1, 10, False, False)[0]


def plugin_env(tmp_path: Path) -> dict[str, str]:
    env = quiet_env(tmp_path)
    with_plugins(env)
    return env


@pytest.mark.slow
def test_preempted_three_times_ends_bitwise_equal(tmp_path: Path) -> None:
    """Stopped by SIGUSR2 at three different steps and resumed each time == one uninterrupted run."""
    common = [*SMALL, "model.target=crashy:SelfSignalingModel", "training.logging.wandb=true"]
    full, part = tmp_path / "full", tmp_path / "part"
    env = plugin_env(tmp_path)
    # The uninterrupted run trains on the other core while the stopped ones run one after another.
    uninterrupted = Scenarios(
        {
            "full": functools.partial(
                run_train,
                tmp_path,
                *common,
                f"training.checkpoint.save_dir={full}",
                env=plugin_env(tmp_path / "env-full"),  # its own WandB cache and data dirs
            )
        }
    )
    for i, call in enumerate([4, 5, 2]):  # stops at steps 4, 9 and 11 (calls count per process)
        args = [*common, f"training.checkpoint.save_dir={part}", f"model.signal_at_call={call}"]
        if i:
            args.append("training.checkpoint.resume=latest")
        result = run_train(tmp_path, *args, env=env)
        assert result.returncode == EXIT_STOPPED, result.stderr[-3000:]
        assert "Received SIGUSR2" in result.stdout + result.stderr
    final = run_train(
        tmp_path,
        *common,
        f"training.checkpoint.save_dir={part}",
        "training.checkpoint.resume=latest",
        env=env,
    )
    assert final.returncode == 0, final.stderr[-3000:]
    done = uninterrupted.result("full")
    uninterrupted.close()
    assert done.returncode == 0, done.stderr[-3000:]

    a = load_file(str(full / "checkpoint-epoch1-step16" / "model.safetensors"))
    b = load_file(str(part / "checkpoint-epoch1-step16" / "model.safetensors"))
    assert all(a[k].equal(b[k]) for k in a)

    logs = sorted(p.name for p in (part / "logs").glob("training_*.log"))
    assert [re.sub(r"_\d{8}_\d{6}", "", n) for n in logs] == [
        "training.log",
        "training_resume_1.log",
        "training_resume_2.log",
        "training_resume_3.log",
    ]
    attempts = json.loads((part / "checkpoints" / "attempts.json").read_text())
    assert [(a["start_step"], a["stop_step"]) for a in attempts] == [(0, 4), (4, 9), (9, 11), (11, 16)]
    assert [a["end"] for a in attempts] == ["signalled"] * 3 + ["completed"]
    info = json.loads((part / "wandb_info.json").read_text())
    run_dirs = list((part / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 4 and all(
        d.name.endswith(info["run_id"]) for d in run_dirs
    )  # one run id throughout


@pytest.mark.slow
def test_ranks_agree_on_the_stop_step(tmp_path: Path) -> None:
    """Only rank 1 is signalled; both ranks stop after the same step and save one complete checkpoint."""
    save_dir = tmp_path / "agree"
    result = torchrun(
        tmp_path,
        "model.target=crashy:SelfSignalingModel",
        "model.signal_at_call=2",
        "model.signal_rank=1",
        "training.preemption.check_interval=3",
        f"training.checkpoint.save_dir={save_dir}",
    )
    assert result.returncode != 0  # torchrun reports the workers' exit code 4 as a failure
    assert "exitcode  : 4" in result.stderr or "exitcode: 4" in result.stderr.replace(" ", "")
    # signalled during step 2; the first agreement check is after step 3
    assert (save_dir / "checkpoint-epoch0-step3" / "manifest.json").exists()
    state = json.loads((save_dir / "checkpoint-epoch0-step3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3


@pytest.mark.slow
def test_stop_on_an_epochs_last_step_validates_that_epoch_on_resume(tmp_path: Path) -> None:
    """Stopped after step 8 = the last batch of epoch 0, before its validation: the resumed run validates
    epoch 0 first, then trains on, and still ends bitwise equal to an uninterrupted run."""
    common = [*SMALL, "model.target=crashy:SelfSignalingModel", "training.logging.wandb=false"]
    full, part = tmp_path / "full", tmp_path / "part"
    env = plugin_env(tmp_path)
    uninterrupted = Scenarios(  # on the other core, meanwhile
        {
            "full": functools.partial(
                run_train, tmp_path, *common, f"training.checkpoint.save_dir={full}", env=env
            )
        }
    )
    stop = run_train(
        tmp_path, *common, f"training.checkpoint.save_dir={part}", "model.signal_at_call=8", env=env
    )
    assert stop.returncode == EXIT_STOPPED, stop.stderr[-2000:]
    assert "Validation at step 8" not in stop.stdout
    resumed = run_train(
        tmp_path,
        *common,
        f"training.checkpoint.save_dir={part}",
        "training.checkpoint.resume=latest",
        env=env,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Validation at step 8 (epoch 0)" in resumed.stdout
    done = uninterrupted.result("full")
    uninterrupted.close()
    assert done.returncode == 0, done.stderr[-2000:]
    a = load_file(str(full / "checkpoint-epoch1-step16" / "model.safetensors"))
    b = load_file(str(part / "checkpoint-epoch1-step16" / "model.safetensors"))
    assert all(a[k].equal(b[k]) for k in a)
