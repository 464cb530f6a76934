"""A changed config on resume: safe keys applied and recorded, tied ones refused or overridden, model refused."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import EXAMPLE, REPO, SMALL, quiet_env, run_train, tree, with_plugins
from tsdia.config.loader import load_config
from tsdia.errors import ConfigError
from tsdia.experiment.config_change import (
    IGNORED,
    INCOMPATIBLE,
    SAFE,
    TIED,
    ConfigChange,
    classify,
    compare_on_resume,
    latest_recorded_config,
    neutral_component_keys,
)
from tsdia.training.optim import build_scheduler
from tsdia.training.resume_override import rederive_position, reset_schedule, set_optimizer_hyperparameters

QUIET = ["training.logging.wandb=false", "training.logging.progress_bar=false"]


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("training.logging.interval", SAFE),
        ("training.max_steps", SAFE),
        ("training.checkpoint.interval", SAFE),
        ("training.validation.max_steps", SAFE),
        ("slurm.time", SAFE),
        ("slurm.sbatch_extra.mail-type", SAFE),
        ("training.num_workers", SAFE),
        ("training.dataloader.prefetch_factor", SAFE),
        ("training.dataloader.seed_samples", TIED),
        ("training.dataloader.drop_last", TIED),
        ("training.early_stopping.patience", SAFE),  # a later key: safe by its prefix
        ("distributed.env.NCCL_DEBUG", SAFE),
        ("distributed.timeout_s", SAFE),
        ("training.optimizer.lr", TIED),
        ("training.optimizer.kwargs.foo", TIED),
        ("training.scheduler.warmup_steps", TIED),
        ("training.scheduler.name", TIED),
        ("training.epochs", TIED),
        ("training.batch_size", TIED),
        ("training.gradient_accumulation_steps", TIED),
        ("training.seed", TIED),
        ("training.mixed_precision", TIED),
        ("training.ema.decay", TIED),
        ("distributed.deepspeed.zero_stage", TIED),
        ("dataset.num_train", TIED),
        ("world size", TIED),
        ("training.some_future_key", TIED),  # unknown: the conservative class
        ("model.num_layers", INCOMPATIBLE),
        ("model.target", INCOMPATIBLE),
        ("training.optimizer.name", INCOMPATIBLE),
        ("training.checkpoint.resume", IGNORED),
        ("training.checkpoint.resume_policy", IGNORED),
        ("training.checkpoint.save_dir", IGNORED),
        ("training.init_from", IGNORED),
    ],
)
def test_classify(key: str, kind: str) -> None:
    assert classify(key) == kind


def _experiment(tmp_path: Path, *overrides: str) -> Path:
    """An experiment directory whose config.yml is the example with `overrides` (as tsdia writes it)."""
    save_dir = tmp_path / "exp"
    (save_dir / "logs").mkdir(parents=True)
    text = EXAMPLE.read_text()
    if overrides:
        from tsdia.config.loader import effective_yaml

        text = effective_yaml(load_config(str(EXAMPLE), overrides))
    (save_dir / "config.yml").write_text(text)
    return save_dir


def test_compare_lists_each_change_with_where_it_was_set(tmp_path: Path) -> None:
    save_dir = _experiment(tmp_path)
    config = load_config(
        str(EXAMPLE),
        ["training.max_steps=9", "training.optimizer.lr=0.01", "training.checkpoint.resume=latest"],
    )
    config.training.checkpoint.resume_policy = "override"
    report = compare_on_resume(config, save_dir, world_size=1, old_world_size=1)
    assert report is not None
    found = {(c.key, c.kind, c.old, c.new) for c in report.changes}
    assert found == {
        ("training.max_steps", SAFE, "null", "9"),
        ("training.optimizer.lr", TIED, "0.003", "0.01"),
    }
    lr = next(c for c in report.changes if c.key == "training.optimizer.lr")
    assert lr.where == "override 'training.optimizer.lr=0.01'"
    assert ConfigChange.from_dict(report.to_dict()) == report  # survives the broadcast


def test_tied_and_incompatible_changes_are_refused(tmp_path: Path) -> None:
    save_dir = _experiment(tmp_path)
    tied = load_config(str(EXAMPLE), ["training.optimizer.lr=0.01", "training.epochs=5"])
    with pytest.raises(ConfigError) as refused:
        compare_on_resume(tied, save_dir, world_size=2, old_world_size=1)
    message = str(refused.value)
    assert "training.optimizer.lr: 0.003 -> 0.01" in message and "training.epochs: 4 -> 5" in message
    assert "world size: 1 -> 2" in message
    assert "training.checkpoint.resume_policy=override" in message and "training.init_from" in message
    model = load_config(str(EXAMPLE), ["model.d_model=32", "training.optimizer.lr=0.01"])
    model.training.checkpoint.resume_policy = "override"  # never enough for a model change
    with pytest.raises(ConfigError, match=r"model\.d_model: 64 -> 32") as refused:
        compare_on_resume(model, save_dir, world_size=1, old_world_size=1)
    assert "optimizer.lr" not in str(refused.value)


def test_the_newest_recorded_config_is_the_base(tmp_path: Path) -> None:
    save_dir = _experiment(tmp_path)
    assert latest_recorded_config(save_dir) == save_dir / "config.yml"
    for n in (1, 2, 10):
        (save_dir / "logs" / f"config_resume_{n}.yml").write_text(
            (save_dir / "config.yml").read_text().replace("lr: 3.0e-3", f"lr: {n}.0e-3")
        )
    assert latest_recorded_config(save_dir) == save_dir / "logs" / "config_resume_10.yml"
    same = load_config(str(EXAMPLE), ["training.optimizer.lr=0.01"])
    report = compare_on_resume(same, save_dir, world_size=1, old_world_size=None)
    assert report is not None and report.changes == []


def test_a_record_that_no_longer_validates_is_still_compared(tmp_path: Path) -> None:
    """A key an older tsdia wrote (since removed) is a change like any other: reported, never skipped."""
    save_dir = _experiment(tmp_path)
    text = (save_dir / "config.yml").read_text().replace("  epochs: 4\n", "  epochs: 4\n  old_knob: 7\n")
    (save_dir / "config.yml").write_text(text)
    with pytest.raises(ConfigError, match=r"training\.old_knob: 7 -> \(unset\)"):
        compare_on_resume(load_config(str(EXAMPLE)), save_dir, world_size=1, old_world_size=1)
    same = load_config(str(EXAMPLE), ["training.logging.interval=5"])
    (save_dir / "config.yml").write_text(text.replace("  old_knob: 7\n", ""))
    report = compare_on_resume(same, save_dir, world_size=1, old_world_size=1)
    assert report is not None and [c.line() for c in report.changes] == ["training.logging.interval: 10 -> 5"]


def test_a_component_declares_the_kwargs_a_resume_may_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`resume_neutral_kwargs` on the model class (test hooks, a moved data root) makes those keys safe."""
    monkeypatch.syspath_prepend(str(REPO / "tests" / "plugins"))
    save_dir = _experiment(tmp_path, "model.target=crashy:SlowModel", "model.step_seconds=0.3")
    resumed = load_config(str(EXAMPLE), ["model.target=crashy:SlowModel", "model.step_seconds=0"])
    neutral = neutral_component_keys(resumed)
    assert neutral == {"model.step_seconds", "model.crash_at_call"}
    report = compare_on_resume(resumed, save_dir, 1, 1, neutral)
    assert report is not None and [(c.line(), c.kind) for c in report.changes] == [
        ("model.step_seconds: 0.3 -> 0", SAFE)
    ]
    with pytest.raises(ConfigError, match=r"model\.step_seconds"):
        compare_on_resume(resumed, save_dir, 1, 1)  # undeclared: a model change like any other
    wider = load_config(
        str(EXAMPLE), ["model.target=crashy:SlowModel", "model.step_seconds=0", "model.d_model=32"]
    )
    with pytest.raises(ConfigError, match=r"model\.d_model: 64 -> 32"):
        compare_on_resume(wider, save_dir, 1, 1, neutral_component_keys(wider))


def test_override_sets_the_new_lr_on_the_loaded_state() -> None:
    """After a checkpoint's state is loaded, the config's optimizer values and base lr take over."""
    old = load_config(str(EXAMPLE), ["training.scheduler.warmup_steps=0"]).training
    new = load_config(
        str(EXAMPLE),
        [
            "training.scheduler.warmup_steps=0",
            "training.optimizer.lr=0.01",
            "training.optimizer.weight_decay=0.5",
        ],
    ).training
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.AdamW(params, lr=old.optimizer.lr, weight_decay=old.optimizer.weight_decay)
    scheduler = build_scheduler(optimizer, old.scheduler, 100)
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    saved = optimizer.state_dict(), scheduler.state_dict()
    optimizer = torch.optim.AdamW(params, lr=new.optimizer.lr, weight_decay=new.optimizer.weight_decay)
    scheduler = build_scheduler(optimizer, new.scheduler, 100)
    optimizer.load_state_dict(saved[0])
    scheduler.load_state_dict(saved[1])
    assert scheduler.get_last_lr()[0] == pytest.approx(0.003 * 0.5)  # loading brought the old lr back
    set_optimizer_hyperparameters(optimizer, new)
    reset_schedule(scheduler, new.optimizer.lr)
    assert scheduler.get_last_lr()[0] == pytest.approx(0.01 * 0.5)  # halfway down the cosine
    assert (
        optimizer.param_groups[0]["weight_decay"] == 0.5 and optimizer.param_groups[0]["initial_lr"] == 0.01
    )
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(
        0.01 * 0.5 * (1 + torch.cos(torch.tensor(0.51 * torch.pi)).item())
    )


def test_override_sets_a_target_optimizers_keyword_arguments() -> None:
    """`optimizer: {target: torch.optim.SGD, momentum: ...}`: the new momentum (a keyword argument of the
    target, not a built-in key) reaches the loaded param groups too."""
    new = load_config(
        str(EXAMPLE),
        ["training.optimizer={target: torch.optim.SGD, lr: 0.05, momentum: 0.5, nesterov: true}"],
    ).training
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9, nesterov=True)
    set_optimizer_hyperparameters(optimizer, new)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["initial_lr"]) == (0.05, 0.5, True, 0.05)


@dataclass
class _Counters:
    global_step: int = 6
    epoch: int = 1
    batches_in_epoch: int = 3
    samples_in_epoch: int = -1


@pytest.mark.parametrize(
    ("recorded", "new", "expected_batches"),
    [
        (96, ["training.batch_size=16"], 6),  # 2 ranks x 16 x 3 batches = 96 samples = 6 batches of 16
        (-1, ["training.batch_size=16"], 6),  # an older checkpoint: derived from the recorded geometry
        (96, ["training.batch_size=20"], 4),  # 96 // 20 = 4: 16 samples replayed
        (96, ["training.batch_size=8", "training.gradient_accumulation_steps=5"], 10),  # a multiple of 5
        (128, ["training.batch_size=16"], 8),  # the epoch was complete: it stays complete
    ],
)
def test_data_position_from_the_global_sample_count(
    recorded: int, new: list[str], expected_batches: int
) -> None:
    config = load_config(str(EXAMPLE), ["training.checkpoint.save_dir=x", *new])
    change = ConfigChange("config.yml", "override", [], old_world_size=2, new_world_size=1)
    change.changes = []
    counters = _Counters(samples_in_epoch=recorded)
    from tsdia.experiment.config_change import Change

    change.changes.append(Change("training.batch_size", TIED, "16", str(config.training.batch_size)))
    rederive_position(
        change,
        config.training,
        counters,
        1,
        batches_per_epoch=128 // config.training.batch_size + (128 % config.training.batch_size > 0),
        dataset_len=128,
    )
    assert counters.batches_in_epoch == expected_batches


def _lrs(save_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(save_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars("lr")}


def test_resume_with_a_changed_config(tmp_path: Path, small_args: list[str]) -> None:
    """Real runs: tied and model changes refused with nothing written, then overridden, then safe changes."""
    save_dir = tmp_path / "exp"
    constant = [
        "training.scheduler.name=constant",
        "training.scheduler.warmup_steps=0",
        "training.logging.interval=1",
    ]
    base = [*small_args, *QUIET, *constant, "training.checkpoint.resume=latest"]
    first = run_train(tmp_path, *base, "training.max_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    config_yml = (save_dir / "config.yml").read_bytes()
    before = tree(save_dir)

    refused = run_train(tmp_path, *base, "training.max_steps=5", "training.optimizer.lr=0.01")
    assert refused.returncode == 2
    error = refused.stderr.strip().splitlines()
    assert error[0].startswith("tsdia-train: error: training.checkpoint.resume:")
    assert "  training.optimizer.lr: 0.003 -> 0.01  (override 'training.optimizer.lr=0.01')" in error
    assert "resume_policy=override" in error[-1] and "training.init_from" in error[-1]
    assert "max_steps" not in refused.stderr  # a safe change is not a reason to refuse
    assert tree(save_dir) == before

    # tsdia-submit refuses it at once (not after the job waited in the queue), torch-free or not.
    submit = subprocess.run(
        [
            sys.executable,
            "-m",
            "tsdia.launch.submit",
            str(EXAMPLE),
            "--dry-run",
            *base,
            "training.optimizer.lr=0.01",
        ],
        cwd=tmp_path,
        env=with_plugins(quiet_env(tmp_path)),
        capture_output=True,
        text=True,
    )
    assert submit.returncode == 2, submit.stdout + submit.stderr
    assert submit.stderr.startswith("tsdia-submit: error: training.checkpoint.resume:")
    assert "training.optimizer.lr: 0.003 -> 0.01" in submit.stderr
    assert tree(save_dir) == before

    model = run_train(tmp_path, *base, "model.d_model=32", "training.checkpoint.resume_policy=override")
    assert model.returncode == 2 and "model.d_model: 64 -> 32" in model.stderr
    assert tree(save_dir) == before

    overridden = run_train(
        tmp_path,
        *base,
        "training.max_steps=5",
        "training.optimizer.lr=0.01",
        "training.checkpoint.resume_policy=override",
    )
    assert overridden.returncode == 0, overridden.stderr[-3000:]
    log = next((save_dir / "logs").glob("training_resume_1_*.log")).read_text()
    assert "  training.max_steps: 3 -> 5  (applied)" in log
    assert "  training.optimizer.lr: 0.003 -> 0.01  (resume_policy: override)" in log
    assert "exact resume is no longer claimed" in log
    lrs = _lrs(save_dir)
    assert [round(lrs[s], 6) for s in range(1, 6)] == [
        0.003,
        0.003,
        0.003,
        0.01,
        0.01,
    ]  # the new lr is the lr
    recorded = (save_dir / "logs" / "config_resume_1.yml").read_text()
    assert (
        "#   training.optimizer.lr: 0.003 -> 0.01  (tied)" in recorded
        and "# resume_policy: override" in recorded
    )
    assert load_config(str(save_dir / "logs" / "config_resume_1.yml")).training.optimizer.lr == 0.01
    assert (save_dir / "config.yml").read_bytes() == config_yml  # the experiment's start stays as it was

    # The next resume compares with the newest record: the same config is no change; a safe one applies.
    again = run_train(
        tmp_path,
        *base,
        "training.max_steps=6",
        "training.optimizer.lr=0.01",
        "training.validation.max_steps=1",
    )
    assert again.returncode == 0, again.stderr[-3000:]
    log = next((save_dir / "logs").glob("training_resume_2_*.log")).read_text()
    assert "Config changed since logs/config_resume_1.yml:" in log
    assert "  training.max_steps: 5 -> 6  (applied)" in log and "optimizer.lr" not in log
    assert "training.validation.max_steps: null -> 1  (applied)" in log
    recorded = load_config(str(save_dir / "logs" / "config_resume_2.yml")).training
    assert recorded.max_steps == 6 and recorded.validation.max_steps == 1
    assert round(_lrs(save_dir)[6], 6) == 0.01


def _torchrun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*command, "-m", "tsdia.train", str(EXAMPLE), *args],
        cwd=REPO,
        env=with_plugins(quiet_env(tmp_path)),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _trained_samples(save_dir: Path) -> list[int]:
    """Every sample index the model trained on, over every attempt and rank."""
    found: list[int] = []
    for log in (save_dir / "logs").rglob("training_*.log"):
        for line in re.findall(r"TRAIN_SAMPLES rank=\d+ ([\d,]+)", log.read_text()):
            found += [int(i) for i in line.split(",")]
    return found


@pytest.mark.slow
def test_resume_on_another_number_of_processes(tmp_path: Path) -> None:
    """2 ranks stop after 2 steps (64 samples); 1 process refuses, then with override trains the other 64."""
    save_dir = tmp_path / "exp"
    args = [
        *SMALL,
        *QUIET,
        "training.epochs=1",
        "dataset.target=indexed:build_datasets",
        "model.target=indexed:IndexReportingModel",
        f"training.checkpoint.save_dir={save_dir}",
        "training.checkpoint.resume=latest",
    ]
    first = _torchrun(tmp_path, *args, "training.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(_trained_samples(save_dir)) == 64
    before = tree(save_dir)
    env = with_plugins(quiet_env(tmp_path))
    refused = run_train(tmp_path, *args, env=env)
    assert refused.returncode == 2 and "  world size: 2 -> 1  (the launcher)" in refused.stderr
    assert tree(save_dir) == before
    resumed = run_train(tmp_path, *args, "training.checkpoint.resume_policy=override", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "64 samples of epoch 0 seen (batch 2 on 2 ranks x 16) -> batch 4 on 1 ranks x 16" in resumed.stderr
    samples = _trained_samples(save_dir)
    assert sorted(samples) == list(range(128))  # every sample once: none replayed, none skipped
