"""End to end on one process: the real CLI, real torch/accelerate, wandb offline and TensorBoard files."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import EXAMPLE, SMALL, quiet_env, run_train, tree, with_plugins
from tsdia.errors import directory_exists_message
from wandb_records import find_runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small complete run of the example, shared by the read-only tests below."""
    tmp = tmp_path_factory.mktemp("finished")
    save_dir = tmp / "exp"
    result = run_train(tmp, *SMALL, f"training.checkpoint.save_dir={save_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return save_dir


def test_layout(finished: Path) -> None:
    names = {p.name for p in finished.iterdir()}
    assert {
        "config.yml",
        "wandb_info.json",
        "logs",
        "checkpoints",
        "best_checkpoint",
        "hyperparameters.json",
    } <= names
    assert {"model_summary.txt", "wandb", "tensorboard"} <= names
    checkpoints = {p.name for p in finished.glob("checkpoint-epoch*-step*")}
    # Saved at steps 3, 6, 8 (validation), 9, 12, 15, 16 (validation, final); save_total_limit: 3 keeps
    # three: the best, the newest, and the next newest.
    best = finished / "best_checkpoint"
    assert best.is_symlink() and not Path(best.readlink()).is_absolute()
    assert str(best.readlink()) in {"checkpoint-epoch0-step8", "checkpoint-epoch1-step16"}
    newest = ["checkpoint-epoch1-step16", "checkpoint-epoch1-step15", "checkpoint-epoch1-step12"]
    expected = {str(best.readlink()), *newest}
    while len(expected) > 3:
        expected.discard(newest.pop())
    assert checkpoints == expected
    assert (finished / best.readlink() / "manifest.json").exists()
    final = finished / "checkpoint-epoch1-step16"
    assert (final / "model.safetensors").exists()
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["step"] == 16 and "val_loss" in manifest["metrics"]
    for rel, size in manifest["files"].items():
        assert (final / rel).stat().st_size == size
    logs = list((finished / "logs").glob("training_*.log"))
    assert len(logs) == 1 and re.fullmatch(r"training_\d{8}_\d{6}\.log", logs[0].name)
    assert not list((finished / "checkpoints").glob(".incomplete-*"))
    hparams = json.loads((finished / "hyperparameters.json").read_text())
    assert hparams["world_size"] == 1 and hparams["effective_batch_size"] == 16
    assert hparams["versions"]["torch"] and hparams["steps_per_epoch"] == 8
    summary = (finished / "model_summary.txt").read_text()
    assert "Trainable parameters" in summary and "encoder" in summary


def test_log_captures_console_and_collapses_progress(finished: Path) -> None:
    log = next((finished / "logs").glob("training_*.log")).read_text()
    assert "✓ Validation metrics logged to trackers" in log
    assert "Validation at step 8" in log and "Validation at step 16" in log
    assert "\r" not in log
    bar_lines = [line for line in log.splitlines() if line.startswith("train:")]
    assert 1 <= len(bar_lines) <= 4, bar_lines  # not one line per redraw


def test_config_copy_with_overrides_reproduces(finished: Path, tmp_path: Path) -> None:
    text = (finished / "config.yml").read_text()
    assert text.startswith("# Effective config") and "dataset.num_train=128" in text
    from tsdia.config import load_config

    config = load_config(str(finished / "config.yml"))
    assert config.dataset.kwargs["num_train"] == 128
    assert config.training.checkpoint.save_dir == str(finished)


def test_second_run_is_refused_and_changes_nothing(finished: Path, tmp_path: Path) -> None:
    before = tree(finished)
    result = run_train(tmp_path, *SMALL, f"training.checkpoint.save_dir={finished}")
    assert result.returncode == 2
    assert directory_exists_message(str(finished)) in result.stderr
    assert "Traceback" not in result.stderr
    assert tree(finished) == before


def test_wandb_offline_run_has_nested_config_and_val_metrics(finished: Path) -> None:
    info = json.loads((finished / "wandb_info.json").read_text())
    assert info["run_url"] is None and info["mode"] == "offline"
    assert set(info) >= {
        "run_id",
        "run_name",
        "project",
        "entity",
        "timestamp",
        "offline_run_dir",
        "sync_command",
    }
    assert info["sync_command"].startswith("wandb sync ")
    runs = find_runs(finished / "wandb")
    assert [r.run_id for r in runs] == [info["run_id"]]
    config = runs[0].config
    assert config["model"]["num_layers"] == 1 and config["dataset"]["num_train"] == 128
    assert config["training"]["checkpoint"]["interval"] == 3
    val_steps = [row["_step"] for row in runs[0].history if "val_loss" in row]
    assert val_steps == [8, 16]
    train_steps = [row["_step"] for row in runs[0].history if "train_loss" in row]
    assert train_steps == list(range(2, 17, 2))


def test_tensorboard_events(finished: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(finished / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("val_loss")] == [8, 16]
    assert [e.step for e in events.Scalars("train_loss")] == list(range(2, 17, 2))
    assert "config/text_summary" in events.Tags()["tensors"]


def test_val_loss_falls_on_the_example(tmp_path: Path) -> None:
    """The built-in example as configured learns: the last val_loss is well below the first."""
    save_dir = tmp_path / "learn"
    args = ["training.logging.wandb=false"]
    result = run_train(
        tmp_path, *args, f"training.checkpoint.save_dir={save_dir}", "training.logging.progress_bar=false"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [float(v) for v in re.findall(r"val_loss=([0-9.]+)", result.stdout)]
    accuracy = [float(v) for v in re.findall(r"val_accuracy=([0-9.]+)", result.stdout)]
    assert len(losses) == 4 and losses[-1] < 0.6 * losses[0], losses
    assert accuracy[-1] > accuracy[0]


def _weights(checkpoint: Path) -> dict:  # type: ignore[type-arg]
    return load_file(str(checkpoint / "model.safetensors"))


def test_exact_resume_and_resume_logs(tmp_path: Path) -> None:
    """Stopped at step 5 (mid-epoch) and resumed == uninterrupted, bitwise; logs name N=1 then N=2."""
    common = [
        *SMALL,
        "training.logging.interval=1",
        "training.logging.wandb=false",
        "training.checkpoint.interval=100",
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_train(tmp_path, *common, f"training.checkpoint.save_dir={full}").returncode == 0
    first = run_train(tmp_path, *common, f"training.checkpoint.save_dir={part}", "training.max_steps=5")
    assert first.returncode == 0, first.stderr[-2000:]
    assert (part / "checkpoint-epoch0-step5").is_dir()
    resumed = run_train(
        tmp_path, *common, f"training.checkpoint.save_dir={part}", "training.checkpoint.resume=latest"
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming from" in resumed.stdout

    a, b = _weights(full / "checkpoint-epoch1-step16"), _weights(part / "checkpoint-epoch1-step16")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].equal(b[name]), name

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def losses(save_dir: Path) -> dict[int, float]:
        events = EventAccumulator(str(save_dir / "tensorboard"), size_guidance={"scalars": 0})
        events.Reload()
        return {e.step: e.value for e in events.Scalars("train_loss")}

    assert losses(full) == losses(part)  # every step, including those before the stop: no duplicates

    again = run_train(
        tmp_path, *common, f"training.checkpoint.save_dir={part}", "training.checkpoint.resume=latest"
    )
    assert again.returncode == 0, again.stderr[-2000:]
    names = sorted(p.name for p in (part / "logs").glob("training_*.log"))
    assert len(names) == 3
    assert re.fullmatch(r"training_resume_1_\d{8}_\d{6}\.log", names[1])
    assert re.fullmatch(r"training_resume_2_\d{8}_\d{6}\.log", names[2])
    assert re.fullmatch(r"training_\d{8}_\d{6}\.log", names[0])


def test_resume_from_explicit_checkpoint_path(tmp_path: Path) -> None:
    save_dir = tmp_path / "exp"
    args = [*SMALL, "training.logging.wandb=false", f"training.checkpoint.save_dir={save_dir}"]
    assert run_train(tmp_path, *args, "training.max_steps=4").returncode == 0
    checkpoint = save_dir / "checkpoint-epoch0-step3"
    result = run_train(tmp_path, *args, f"training.checkpoint.resume={checkpoint}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Resuming from {checkpoint}" in result.stdout


def test_crash_traceback_and_all_output_land_in_the_log(tmp_path: Path) -> None:
    save_dir = tmp_path / "crash"
    env = quiet_env(tmp_path)
    with_plugins(env)
    result = run_train(
        tmp_path,
        *SMALL,
        "model.target=crashy:CrashingModel",
        "model.crash_at_call=3",
        "training.logging.wandb=false",
        f"training.checkpoint.save_dir={save_dir}",
        env=env,
    )
    assert result.returncode == 1
    assert "RuntimeError: boom at call 3" in result.stderr  # the console still gets it
    log = next((save_dir / "logs").glob("training_*.log")).read_text()
    for expected in [
        "plugin: hello from print",
        "plugin: a warning",
        "plugin: a logging record",
        "plugin: from a child process",
        "plugin: child stderr",
        "Traceback (most recent call last)",
        "RuntimeError: boom at call 3",
    ]:
        assert expected in log, expected


def test_unknown_model_argument_creates_nothing(tmp_path: Path) -> None:
    save_dir = tmp_path / "never"
    result = run_train(tmp_path, "model.d_modle=32", f"training.checkpoint.save_dir={save_dir}")
    assert result.returncode == 2
    assert "unknown key 'model.d_modle'" in result.stderr and "Did you mean 'd_model'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not save_dir.exists()


def test_missing_target_module(tmp_path: Path) -> None:
    result = run_train(
        tmp_path, "dataset.target=no_such_pkg.data:build", f"training.checkpoint.save_dir={tmp_path}/x"
    )
    assert result.returncode == 2 and "cannot import module 'no_such_pkg.data'" in result.stderr
    assert not (tmp_path / "x").exists()


def test_config_copy_is_byte_identical_without_overrides(tmp_path: Path) -> None:
    text = EXAMPLE.read_text().replace("save_dir: ./runs/example", f"save_dir: {tmp_path / 'exp'}")
    for override in SMALL:
        key, value = override.split("=")
        leaf = key.split(".")[-1]
        text = re.sub(rf"(?m)^(\s+{leaf}:) .*$", rf"\1 {value}", text, count=1)
    text = text.replace("wandb: true", "wandb: false") + "# a comment that must survive\n"
    config = tmp_path / "mine.yml"
    config.write_bytes(text.encode())
    result = run_train(tmp_path, config=config)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "exp" / "config.yml").read_bytes() == config.read_bytes()
    shutil.rmtree(tmp_path / "exp")


def test_async_save_keeps_checkpoints_atomic_and_resume_exact(tmp_path: Path) -> None:
    """Background writes from host buffers: same files, same weights as synchronous saving, exact resume."""
    common = [*SMALL, "training.logging.wandb=false", "training.checkpoint.async_save=true"]
    sync, part = tmp_path / "sync", tmp_path / "part"
    assert (
        run_train(
            tmp_path, *SMALL, "training.logging.wandb=false", f"training.checkpoint.save_dir={sync}"
        ).returncode
        == 0
    )
    first = run_train(tmp_path, *common, f"training.checkpoint.save_dir={part}", "training.max_steps=7")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "Saved checkpoint-epoch0-step3 in the background" in first.stderr + first.stdout
    assert (part / "checkpoint-epoch0-step6" / "manifest.json").exists()
    resumed = run_train(
        tmp_path, *common, f"training.checkpoint.save_dir={part}", "training.checkpoint.resume=latest"
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _weights(sync / "checkpoint-epoch1-step16"), _weights(part / "checkpoint-epoch1-step16")
    assert all(a[name].equal(b[name]) for name in a)
    for name in ("checkpoint-epoch1-step15", "checkpoint-epoch1-step16"):
        assert sorted(p.name for p in (sync / name).iterdir()) == sorted(
            p.name for p in (part / name).iterdir()
        )
    assert not list((part / "checkpoints").glob(".incomplete-*"))
