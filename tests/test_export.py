"""`tsdia export` (best, averaged, EMA), `keep_best` rotation, `tsdia.load_model` and `training.init_from`,
on real short runs of the built-in example."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, SMALL, quiet_env, run_train, tree

pytestmark = pytest.mark.slow

# 4 epochs of 8 steps; a checkpoint every 5 steps and after every validation (steps 8, 16, 24, 32).
SOURCE = [
    *SMALL,
    "training.epochs=4",
    "training.checkpoint.interval=5",
    "training.checkpoint.save_total_limit=3",
    "training.checkpoint.keep_best=3",
    "training.logging.wandb=false",
    "training.logging.progress_bar=false",
]


def tsdia_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tsdia.follow.cli", *args],
        cwd=REPO,
        env=quiet_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )


def val_losses(save_dir: Path) -> dict[int, float]:
    """Every validation's val_loss by step, from the TensorBoard events (rotation deletes manifests)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(save_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars("val_loss")}


def manifest(checkpoint: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((checkpoint / "manifest.json").read_text())


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished experiment, shared by the read-only tests below."""
    tmp = tmp_path_factory.mktemp("source")
    save_dir = tmp / "exp"
    result = run_train(tmp, *SOURCE, f"training.checkpoint.save_dir={save_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return save_dir


def best_three(source: Path) -> list[Path]:
    ranked = sorted(
        (p for p in source.glob("checkpoint-epoch*-step*") if "val_loss" in manifest(p)["metrics"]),
        key=lambda p: manifest(p)["metrics"]["val_loss"],
    )
    return ranked[:3]


def mean_of(paths: list[Path], name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    states = [load_file(str(p / name)) for p in paths]
    return {k: (sum(s[k].double() for s in states) / len(states)).float() for k in states[0]}  # type: ignore[union-attr]


def test_keep_best_keeps_the_three_best_and_the_newest(source: Path) -> None:
    losses = val_losses(source)
    assert sorted(losses) == [8, 16, 24, 32]
    best = sorted(losses, key=lambda step: losses[step])[:3]
    kept = {int(p.name.rsplit("step", 1)[1]) for p in source.glob("checkpoint-epoch*-step*")}
    # Without keep_best the rotation would keep the best, the newest (32) and the next newest (30).
    assert kept == {*best, 32}
    for path in source.glob("checkpoint-epoch*-step*"):
        step = manifest(path)["step"]
        assert manifest(path)["metrics"]["val_loss"] == pytest.approx(losses[step], rel=1e-6)


def test_export_average_best_3_is_the_mean(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "avg"
    result = tsdia_cli(tmp_path, "export", str(source), "--average-best", "3", "-o", str(out))
    assert result.returncode == 0, result.stderr
    three = best_three(source)
    expected = mean_of(three)
    exported = load_file(str(out / "model.safetensors"))
    assert exported.keys() == expected.keys()
    for name, tensor in expected.items():
        assert exported[name].dtype == torch.float32
        assert exported[name].equal(tensor), name
    best_alone = load_file(str(three[0] / "model.safetensors"))
    assert any(not best_alone[k].equal(exported[k]) for k in exported)  # really an average, not the best
    assert (out / "config.yml").read_bytes() == (source / "config.yml").read_bytes()
    record = json.loads((out / "export.json").read_text())
    assert [c["name"] for c in record["checkpoints"]] == [p.name for p in three]
    assert [c["metrics"] for c in record["checkpoints"]] == [manifest(p)["metrics"] for p in three]
    assert record["metric"] == "val_loss" and record["mode"] == "min" and record["average_best"] == 3
    assert record["command"] == f"tsdia export {source} --average-best 3 -o {out}"
    assert record["dtype"] == "fp32" and record["ema"] is False

    import tsdia

    model = tsdia.load_model(out)
    assert not model.training
    for name, tensor in model.state_dict().items():
        assert tensor.equal(expected[name]), name


def test_export_bf16_and_default_best(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    result = tsdia_cli(
        tmp_path, "export", str(source), "--average-best", "3", "--dtype", "bf16", "-o", str(out)
    )
    assert result.returncode == 0, result.stderr
    exported = load_file(str(out / "model.safetensors"))
    for name, tensor in mean_of(best_three(source)).items():
        assert exported[name].dtype == torch.bfloat16 and exported[name].equal(tensor.to(torch.bfloat16)), (
            name
        )

    best = tmp_path / "best"
    assert tsdia_cli(tmp_path, "export", str(source), "-o", str(best)).returncode == 0
    weights = load_file(str(best / "model.safetensors"))
    source_best = load_file(str(source / "best_checkpoint" / "model.safetensors"))
    assert all(weights[k].equal(source_best[k]) for k in source_best)


def test_export_ema_averages_the_ema_weights(source: Path, tmp_path: Path) -> None:
    """EMA files are written here by hand; the trainer's side of EMA is tested with training.ema."""
    copy = tmp_path / "exp"
    copy.mkdir()
    shutil.copy(source / "config.yml", copy / "config.yml")
    for checkpoint in best_three(source):
        target = copy / checkpoint.name
        shutil.copytree(checkpoint, target)
        weights = load_file(str(checkpoint / "model.safetensors"))
        save_file({k: v * 0.5 + 1.0 for k, v in weights.items()}, str(target / "ema.safetensors"))
    out = tmp_path / "ema"
    result = tsdia_cli(tmp_path, "export", str(copy), "--average-best", "3", "--ema", "-o", str(out))
    assert result.returncode == 0, result.stderr
    exported = load_file(str(out / "model.safetensors"))
    expected = mean_of(best_three(copy), "ema.safetensors")
    assert all(exported[k].equal(v) for k, v in expected.items())
    assert json.loads((out / "export.json").read_text())["ema"] is True


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--average-best", "5"], ["--average-best 5", "only 4", "training.checkpoint.keep_best: 5"]),
        (["--metric", "val_los"], ["--metric val_los", "recorded: val_accuracy, val_loss"]),
        (["--ema"], ["has no ema.safetensors", "training.ema"]),
    ],
    ids=["more-than-kept", "unknown-metric", "no-ema"],
)
def test_export_refusals_write_nothing(
    source: Path, tmp_path: Path, args: list[str], expected: list[str]
) -> None:
    before = tree(source)
    out = tmp_path / "out" / "export"
    result = tsdia_cli(tmp_path, "export", str(source), *args, "-o", str(out))
    assert result.returncode == 2
    message = result.stderr.strip()
    assert message.startswith("tsdia: error:") and "\n" not in message and "Traceback" not in message
    for text in expected:
        assert text in message, message
    assert not (tmp_path / "out").exists()
    assert tree(source) == before


def validation_loss(model: torch.nn.Module, config_overrides: dict[str, int]) -> float:
    """The trainer's validation: the mean of per-batch losses over the validation set, in eval mode."""
    from torch.utils.data import DataLoader

    from tsdia.examples.tsvad import build_datasets

    _, val = build_datasets(**config_overrides)
    losses = [model(batch)["loss"].item() for batch in DataLoader(val, batch_size=64)]
    return sum(losses) / len(losses)


def test_load_model_reproduces_the_validation_loss(source: Path) -> None:
    import tsdia

    with torch.no_grad():
        for path in (source, source / "checkpoint-epoch3-step32"):
            model = tsdia.load_model(path)
            checkpoint = (source / "best_checkpoint").resolve() if path == source else path
            loss = validation_loss(model, {"num_train": 128, "num_val": 32})
            assert loss == pytest.approx(manifest(checkpoint)["metrics"]["val_loss"], rel=1e-5)


FINE_TUNE = [
    *SMALL,
    "training.epochs=1",
    "training.checkpoint.interval=null",
    "training.logging.wandb=false",
    "training.logging.progress_bar=false",
    # A learning rate this small leaves every fp32 weight as it was: the run's validation then measures
    # the weights it started from.
    "training.optimizer.name=sgd",
    "training.optimizer.momentum=0",
    "training.optimizer.weight_decay=0",
    "training.optimizer.lr=1e-30",
]


def test_init_from_an_experiment_starts_from_its_best_weights(source: Path, tmp_path: Path) -> None:
    best = (source / "best_checkpoint").resolve()
    save_dir = tmp_path / "tuned"
    result = run_train(
        tmp_path, *FINE_TUNE, f"training.checkpoint.save_dir={save_dir}", f"training.init_from={source}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    final = save_dir / "checkpoint-epoch0-step8"  # its own step count: step 0 was the start
    assert manifest(final)["metrics"]["val_loss"] == pytest.approx(
        manifest(best)["metrics"]["val_loss"], rel=1e-6
    )
    assert json.loads((final / "trainer_state.json").read_text())["global_step"] == 8
    record = json.loads((save_dir / "hyperparameters.json").read_text())["init_from"]
    assert record["path"] == str(source) and record["checkpoint"] == str(best)
    assert record["manifest"]["step"] == manifest(best)["step"] and record["strict"] is True
    log = next((save_dir / "logs").glob("training_*.log")).read_text()
    assert f"Initialised the model from {best / 'model.safetensors'} (training.init_from)" in log

    # The same run without init_from starts from fresh weights, far from the source's loss.
    fresh = tmp_path / "fresh"
    assert run_train(tmp_path, *FINE_TUNE, f"training.checkpoint.save_dir={fresh}").returncode == 0
    fresh_loss = manifest(fresh / "checkpoint-epoch0-step8")["metrics"]["val_loss"]
    assert abs(fresh_loss - manifest(best)["metrics"]["val_loss"]) > 0.05


def test_init_from_a_final_checkpoint_then_resume_ignores_the_key(source: Path, tmp_path: Path) -> None:
    final = source / "checkpoint-epoch3-step32"
    save_dir = tmp_path / "tuned"
    args = [*FINE_TUNE, f"training.checkpoint.save_dir={save_dir}"]
    first = run_train(tmp_path, *args, f"training.init_from={final}", "training.max_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    stopped = save_dir / "checkpoint-epoch0-step4"
    assert manifest(stopped)["metrics"]["val_loss"] == pytest.approx(
        manifest(final)["metrics"]["val_loss"], rel=1e-6
    )
    hyperparameters = (save_dir / "hyperparameters.json").read_bytes()
    # The resume loads its own checkpoint: init_from is not even looked at (its source may be gone).
    resumed = run_train(
        tmp_path, *args, f"training.init_from={tmp_path / 'gone'}", "training.checkpoint.resume=latest"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout and (save_dir / "checkpoint-epoch0-step8").is_dir()
    assert (save_dir / "hyperparameters.json").read_bytes() == hyperparameters


def test_init_from_strict_names_the_keys_and_writes_nothing(source: Path, tmp_path: Path) -> None:
    save_dir = tmp_path / "other"
    args = [*FINE_TUNE, f"training.checkpoint.save_dir={save_dir}", f"training.init_from={source}"]
    result = run_train(tmp_path, *args, "model.encoder=transformer")
    assert result.returncode == 2
    message = result.stderr.strip()
    assert "training.init_from" in message and "init_from_strict: false" in message
    assert "missing from the weights: encoder.0.linear1.bias" in message
    assert "not in the model: encoder.0.attention.out.bias" in message
    assert not save_dir.exists()

    loose = run_train(tmp_path, *args, "model.encoder=transformer", "training.init_from_strict=false")
    assert loose.returncode == 0, loose.stderr[-3000:]
    assert json.loads((save_dir / "hyperparameters.json").read_text())["init_from"]["strict"] is False


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("missing", "does not exist"),
        ("directory", "is not a checkpoint"),
        ("text", "not a .safetensors file"),
    ],
)
def test_init_from_bad_path_is_refused_before_anything_is_made(
    tmp_path: Path, kind: str, expected: str
) -> None:
    bad = tmp_path / "bad"
    if kind == "directory":
        bad.mkdir()
    elif kind == "text":
        bad.write_text("not weights")
    save_dir = tmp_path / "exp"
    result = run_train(
        tmp_path, *FINE_TUNE, f"training.checkpoint.save_dir={save_dir}", f"training.init_from={bad}"
    )
    assert result.returncode == 2
    message = result.stderr.strip()
    assert f"training.init_from: {bad}" in message and expected in message, message
    assert "Traceback" not in message and "\n" not in message
    assert not save_dir.exists()


def test_init_from_and_load_model_of_an_export(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "avg"
    assert tsdia_cli(tmp_path, "export", str(source), "--average-best", "3", "-o", str(out)).returncode == 0
    save_dir = tmp_path / "tuned"
    result = run_train(
        tmp_path, *FINE_TUNE, f"training.checkpoint.save_dir={save_dir}", f"training.init_from={out}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import tsdia

    with torch.no_grad():
        expected = validation_loss(tsdia.load_model(out), {"num_train": 128, "num_val": 32})
    assert manifest(save_dir / "checkpoint-epoch0-step8")["metrics"]["val_loss"] == pytest.approx(
        expected, rel=1e-5
    )


def test_keep_best_must_fit_save_total_limit(tmp_path: Path) -> None:
    from tsdia.config.loader import load_config
    from tsdia.errors import ConfigError

    overrides = [
        f"training.checkpoint.save_dir={tmp_path / 'exp'}",
        "training.checkpoint.save_total_limit=2",
        "training.checkpoint.keep_best=3",
    ]
    with pytest.raises(ConfigError) as err:
        load_config(str(REPO / "configs" / "example.yml"), overrides)
    message = str(err.value)
    assert "training.checkpoint.keep_best: 3 is more than training.checkpoint.save_total_limit (2)" in message
    assert "override 'training.checkpoint.keep_best=3'" in message


@pytest.mark.parametrize("stage", [2, 0])
def test_export_consolidates_zero_checkpoints(tmp_path: Path, stage: int) -> None:
    """Two ranks under DeepSpeed: only the final checkpoint has model.safetensors; the other is consolidated
    (ZeRO-2 through DeepSpeed's zero_to_fp32; stage 0, which it cannot read, from the model states)."""
    from tsdia.weights import consolidate_zero

    save_dir = tmp_path / "z2"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [
            *command,
            "-m",
            "tsdia.train",
            str(REPO / "configs" / "example.yml"),
            *SMALL,
            "dataset.num_train=256",
            "training.checkpoint.interval=null",
            "training.logging.wandb=false",
            "training.logging.progress_bar=false",
            f"distributed.deepspeed.zero_stage={stage}",
            f"training.checkpoint.save_dir={save_dir}",
        ],
        cwd=REPO,
        env=quiet_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first, final = save_dir / "checkpoint-epoch0-step8", save_dir / "checkpoint-epoch1-step16"
    assert not (first / "model.safetensors").exists() and (first / "pytorch_model").is_dir()
    # The shards of the final checkpoint consolidate to exactly the weights the trainer gathered.
    gathered = load_file(str(final / "model.safetensors"))
    consolidated = consolidate_zero(final)
    assert consolidated.keys() == gathered.keys()
    assert all(consolidated[k].equal(gathered[k]) for k in gathered)

    out = tmp_path / "avg"
    exported = tsdia_cli(tmp_path, "export", str(save_dir), "--average-best", "2", "-o", str(out))
    assert exported.returncode == 0, exported.stderr
    shards = consolidate_zero(first)
    weights = load_file(str(out / "model.safetensors"))
    for name, tensor in gathered.items():
        assert weights[name].equal(((tensor.double() + shards[name].double()) / 2).float()), name
    record = json.loads((out / "export.json").read_text())
    assert {c["name"]: c["zero_consolidated"] for c in record["checkpoints"]} == {
        first.name: True,
        final.name: False,
    }


@pytest.mark.parametrize("sweep", [False, True], ids=["one", "sweep"])
def test_submit_refuses_a_bad_init_from(tmp_path: Path, sweep: bool) -> None:
    save_dir, good = tmp_path / "exp", tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(1)}, str(good))
    bad = f"training.init_from={tmp_path / 'nothing'}"
    how = ["--sweep", f"training.init_from={good},{tmp_path / 'nothing'}"] if sweep else [bad]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tsdia.launch.submit",
            str(REPO / "configs" / "example.yml"),
            "--dry-run",
            f"training.checkpoint.save_dir={save_dir}",
            *how,
        ],
        cwd=REPO,
        env=quiet_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert f"training.init_from: {tmp_path / 'nothing'} does not exist" in result.stderr
    assert ("sweep member 1" in result.stderr) is sweep
    assert not save_dir.exists()


def test_export_never_writes_into_an_existing_directory(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    result = tsdia_cli(tmp_path, "export", str(source), "-o", str(out))
    assert result.returncode == 2 and "it exists" in result.stderr
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_import_tsdia_stays_torch_free_until_load_model_is_used() -> None:
    code = (
        "import sys, tsdia, tsdia.follow.cli, tsdia.export, tsdia.experiment.weight_files\n"
        "before = 'torch' in sys.modules\n"
        "load = tsdia.load_model\n"
        "print(before, 'torch' in sys.modules, load.__module__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split() == ["False", "True", "tsdia.weights"]
