"""Tests for the offline-run reader in ``wandb_records.py``, against real wandb offline runs."""

from __future__ import annotations

from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb")

from wandb_records import WandbRun, find_runs, iter_records, read_run  # noqa: E402

# Keep each wandb.init fast and quiet: no system-stats sampler, no git/pip metadata, no console capture.
_SETTINGS = {"x_disable_stats": True, "x_disable_meta": True, "console": "off"}


@pytest.fixture
def wandb_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Point everything wandb writes into ``tmp_path``; yields the ``.../wandb`` directory runs land in."""
    dirs = {
        "WANDB_DIR": "",
        "WANDB_CONFIG_DIR": "config",
        "WANDB_CACHE_DIR": "cache",
        "WANDB_DATA_DIR": "data",
        "WANDB_ARTIFACT_DIR": "artifacts",
    }
    for var, sub in dirs.items():
        (tmp_path / sub).mkdir(exist_ok=True)
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield tmp_path / "wandb"
    # wandb.setup() is a process-wide singleton that caches env settings (WANDB_DIR...) and keeps a
    # wandb-core child process alive; tear it down so the next test starts clean.
    wandb.teardown()


def _init(wandb_dir: Path, **kwargs):
    # dir= is passed explicitly as well: the env is only read when the wandb singleton is first set up.
    return wandb.init(
        project="tsdia-test", dir=wandb_dir.parent, settings=wandb.Settings(**_SETTINGS), **kwargs
    )


def test_nested_config_round_trips(wandb_dir: Path) -> None:
    config = {
        "model": {"dim": 256, "layers": [{"kind": "conv", "k": 3}, {"kind": "attn", "heads": 4}]},
        "lr": 3e-4,
        "tags": ["a", "b"],
        "seed": None,
        "use_amp": True,
    }
    run = _init(wandb_dir, config=config)
    run.config.update({"data": {"paths": ["/x", "/y"], "sr": 16000}})
    run.finish()
    wandb.teardown()  # wait for wandb-core to write everything before reading

    (result,) = find_runs(wandb_dir)
    assert result.config == {**config, "data": {"paths": ["/x", "/y"], "sr": 16000}}
    assert result.run_id == run.id


def test_history_rows_at_logged_steps(wandb_dir: Path) -> None:
    run = _init(wandb_dir)
    run.log({"train/loss": 1.0})  # implicit step 0
    run.log({"val_loss": 0.5}, step=5)
    run.log({"val_loss": 0.25, "metrics": {"der": 0.1}}, step=10)
    run.summary["best_val_loss"] = 0.25
    run.finish()
    wandb.teardown()  # wait for wandb-core to write everything before reading

    result = read_run(next(wandb_dir.glob("offline-run-*")))
    assert [row["_step"] for row in result.history] == [0, 5, 10]
    assert result.history[0]["train/loss"] == 1.0
    assert [row.get("val_loss") for row in result.history] == [None, 0.5, 0.25]
    assert result.history[2]["metrics"] == {"der": 0.1}  # nested dicts come back nested
    assert {"_timestamp", "_runtime"} <= result.history[1].keys()
    assert result.summary["val_loss"] == 0.25
    assert result.summary["best_val_loss"] == 0.25
    assert result.summary["_step"] == 10
    assert "_wandb" not in result.summary


def test_resumed_run_found_with_same_id(wandb_dir: Path) -> None:
    first = _init(wandb_dir, id="resumeme", config={"lr": 0.1})
    first.log({"loss": 2.0})
    first.finish()
    second = _init(wandb_dir, id="resumeme", resume="allow")
    second.config.update({"resumed": True})
    second.log({"loss": 1.0})
    second.finish()

    runs = find_runs(wandb_dir)
    assert [r.run_id for r in runs] == ["resumeme", "resumeme"]
    assert len({r.run_dir for r in runs}) == 2
    assert runs[0].start_time < runs[1].start_time
    assert runs[0].config == {"lr": 0.1}
    assert runs[1].config == {"resumed": True}  # offline resume cannot fetch the first run's config
    assert [row["loss"] for r in runs for row in r.history] == [2.0, 1.0]


def test_read_after_finish_and_teardown(wandb_dir: Path) -> None:
    """What tsdia's runs leave behind: the log as complete as wandb's service wrote it."""
    run = _init(wandb_dir, config={"a": 1})
    for step in range(3):
        run.log({"loss": float(step)})
    run.finish()
    wandb.teardown()  # waits for wandb-core; right after finish() alone the log may still be short

    result = read_run(next(wandb_dir.glob("offline-run-*")))
    assert [row["loss"] for row in result.history] == [0.0, 1.0, 2.0]
    assert result.records[-1].WhichOneof("record_type") == "exit"
    assert result.config == {"a": 1}


def test_large_record_spans_blocks_and_torn_tail_is_ignored(wandb_dir: Path, tmp_path: Path) -> None:
    run = _init(wandb_dir)
    run.log({"blob": "x" * 100_000})  # > 3 LevelDB blocks of 32 KiB: FIRST/MIDDLE/LAST chunks
    run.log({"loss": 1.0})
    run.finish()
    wandb.teardown()  # wait for wandb-core to write everything before reading

    result: WandbRun = find_runs(wandb_dir)[0]
    assert len(result.history[0]["blob"]) == 100_000
    assert result.history[1]["loss"] == 1.0

    # A log cut mid-record (a writer killed mid-write) yields the complete records before the cut.
    log = next(result.run_dir.glob("run-*.wandb"))
    torn = tmp_path / "torn.wandb"
    torn.write_bytes(log.read_bytes()[:50_000])
    assert 0 < len(list(iter_records(torn))) < len(result.records)

    bad = tmp_path / "bad.wandb"
    bad.write_bytes(b"not a wandb file")
    with pytest.raises(ValueError, match=r"not a \.wandb log"):
        list(iter_records(bad))
