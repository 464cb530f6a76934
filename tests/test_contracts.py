"""Contracts with the private APIs tsdia relies on, exercised on the installed packages.

- submitit's `_make_sbatch_string` (`tsdia.launch.sbatch.render_submitit_script`): `--dry-run` prints the script
  a real submit would write, so it must be the text `SlurmExecutor` itself writes.
- torch's `SummaryWriter._get_file_writer` (`tsdia.training.trackers.add_summaries`): the hparams summaries land
  in the run's own event file, where TensorBoard's hparams dashboard reads them; `TensorBoardTracker.log`
  writes a record's scalars as one event through it, read back exactly as `add_scalar`'s.
- torch's `_foreach_lerp_` (`tsdia.training.ema.EMA.after_step`): one fused update of every EMA tensor, the
  same values as `Tensor.lerp_` on each (torch.optim.swa_utils uses it the same way).

A failure here names the package version and what changed: update the wrapper, then the tested range in
pyproject.toml.
"""

from __future__ import annotations

import inspect
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from tsdia.config.loader import load_config
from tsdia.launch import sbatch
from tsdia.launch.resources import SlurmResources, resolve

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "example.yml"


def broken(packages: str, what: str, wrapper: str) -> None:
    versions = ", ".join(f"{name} {version(name)}" for name in packages.split())
    pytest.fail(
        f"{versions}: {what}. tsdia's wrapper {wrapper} must be adapted to this version (and the tested range in "
        "pyproject.toml widened), or the range narrowed to exclude it.",
        pytrace=False,
    )


def resources(tmp_path: Path, *overrides: str) -> SlurmResources:
    config = load_config(
        str(EXAMPLE),
        [
            f"training.checkpoint.save_dir={tmp_path / 'exp'}",
            "slurm.nodes=2",
            "slurm.tasks_per_node=2",
            "slurm.max_requeues=2",
            'slurm.setup=["module load cuda"]',
            *overrides,
        ],
    )
    return resolve(config)


def test_submitit_make_sbatch_string_is_what_slurm_executor_submits(tmp_path: Path) -> None:
    wrapper = "tsdia.launch.sbatch.render_submitit_script"
    try:
        from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string
    except ImportError as err:
        broken(
            "submitit",
            f"submitit.slurm.slurm no longer has _make_sbatch_string or SlurmExecutor ({err})",
            wrapper,
        )
    res = resources(tmp_path)
    params = sbatch.submitit_parameters(res, str(tmp_path))
    accepted = inspect.signature(_make_sbatch_string).parameters
    unknown = sorted({"command", "folder", *params} - set(accepted))
    if unknown:
        broken("submitit", f"_make_sbatch_string no longer takes the parameter(s) {unknown}", wrapper)

    ours = sbatch.render_submitit_script(res, str(tmp_path), python=sys.executable)
    executor = SlurmExecutor(folder=res.folder, python=sys.executable)
    executor.update_parameters(**params)
    try:
        command = executor._submitit_command_str
        theirs = executor._make_submission_file_text(command, "uid")
    except AttributeError as err:
        broken("submitit", f"SlurmExecutor changed how it writes its submission file ({err})", wrapper)
    if sbatch.submitit_command(res.folder, sys.executable) != command:
        broken("submitit", f"the srun command is now {command!r}", "tsdia.launch.sbatch.submitit_command")
    if ours != theirs:
        broken("submitit", "_make_sbatch_string's text differs from SlurmExecutor's submission file", wrapper)
    # What tsdia's scripts rely on, in submitit's text.
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --requeue",
        "eval 'module load cuda'",
    ]:
        if line not in ours:
            broken("submitit", f"the rendered script lacks {line!r}", wrapper)
    if f"#SBATCH --signal=USR2@{res.signal_lead_s}" not in ours:
        broken(
            "submitit",
            "the preemption signal is no longer USR2 (tsdia.launch.sbatch.SUBMITIT_SIGNAL)",
            wrapper,
        )


def test_tensorboard_hparams_land_in_the_runs_own_event_file(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tsdia.training.trackers import TensorBoardTracker

    wrapper = "tsdia.training.trackers.add_summaries"
    log_dir = tmp_path / "tensorboard"
    config = {"training": {"lr": 0.001, "epochs": 3}, "model": {"encoder": "transformer"}}
    try:
        tracker = TensorBoardTracker(str(log_dir), config, "training: {}\n", start_step=0, resuming=False)
    except AttributeError as err:
        broken("torch tensorboard", f"SummaryWriter changed ({err})", wrapper)
    tracker.log({"val_loss": 0.5}, step=1)
    tracker.finish()
    assert [p.name for p in log_dir.iterdir() if p.is_dir()] == [], "add_summaries made a sub-run directory"
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.PluginTagToContent("hparams"))
    expected = {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
    if tags != expected:
        broken(
            "torch tensorboard",
            f"the run's event file holds hparams tags {sorted(tags)}, not {sorted(expected)}",
            wrapper,
        )
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info
    if start.hparams["training.lr"].number_value != 0.001:
        broken("torch tensorboard", f"the hparams read back are {dict(start.hparams)}", wrapper)
    assert [s.value for s in events.Scalars("val_loss")] == [0.5]


def test_tensorboard_scalars_of_one_event_read_back_as_add_scalar_s(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from tsdia.training.trackers import TensorBoardTracker

    records = [({"train_loss": 0.25 * step, "lr": 1e-3 / step, "epoch": 0}, step) for step in (1, 2, 5)]
    tracker = TensorBoardTracker(str(tmp_path / "tsdia"), {}, "", start_step=0, resuming=True)
    plain = SummaryWriter(str(tmp_path / "add_scalar"))
    for metrics, step in records:
        tracker.log(metrics, step)
        for name, value in metrics.items():
            plain.add_scalar(name, value, step)
    tracker.finish()
    plain.close()

    def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
        events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
        events.Reload()
        return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

    theirs = scalars(tmp_path / "add_scalar")
    assert set(theirs) == {"train_loss", "lr", "epoch"}
    if scalars(tmp_path / "tsdia") != theirs:
        broken(
            "torch tensorboard",
            "scalars written as one event read back differently",
            "TensorBoardTracker.log",
        )


def test_foreach_lerp_equals_lerp_on_each_tensor() -> None:
    import torch

    torch.manual_seed(0)
    shadows = [torch.randn(3, 5), torch.randn(7)]
    weights = [torch.randn(3, 5), torch.randn(7)]
    expected = [s.clone().lerp_(w, 0.1) for s, w in zip(shadows, weights, strict=True)]
    if not hasattr(torch, "_foreach_lerp_"):
        broken("torch", "torch._foreach_lerp_ is gone", "EMA.after_step")
    torch._foreach_lerp_(shadows, weights, 0.1)
    if not all(s.equal(e) for s, e in zip(shadows, expected, strict=True)):
        broken("torch", "torch._foreach_lerp_ no longer matches Tensor.lerp_", "EMA.after_step")
