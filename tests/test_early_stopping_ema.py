"""Early stopping and the EMA of the weights: both survive a stop and a resume bitwise."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import EXAMPLE, SMALL, quiet_env, run_train, with_plugins
from tsdia.config import load_config
from tsdia.config.schema import ConfigSource, EarlyStoppingConfig
from tsdia.errors import EXIT_STOPPED, CheckpointError, ConfigError
from tsdia.follow import status
from tsdia.training.early_stopping import EarlyStopping, EarlyStoppingState, build_early_stopping
from tsdia.training.ema import EMA, EMA_FILE, build_ema
from tsdia.training.run_state import Progress, checkpoint_state, restore_state

QUIET = [
    *SMALL,
    "training.logging.wandb=false",
    "training.logging.progress_bar=false",
    "model.target=crashy:SelfSignalingModel",
]
# min_delta so large that only the first validation is an improvement: with patience 2 the run stops at
# its third validation, step 24 of 48 (8 steps per epoch), whatever the losses are.
STOPPING = [
    "training.epochs=6",
    "training.early_stopping.metric=val_loss",
    "training.early_stopping.patience=2",
    "training.early_stopping.min_delta=10",
]
EMA_ARGS = [
    "training.ema.decay=0.9",
    "training.ema.start_step=3",
    "training.ema.every=2",
    "training.ema.validate_on=both",
    "training.checkpoint.best_metric=val_ema_loss",
    "training.checkpoint.save_total_limit=null",
    "training.checkpoint.async_save=true",  # the EMA's host copy goes through the background writer too
]


def no_slurm(cmd: list[str]) -> str | None:
    raise AssertionError(f"Slurm was asked ({cmd}) although the experiment has no job")


def plugin_env(tmp_path: Path) -> dict[str, str]:
    return with_plugins(quiet_env(tmp_path))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a and a.keys() == b.keys()
    for name in a:
        assert a[name].equal(b[name]), name


# --- early stopping -------------------------------------------------------------------------------------


def test_early_stopping_counts_and_stops() -> None:
    stopping = EarlyStopping(
        EarlyStoppingConfig(metric="val_acc", mode="max", patience=2, min_delta=0.1), ConfigSource()
    )
    assert not stopping.update({"val_acc": 0.5}, 10)
    assert not stopping.update({"val_acc": 0.55}, 20)  # not by more than min_delta
    assert not stopping.update({"val_acc": 0.7}, 30)  # an improvement resets the count
    assert not stopping.update({"val_acc": math.nan}, 40)  # NaN never improves
    assert stopping.update({"val_acc": 0.75}, 50)
    assert stopping.state.stopped_at == 50 and stopping.state.best == 0.7 and stopping.state.best_step == 30
    assert (
        "val_acc did not improve by more than 0.1 for 2 validations (best 0.7 at step 30)"
        in stopping.reason()
    )
    again = EarlyStopping(stopping.config, ConfigSource())
    again.load_state_dict(json.loads(json.dumps(stopping.state_dict())))  # through trainer_state.json
    assert again.state == stopping.state and again.stopped
    with pytest.raises(
        ConfigError, match=r"training.early_stopping.metric: 'val_acc' is not among .*val_loss"
    ):
        EarlyStopping(stopping.config, ConfigSource()).update({"val_loss": 1.0}, 10)


def test_early_stopping_stops_at_the_same_step_after_a_stop_and_resume(tmp_path: Path) -> None:
    """(a) stops at step 24 with a final checkpoint, exit 0, stop_reason logged; (b) stopped by a signal at step
    20 (after the first validation without improvement) and resumed, it stops at 24 too, bitwise equal."""
    env = plugin_env(tmp_path)
    full, part = tmp_path / "full", tmp_path / "part"
    straight = run_train(tmp_path, *QUIET, *STOPPING, f"training.checkpoint.save_dir={full}", env=env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    reason = "early_stopping: val_loss did not improve by more than 10 for 2 validations (best "
    assert "Done: 24 steps (" + reason in straight.stdout
    final = full / "checkpoint-epoch2-step24"
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["early_stopping"] == {
        "best": state["early_stopping"]["best"],
        "best_step": 8,
        "bad_validations": 2,
        "stopped_at": 24,
    }
    assert sorted(p.name for p in full.glob("checkpoint-*"))[-1] == final.name  # nothing after the stop
    log = next((full / "logs").glob("training_*.log")).read_text()
    assert "Stopping at step 24: " + reason in log and "(final)" in log
    attempts = json.loads((full / "checkpoints" / "attempts.json").read_text())
    assert attempts[-1]["end"] == "completed" and attempts[-1]["reason"].startswith(reason)
    assert json.loads((full / "logs" / "progress.json").read_text())["state"] == "finished"
    (row,) = status.collect([str(full)], run=no_slurm)
    assert row.state == "COMPLETED" and row.detail.startswith(reason)

    stopped = run_train(
        tmp_path,
        *QUIET,
        *STOPPING,
        f"training.checkpoint.save_dir={part}",
        "model.signal_at_call=20",
        env=env,
    )
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    at_stop = json.loads((part / "checkpoint-epoch2-step20" / "trainer_state.json").read_text())
    assert (
        at_stop["early_stopping"]["bad_validations"] == 1 and at_stop["early_stopping"]["stopped_at"] is None
    )
    resumed = run_train(
        tmp_path,
        *QUIET,
        *STOPPING,
        f"training.checkpoint.save_dir={part}",
        "training.checkpoint.resume=latest",
        env=env,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Done: 24 steps (" + reason in resumed.stdout
    assert_same_tensors(
        load_file(str(final / "model.safetensors")),
        load_file(str(part / "checkpoint-epoch2-step24" / "model.safetensors")),
    )
    assert json.loads((part / "checkpoint-epoch2-step24" / "trainer_state.json").read_text()) == state

    # An early-stopped run stays stopped when it is resumed: no step is trained.
    again = run_train(
        tmp_path,
        *QUIET,
        *STOPPING,
        f"training.checkpoint.save_dir={full}",
        "training.checkpoint.resume=latest",
        env=env,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Done: 24 steps (" + reason in again.stdout
    assert sorted(p.name for p in full.glob("checkpoint-*"))[-1] == final.name


def test_unknown_early_stopping_metric_is_named_at_the_first_validation(tmp_path: Path) -> None:
    result = run_train(
        tmp_path,
        *SMALL,
        "training.logging.wandb=false",
        "training.early_stopping.metric=val_f1",
        f"training.checkpoint.save_dir={tmp_path / 'exp'}",
    )
    assert result.returncode == 2
    assert (
        "training.early_stopping.metric: 'val_f1' is not among this run's validation metrics" in result.stderr
    )
    assert "val_accuracy, val_loss" in result.stderr and "Traceback" not in result.stderr


# --- EMA ------------------------------------------------------------------------------------------------


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 3)
        self.out = nn.Linear(3, 4, bias=False)
        self.out.weight = self.embed.weight  # tied: one EMA entry, under the first name
        self.norm = nn.BatchNorm1d(3)


def test_ema_updates_swaps_and_restores_exactly() -> None:
    torch.manual_seed(0)
    model = Tied()
    ema = EMA(model, decay=0.5, start_step=2, every=2)
    assert set(ema.state_dict()) == {
        "embed.weight",
        "norm.weight",
        "norm.bias",
        "norm.running_mean",
        "norm.running_var",
        "norm.num_batches_tracked",
    }
    assert ema.state_dict()["embed.weight"].dtype == torch.float32
    with torch.no_grad():
        model.embed.weight.fill_(1.0)
    ema.after_step(1)  # not an `every` step: unchanged
    assert not ema.shadow["embed.weight"].eq(1.0).all()
    ema.after_step(2)  # up to start_step it copies the weights
    assert ema.shadow["embed.weight"].eq(1.0).all()
    with torch.no_grad():
        model.embed.weight.fill_(3.0)
        model.norm.num_batches_tracked.fill_(7)
    ema.after_step(3)
    assert ema.shadow["embed.weight"].eq(1.0).all()
    ema.after_step(4)  # 0.5 * 1 + 0.5 * 3
    assert ema.shadow["embed.weight"].eq(2.0).all() and int(ema.shadow["norm.num_batches_tracked"]) == 7
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped_in():
        assert model.out.weight.eq(2.0).all()  # the tied weight follows
    assert_same_tensors(before, model.state_dict())
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


def test_ema_loads_its_file_or_starts_from_the_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = Tied()
    ema = EMA(model, decay=0.9)
    saved = {k: v + 1 for k, v in ema.state_dict().items()}
    save_file(saved, str(tmp_path / EMA_FILE))
    ema.load_checkpoint(tmp_path)
    assert_same_tensors(ema.state_dict(), saved)
    (tmp_path / "old").mkdir()  # a checkpoint saved before training.ema was set
    ema.load_checkpoint(tmp_path / "old")
    assert_same_tensors(
        ema.state_dict(), {k: v.float() for k, v in model.state_dict().items() if k != "out.weight"}
    )
    assert f"has no {EMA_FILE}" in caplog.text
    save_file({"other.weight": torch.zeros(1)}, str(tmp_path / "old" / EMA_FILE))
    with pytest.raises(CheckpointError, match="does not match the model"):
        ema.load_checkpoint(tmp_path / "old")


def test_checkpoints_without_early_stopping_counters_still_load() -> None:
    stopping = EarlyStopping(EarlyStoppingConfig(metric="val_loss"), ConfigSource())
    stopping.update({"val_loss": 1.0}, 8)
    old = {"global_step": 8, "epoch": 1, "batches_in_epoch": 0, "last_val_step": 8}
    assert restore_state(dict(old), stopping) == Progress(8, 1, 0, 8)
    assert stopping.state == EarlyStoppingState()  # counted afresh
    assert restore_state({**old, "early_stopping": {"best": 0.5}}, None) == Progress(8, 1, 0, 8)
    # (samples_in_epoch -1 and world_size 0: an older checkpoint's geometry is derived on resume)
    assert checkpoint_state(Progress(8, 1, 0, 8), None) == {**old, "samples_in_epoch": -1, "world_size": 0}


def test_ema_resumes_exactly_and_validates_on_both(tmp_path: Path) -> None:
    """(c) stopped by a signal at step 5 and resumed: final weights and ema.safetensors bitwise equal to a
    straight run, in every checkpoint both have; val_ and val_ema_ metrics; best by val_ema_loss."""
    env = plugin_env(tmp_path)
    full, part = tmp_path / "full", tmp_path / "part"
    straight = run_train(tmp_path, *QUIET, *EMA_ARGS, f"training.checkpoint.save_dir={full}", env=env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = run_train(
        tmp_path, *QUIET, *EMA_ARGS, f"training.checkpoint.save_dir={part}", "model.signal_at_call=5", env=env
    )
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    resumed = run_train(
        tmp_path,
        *QUIET,
        *EMA_ARGS,
        f"training.checkpoint.save_dir={part}",
        "training.checkpoint.resume=latest",
        env=env,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    common = sorted({p.name for p in full.glob("checkpoint-*")} & {p.name for p in part.glob("checkpoint-*")})
    assert common == sorted(
        f"checkpoint-epoch{s // 9}-step{s}" for s in (3, 6, 8, 9, 12, 15, 16)
    )  # all but 5
    for name in common:
        for file in ("model.safetensors", EMA_FILE):
            assert_same_tensors(load_file(str(full / name / file)), load_file(str(part / name / file)))
    weights = load_file(str(full / "checkpoint-epoch1-step16" / "model.safetensors"))
    ema = load_file(str(full / "checkpoint-epoch1-step16" / EMA_FILE))
    assert ema.keys() == weights.keys()  # what `tsdia export --ema` relies on
    assert not all(ema[k].equal(weights[k]) for k in ema)  # an average, not a copy

    index = json.loads((full / "checkpoints" / "index.json").read_text())
    validated = {c["name"]: c["metrics"] for c in index["checkpoints"] if c["metrics"]}
    assert all(
        {"val_loss", "val_ema_loss", "val_accuracy", "val_ema_accuracy"} <= m.keys()
        for m in validated.values()
    )
    assert index["best"] == min(validated, key=lambda name: validated[name]["val_ema_loss"])
    assert (full / "best_checkpoint").resolve().name == index["best"]


# EMA under ZeRO-2 (2 ranks) resuming exactly: tests/test_distributed.py::test_zero2_resumes_exactly_with_an_ema


# --- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["training.ema.decay=1.0"], "training.ema.decay: got 1.0; must be less than 1"),
        (["training.ema.decay=0"], "training.ema.decay: got 0.0; must be greater than 0"),
        (
            ["training.early_stopping.metric=loss"],
            "training.early_stopping.metric: 'loss' is not a validation metric",
        ),
        (
            ["training.early_stopping.metric=val_ema_loss"],
            "training.early_stopping.metric: 'val_ema_loss' is measured on the EMA weights, but training.ema.decay is null",
        ),
        (
            [
                "training.ema.decay=0.99",
                "training.ema.validate_on=raw",
                "training.checkpoint.best_metric=val_ema_loss",
            ],
            "training.checkpoint.best_metric: 'val_ema_loss' is measured on the EMA weights, but training.ema.validate_on is 'raw'",
        ),
        (
            ["training.ema.decay=0.99", "training.ema.validate_on=ema"],
            "training.checkpoint.best_metric: 'val_loss' is measured on the raw weights",
        ),
        (
            ["training.ema.decay=0.99", "distributed.deepspeed.zero_stage=3"],
            "training.ema.decay: an EMA of the weights needs the full parameters on every rank, but "
            "distributed.deepspeed.zero_stage is 3",
        ),
    ],
)
def test_bad_input_names_the_key(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(str(EXAMPLE), ["training.checkpoint.save_dir=x", *overrides])
    assert expected in str(caught.value)


def test_run_time_refusals_name_the_key() -> None:
    """What the loader cannot see: ZeRO-3 set in a DeepSpeed JSON file; a run without validation data."""
    config = load_config(str(EXAMPLE), ["training.checkpoint.save_dir=x", "training.ema.decay=0.9"])
    with pytest.raises(ConfigError, match=r"training.ema.decay: .* sets ZeRO stage 3"):
        build_ema(config, nn.Linear(2, 2), zero_stage=3)
    assert build_ema(config, nn.Linear(2, 2), zero_stage=2) is not None
    config = load_config(
        str(EXAMPLE), ["training.checkpoint.save_dir=x", "training.early_stopping.metric=val_loss"]
    )
    with pytest.raises(ConfigError, match=r"training.early_stopping.metric: .* no validation data"):
        build_early_stopping(config, has_validation=False)


def test_bad_decay_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    save_dir = tmp_path / "never"
    result = run_train(tmp_path, "training.ema.decay=1.5", f"training.checkpoint.save_dir={save_dir}")
    assert result.returncode == 2
    assert (
        "override 'training.ema.decay=1.5': training.ema.decay: got 1.5; must be less than 1" in result.stderr
    )
    assert "Traceback" not in result.stderr and not save_dir.exists()
