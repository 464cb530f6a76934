"""Optimizers and learning-rate schedules: built-in names, targets by import path, and their errors."""

from __future__ import annotations

import itertools
import json
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SMALL, run_train
from tsdia.config import load_config
from tsdia.config.schema import SchedulerConfig
from tsdia.errors import ConfigError
from tsdia.training.optim import build_optimizer, build_scheduler, check_optim, lr_lambda

HEAD = """\
training:
  epochs: 2
  checkpoint:
    save_dir: runs/a
"""


def config_file(tmp_path: Path, optimizer: str = "", scheduler: str = "") -> str:
    """A config whose `training.optimizer` / `training.scheduler` sections hold the given YAML lines."""
    text = HEAD
    if optimizer:
        text += "  optimizer:\n" + textwrap.indent(textwrap.dedent(optimizer), "    ")
    if scheduler:
        text += "  scheduler:\n" + textwrap.indent(textwrap.dedent(scheduler), "    ")
    path = tmp_path / "c.yml"
    path.write_text(text)
    return str(path)


def probe() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.ones(3))]


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module of the user's own optimizer and schedule factories, importable as `my_optim`."""
    (tmp_path / "my_optim.py").write_text(
        textwrap.dedent(
            """\
            import torch
            from torch.optim.lr_scheduler import LambdaLR

            def sgd_without_lr(params, momentum=0.0):
                return torch.optim.SGD(params, lr=0.1, momentum=momentum)

            def not_an_optimizer(params, lr):
                return {"lr": lr}

            def warm_hold_decay(optimizer, total_steps, warmup=2, hold=0.5):
                def factor(step):
                    if step < warmup:
                        return (step + 1) / (warmup + 1)
                    return 1.0 if step < hold * total_steps else 0.1
                return LambdaLR(optimizer, factor)

            def no_scheduler(optimizer, total_steps):
                return None

            def other_optimizer(optimizer, total_steps):
                other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
                return LambdaLR(other, lambda step: 1.0)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_optim", None)
    return "my_optim"


@pytest.mark.parametrize("target", ["torch.optim.SGD", "torch.optim:SGD"])
def test_sgd_target_gets_lr_and_the_other_keys(tmp_path: Path, target: str) -> None:
    path = config_file(tmp_path, f"target: {target}\nlr: 0.1\nmomentum: 0.9\nnesterov: true\n")
    config = load_config(path)
    assert config.training.optimizer.settings() == {
        "target": target,
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": True,
    }
    optimizer = build_optimizer(probe(), config.training.optimizer, config.source)
    assert type(optimizer) is torch.optim.SGD
    group = optimizer.param_groups[0]
    # Keys not written keep the optimizer's own defaults (SGD: no weight decay), not the built-in sgd's.
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.1, 0.9, True, 0)


def test_target_takes_the_default_lr_when_none_is_written(tmp_path: Path) -> None:
    config = load_config(config_file(tmp_path, "target: torch.optim.Adam\nbetas: [0.8, 0.9]\n"))
    optimizer = build_optimizer(probe(), config.training.optimizer, config.source)
    assert optimizer.param_groups[0]["lr"] == 1e-3
    assert tuple(optimizer.param_groups[0]["betas"]) == (0.8, 0.9)


def test_unknown_optimizer_argument_names_the_key_and_line(tmp_path: Path) -> None:
    path = config_file(tmp_path, "target: torch.optim.SGD\nlr: 0.1\nnesterv: true\n")
    config = load_config(path)  # the keys are the target's: checked against its signature once imported
    with pytest.raises(ConfigError) as info:
        check_optim(config.training, config.source, batches_per_epoch=8)
    message = str(info.value)
    assert message.startswith(f"{path}:8: unknown key 'training.optimizer.nesterv'"), message
    assert "Did you mean 'nesterov'?" in message and "Valid keys: target, lr, momentum" in message


OPTIMIZER_ERRORS = [
    # (id, optimizer section, fragments of the message)
    (
        "class-not-optimizer",
        "target: torch.nn:Linear\n",
        ["c.yml:6: training.optimizer.target", "torch.nn.modules.linear.Linear, not a torch.optim.Optimizer"],
    ),
    (
        "function-returns-dict",
        "target: my_optim:not_an_optimizer\n",
        ["c.yml:6: training.optimizer.target", "returned a dict, not a torch.optim.Optimizer"],
    ),
    ("no-lr", "target: my_optim:sgd_without_lr\n", ["training.optimizer.target", "takes no argument 'lr'"]),
    ("params-key", "target: torch.optim.SGD\nparams: []\n", ["c.yml:7: training.optimizer.params", "itself"]),
    (
        "rejected",
        "target: torch.optim.SGD\nnesterov: true\n",
        ["c.yml:5: training.optimizer: torch.optim.SGD rejected its arguments", "Nesterov momentum"],
    ),
    ("case", "target: torch.optim.Sgd\n", ["has no attribute 'Sgd'", "Did you mean 'torch.optim.SGD'?"]),
    ("no-module", "target: no_such_pkg.optim.Fast\n", ["cannot import module 'no_such_pkg'"]),
]


@pytest.mark.parametrize("case", OPTIMIZER_ERRORS, ids=[c[0] for c in OPTIMIZER_ERRORS])
def test_bad_optimizer_target(tmp_path: Path, user_module: str, case: tuple[str, str, list[str]]) -> None:
    _, section, fragments = case
    config = load_config(config_file(tmp_path, section))
    with pytest.raises(ConfigError) as info:
        check_optim(config.training, config.source, batches_per_epoch=8)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


LOAD_ERRORS = [
    # (id, optimizer section, scheduler section, fragments)
    (
        "name-and-target",
        "name: sgd\ntarget: torch.optim.SGD\n",
        "",
        ["c.yml:6: training.optimizer: set either"],
    ),
    ("bare-name", "target: SGD\n", "", ["training.optimizer.target: expected an import path", "'SGD'"]),
    ("target-lr-zero", "target: torch.optim.SGD\nlr: 0\n", "", ["c.yml:7: training.optimizer.lr", "greater"]),
    (
        "name-form-unknown-key",
        "name: sgd\nnesterov: true\n",
        "",
        ["c.yml:7: unknown key 'training.optimizer.nesterov'", "needs `training.optimizer.target`"],
    ),
    ("kwargs-is-no-key", "kwargs: {a: 1}\n", "", ["unknown key 'training.optimizer.kwargs'"]),
    ("noam-without-warmup", "", "name: noam\n", ["c.yml:6: training.scheduler.warmup_steps", "> 0"]),
    ("inverse-sqrt-zero-warmup", "", "name: inverse_sqrt\nwarmup_steps: 0\n", ["c.yml:7", "needs warmup"]),
]


@pytest.mark.parametrize("case", LOAD_ERRORS, ids=[c[0] for c in LOAD_ERRORS])
def test_bad_optim_config_is_refused_at_load(tmp_path: Path, case: tuple[str, str, str, list[str]]) -> None:
    _, optimizer, scheduler, fragments = case
    with pytest.raises(ConfigError) as info:
        load_config(config_file(tmp_path, optimizer, scheduler))
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def multipliers(name: str, warmup: int, steps: list[int], floor: float = 0.0) -> list[float]:
    schedule = lr_lambda(SchedulerConfig(name=name, warmup_steps=warmup, min_lr_ratio=floor), 1000)  # type: ignore[arg-type]
    return [schedule(step) for step in steps]


def test_noam_warms_up_to_the_peak_then_decays_as_inverse_sqrt() -> None:
    steps = [0, 1, 2, 3, 4, 9, 16, 64, 400]
    expected = [1 / 5, 2 / 5, 3 / 5, 4 / 5, 1.0, math.sqrt(4 / 9), 0.5, 0.25, 0.1]
    assert multipliers("noam", 4, steps) == pytest.approx(expected, rel=1e-12)
    assert multipliers("inverse_sqrt", 4, steps) == multipliers("noam", 4, steps)
    # min_lr_ratio is the floor of the decay; the warm-up rises from below it as before.
    assert multipliers("noam", 4, [0, 16, 64, 400], floor=0.3) == pytest.approx([0.2, 0.5, 0.3, 0.3])


def test_noam_through_the_optimizer_reaches_lr_at_warmup(tmp_path: Path) -> None:
    config = load_config(config_file(tmp_path, "name: sgd\nlr: 0.5\n", "name: noam\nwarmup_steps: 25\n"))
    optimizer = build_optimizer(probe(), config.training.optimizer, config.source)
    scheduler = build_scheduler(optimizer, config.training.scheduler, 100, config.source)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.5 / 26) and lrs[25] == pytest.approx(0.5) == max(lrs)
    assert lrs[100 - 1] == pytest.approx(0.5 * math.sqrt(25 / 99))
    assert all(a < b for a, b in itertools.pairwise(lrs[:26]))
    assert all(a > b for a, b in itertools.pairwise(lrs[25:]))


def test_scheduler_target_gets_total_steps_and_its_keys(tmp_path: Path, user_module: str) -> None:
    config = load_config(
        config_file(tmp_path, "name: sgd\nlr: 1.0\n", "target: my_optim:warm_hold_decay\nhold: 0.25\n")
    )
    optimizer = build_optimizer(probe(), config.training.optimizer, config.source)
    scheduler = build_scheduler(optimizer, config.training.scheduler, 40, config.source)
    lrs = []
    for _ in range(12):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    # warm-up of 2, then 1.0 until 0.25 * 40 = 10 steps, then 0.1
    assert lrs == pytest.approx([1 / 3, 2 / 3, *[1.0] * 8, 0.1, 0.1])
    restored = build_scheduler(
        build_optimizer(probe(), config.training.optimizer), config.training.scheduler, 40, config.source
    )
    restored.load_state_dict(scheduler.state_dict())  # what resume does: rebuild from config, then load
    assert restored.last_epoch == 12 and restored.get_last_lr() == scheduler.get_last_lr()


def test_torch_scheduler_classes_work_with_and_without_total_steps(tmp_path: Path) -> None:
    step_lr = "target: torch.optim.lr_scheduler.StepLR\nstep_size: 3\ngamma: 0.5\n"
    one_cycle = "target: torch.optim.lr_scheduler.OneCycleLR\nmax_lr: 0.2\n"
    for section, kind in (
        (step_lr, torch.optim.lr_scheduler.StepLR),
        (one_cycle, torch.optim.lr_scheduler.OneCycleLR),
    ):
        config = load_config(config_file(tmp_path, "name: sgd\n", section))
        optimizer = build_optimizer(probe(), config.training.optimizer, config.source)
        scheduler = build_scheduler(optimizer, config.training.scheduler, 30, config.source)
        assert type(scheduler) is kind
    assert scheduler.total_steps == 30  # type: ignore[attr-defined]  # OneCycleLR was given the schedule's length


SCHEDULER_ERRORS = [
    (
        "not-scheduler-class",
        "target: collections:OrderedDict\n",
        ["c.yml:6: training.scheduler.target", "not a"],
    ),
    ("plateau", "target: torch.optim.lr_scheduler.ReduceLROnPlateau\n", ["validation metric"]),
    ("returns-none", "target: my_optim:no_scheduler\n", ["returned None, not an LRScheduler"]),
    ("other-optimizer", "target: my_optim:other_optimizer\n", ["for another optimizer"]),
    ("total-steps-key", "target: my_optim:warm_hold_decay\ntotal_steps: 9\n", ["c.yml:7", "itself"]),
    ("unknown-key", "target: my_optim:warm_hold_decay\nholdd: 0.2\n", ["c.yml:7", "Did you mean 'hold'?"]),
]


@pytest.mark.parametrize("case", SCHEDULER_ERRORS, ids=[c[0] for c in SCHEDULER_ERRORS])
def test_bad_scheduler_target(tmp_path: Path, user_module: str, case: tuple[str, str, list[str]]) -> None:
    _, section, fragments = case
    config = load_config(config_file(tmp_path, "", section))
    with pytest.raises(ConfigError) as info:
        check_optim(config.training, config.source, batches_per_epoch=8)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


# --- real runs of the built-in example ---------------------------------------------------------------

SGD_NOAM = [
    *SMALL,
    "training.optimizer={target: torch.optim.SGD, lr: 0.05, momentum: 0.9, nesterov: true}",
    "training.scheduler={name: noam, warmup_steps: 4}",
    "training.logging.interval=1",
    "training.logging.wandb=false",
    "training.checkpoint.interval=100",
]


def scalars(save_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(save_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


@pytest.mark.slow
def test_sgd_target_with_noam_trains_logs_its_lr_and_resumes_exactly(tmp_path: Path) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    done = run_train(tmp_path, *SGD_NOAM, f"training.checkpoint.save_dir={full}")
    assert done.returncode == 0, done.stderr[-3000:]
    hyper = json.loads((full / "hyperparameters.json").read_text())
    assert hyper["optimizer"] == {"target": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9, "nesterov": True}
    assert hyper["scheduler"] == {"name": "noam", "warmup_steps": 4, "min_lr_ratio": 0.0}
    # The lr logged after optimizer step s is the one for the next step: 0.05 * noam(s), peak at s = 4.
    lrs = scalars(full, "lr")
    expected = {s: 0.05 * ((s + 1) / 5 if s < 4 else math.sqrt(4 / s)) for s in range(1, 17)}
    assert lrs == pytest.approx(expected, rel=1e-6)
    losses = scalars(full, "train_loss")
    assert sum(losses[s] for s in (15, 16)) < 0.8 * sum(losses[s] for s in (1, 2)), losses

    first = run_train(tmp_path, *SGD_NOAM, f"training.checkpoint.save_dir={part}", "training.max_steps=5")
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = run_train(
        tmp_path, *SGD_NOAM, f"training.checkpoint.save_dir={part}", "training.checkpoint.resume=latest"
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(full / "checkpoint-epoch1-step16" / "model.safetensors"))
    b = load_file(str(part / "checkpoint-epoch1-step16" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[name].equal(b[name]) for name in a)
    assert scalars(part, "lr") == lrs  # the schedule resumed at step 5, not from its start


@pytest.mark.slow
@pytest.mark.parametrize("target", ["torch.nn:Linear", "collections.OrderedDict"])
def test_cli_refuses_a_non_optimizer_target_and_writes_nothing(tmp_path: Path, target: str) -> None:
    before = sorted(tmp_path.rglob("*"))
    result = run_train(
        tmp_path,
        *SMALL,
        f"training.optimizer={{target: '{target}', lr: 0.1}}",
        f"training.checkpoint.save_dir={tmp_path / 'exp'}",
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "training.optimizer.target" in result.stderr and "not a torch.optim.Optimizer" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p for p in tmp_path.rglob("*") if not p.name.startswith(".wandb")) == before


def test_tracker_config_holds_the_target_form_and_loads_again(tmp_path: Path) -> None:
    """The config sent to the trackers (and written as config.yml for a Trainer given no file) says what ran."""
    import yaml

    from tsdia.training.artifacts import full_config_dict

    path = config_file(
        tmp_path, "target: torch.optim.SGD\nlr: 0.1\nmomentum: 0.9\n", "name: noam\nwarmup_steps: 8\n"
    )
    dumped = full_config_dict(load_config(path))
    assert dumped["training"]["optimizer"] == {"target": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9}
    assert dumped["training"]["scheduler"] == {"name": "noam", "warmup_steps": 8, "min_lr_ratio": 0.0}
    (tmp_path / "again.yml").write_text(yaml.safe_dump(dumped))
    again = load_config(str(tmp_path / "again.yml"))
    assert again.training.optimizer.settings() == dumped["training"]["optimizer"]
    plain = full_config_dict(load_config(config_file(tmp_path)))  # the built-in form
    assert (
        "target" not in plain["training"]["optimizer"] and plain["training"]["optimizer"]["name"] == "adamw"
    )
