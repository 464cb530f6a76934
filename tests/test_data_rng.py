"""Per-sample randomness: on-the-fly augmentation is a pure function of (seed, epoch, index).

Loader-level checks first (cheap, in-process), then real training runs: a dataset that augments with
torch, random and numpy inside `__getitem__`, stopped by SIGUSR2 mid-epoch and resumed, with workers,
without, with persistent workers, and on two ranks.
"""

from __future__ import annotations

import multiprocessing
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent / "plugins"))

from augmenting import build_datasets

from conftest import EXAMPLE, REPO, SMALL, quiet_env, run_train, with_plugins
from tsdia.config.loader import config_from_dict
from tsdia.config.schema import ConfigSource, TrainingConfig
from tsdia.errors import EXIT_STOPPED, ConfigError
from tsdia.training.data import build_dataloaders
from tsdia.training.sample_rng import SampleKeySampler, SeededSamples, sample_generator, sample_seed


def _training(num_workers: int, **dataloader: Any) -> TrainingConfig:
    raw = {
        "training": {
            "batch_size": 8,
            "num_workers": num_workers,
            "dataloader": dataloader,
            "checkpoint": {"save_dir": "unused"},
        }
    }
    return config_from_dict(raw, ConfigSource(path="test.yml")).training


def _epochs(num_workers: int, epochs: int = 2, **dataloader: Any) -> list[torch.Tensor]:
    """Every training batch's features over `epochs` epochs, the way the trainer drives the loader."""
    train_set, _ = build_datasets(num_train=24, num_val=8, num_frames=20)
    loader, _ = build_dataloaders(train_set, None, _training(num_workers, **dataloader))
    batches = []
    for epoch in range(epochs):
        if hasattr(loader.sampler, "set_epoch"):  # (without seed_samples: a plain RandomSampler)
            loader.sampler.set_epoch(epoch)
        batches += [batch["features"] for batch in loader]
    return batches


def test_samples_do_not_depend_on_workers_or_persistence() -> None:
    reference = _epochs(num_workers=0)
    assert not reference[0].equal(reference[3])  # epoch 1 reshuffles and re-augments
    for other in (
        _epochs(num_workers=2),
        _epochs(num_workers=3, persistent_workers=True, prefetch_factor=1),
    ):
        assert len(other) == len(reference)
        assert all(a.equal(b) for a, b in zip(reference, other, strict=True))


def test_without_seeding_workers_change_the_samples() -> None:
    """The control: the user's augmentation alone is not reproducible across worker counts."""
    plain = _epochs(num_workers=0, epochs=1, seed_samples=False)
    workers = _epochs(num_workers=2, epochs=1, seed_samples=False)
    assert not all(a.equal(b) for a, b in zip(plain, workers, strict=True))


def test_main_process_rngs_come_out_unchanged() -> None:
    """With num_workers 0 the samples are seeded in the main process; dropout must not notice."""
    train_set, _ = build_datasets(num_train=8, num_val=8, num_frames=20)
    seeded = SeededSamples(train_set, seed=1, stream=0)
    torch.manual_seed(5), random.seed(5), numpy.random.seed(5)
    expected = (torch.rand(3).tolist(), random.random(), numpy.random.random())
    torch.manual_seed(5), random.seed(5), numpy.random.seed(5)
    first = seeded.__getitems__([(0, 1), (0, 2)])
    assert (torch.rand(3).tolist(), random.random(), numpy.random.random()) == expected
    again = seeded[(0, 2)]
    assert again["features"].equal(first[1]["features"])  # the key alone decides
    assert not seeded[(1, 2)]["features"].equal(again["features"])  # the epoch is part of the key


def test_sample_seed_helper() -> None:
    seen: list[tuple[int, torch.Tensor]] = []

    class Probe(torch.utils.data.Dataset[int]):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> int:
            seen.append((sample_seed(), torch.rand(2, generator=sample_generator())))
            return index

    seeded = SeededSamples(Probe(), seed=3, stream=0)
    seeded.__getitems__([(0, 0), (0, 1), (0, 0)])
    assert seen[0][0] == seen[2][0] != seen[1][0]
    assert seen[0][1].equal(seen[2][1])
    with pytest.raises(RuntimeError, match="only defined while tsdia loads a sample"):
        sample_seed()


class SometimesNumpy(torch.utils.data.Dataset[float]):
    """Noise from torch in every sample, a numpy draw only in every fifth, `random` never; counts loads."""

    def __init__(self, size: int = 40) -> None:
        self.size, self.loads = size, multiprocessing.RawValue("i", 0)  # shared with forked workers

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> float:
        self.loads.value += 1
        value = float(torch.rand(()))
        return value + float(numpy.random.uniform()) if index % 5 == 3 else value


def _keyed_epochs(dataset: SeededSamples, num_workers: int, epochs: int = 2) -> list[list[int]]:
    """Every batch (as the loaded values) and the loads counted per epoch, through a real DataLoader."""
    keys = SampleKeySampler(len(dataset), seed=0, shuffle=True)
    loader = torch.utils.data.DataLoader(dataset, sampler=keys, batch_size=4, num_workers=num_workers)
    batches, loads = [], []
    for epoch in range(epochs):
        keys.set_epoch(epoch)
        start = dataset.dataset.loads.value  # type: ignore[attr-defined]
        batches += [batch.tolist() for batch in loader]
        loads.append(dataset.dataset.loads.value - start)  # type: ignore[attr-defined]
    return [batches, loads]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_only_the_rngs_drawn_from_are_seeded_and_samples_stay_exact(num_workers: int) -> None:
    """Lazy seeding gives each sample exactly what eager seeding gives, at one reloaded batch per RNG."""
    eager = SeededSamples(SometimesNumpy(), seed=4, stream=0, lazy=False)
    lazy = SeededSamples(SometimesNumpy(), seed=4, stream=0)
    (eager_batches, eager_loads), (lazy_batches, lazy_loads) = (
        _keyed_epochs(eager, 0),
        _keyed_epochs(lazy, num_workers),
    )
    assert lazy_batches == eager_batches
    assert eager_loads == [40, 40]
    # Learned in the first epoch's first batches (torch at once, numpy at its first fifth sample), by
    # each worker at most once per RNG; shared, so the second epoch's new workers reload nothing.
    assert 40 < lazy_loads[0] <= 40 + 2 * 4 * max(num_workers, 1) and lazy_loads[1] == 40
    assert list(lazy._drawn) == [1, 0, 1]  # torch, numpy; never random (learned in the workers, shared)


def test_a_dataset_that_draws_nothing_is_never_seeded() -> None:
    class Plain(torch.utils.data.Dataset[int]):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, index: int) -> int:
            return index

    seeded = SeededSamples(Plain(), seed=1, stream=0)
    assert [seeded.__getitems__([(0, i), (0, i + 1)]) for i in (0, 2, 4)] == [[0, 1], [2, 3], [4, 5]]
    assert list(seeded._drawn) == [0, 0, 0]


def test_worker_options_need_workers() -> None:
    source = ConfigSource(path="cfg.yml", positions={"training.dataloader.prefetch_factor": "cfg.yml:7"})
    raw = {"training": {"dataloader": {"prefetch_factor": 4}, "checkpoint": {"save_dir": "x"}}}
    with pytest.raises(ConfigError, match=r"cfg\.yml:7: training\.dataloader\.prefetch_factor: 4 needs"):
        config_from_dict(raw, source)
    raw["training"]["dataloader"] = {"persistent_workers": True}  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"persistent_workers: True needs .* training\.num_workers is 0"):
        config_from_dict(raw, source)
    raw["training"]["dataloader"] = {"sample_rngs": ["torch", "jax"]}  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"sample_rngs: unknown RNG 'jax'; .* torch, random, numpy"):
        config_from_dict(raw, source)


def test_drop_last_that_drops_everything_is_refused() -> None:
    train_set, _ = build_datasets(num_train=4, num_val=4, num_frames=20)
    with pytest.raises(ConfigError, match="drop_last: true drops every batch"):
        build_dataloaders(train_set, None, _training(0, drop_last=True))


def test_iterable_dataset_is_loaded_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    class Stream(torch.utils.data.IterableDataset[int]):
        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter(range(10))

    with caplog.at_level("WARNING", logger="tsdia.training.data"):
        loader, _ = build_dataloaders(Stream(), None, _training(0))
    assert "exact resume is NOT claimed" in caplog.text
    assert [int(x) for batch in loader for x in batch] == list(range(10))


# --- real training runs -------------------------------------------------------------------------------

AUGMENTED = [
    *SMALL,
    "dataset.target=augmenting:build_datasets",
    "model.target=crashy:SelfSignalingModel",
    "training.logging.wandb=false",
    "training.logging.progress_bar=false",
    "training.checkpoint.interval=100",
]
FINAL = "checkpoint-epoch1-step16"


def weights(save_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(save_dir / FINAL / "model.safetensors"))


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def train(tmp_path: Path, save_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_train(
        tmp_path,
        *AUGMENTED,
        f"training.checkpoint.save_dir={save_dir}",
        *args,
        env=with_plugins(quiet_env(tmp_path)),
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run with 2 workers: the reference every other run must match bitwise."""
    tmp = tmp_path_factory.mktemp("straight")
    result = train(tmp, tmp / "full", "training.num_workers=2")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "full"


@pytest.mark.slow
def test_resume_mid_epoch_with_workers_is_bitwise_exact(straight: Path, tmp_path: Path) -> None:
    part = tmp_path / "part"
    # Call 5 sends SIGUSR2: the run saves at step 5 of 8 (mid-epoch 0) and stops; workers ignore the signal.
    stopped = train(tmp_path, part, "training.num_workers=2", "model.signal_at_call=5")
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    assert "Received SIGUSR2" in stopped.stdout + stopped.stderr
    assert (part / "checkpoint-epoch0-step5").is_dir()
    resumed = train(tmp_path, part, "training.num_workers=2", "training.checkpoint.resume=latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert same_weights(weights(straight), weights(part))


@pytest.mark.parametrize(
    "options",
    [
        ["training.num_workers=0"],
        ["training.num_workers=3", "training.dataloader.persistent_workers=true"],
    ],
    ids=["workers0", "workers3-persistent"],
)
@pytest.mark.slow
def test_weights_do_not_depend_on_num_workers(straight: Path, tmp_path: Path, options: list[str]) -> None:
    result = train(tmp_path, tmp_path / "run", *options)
    assert result.returncode == 0, result.stderr[-3000:]
    assert same_weights(weights(straight), weights(tmp_path / "run"))


@pytest.mark.slow
def test_two_ranks_resume_mid_epoch_bitwise(tmp_path: Path) -> None:
    """2 gloo ranks, each with its own worker: stopped by SIGUSR2 on rank 0 mid-epoch, resumed, equal."""

    TWO_RANKS = ["dataset.num_train=256", "training.num_workers=1", "training.preemption.check_interval=1"]
    SAVE_DIR = "training.checkpoint.save_dir"

    def torchrun(save_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        return subprocess.run(
            [
                *command,
                "-m",
                "tsdia.train",
                str(EXAMPLE),
                *AUGMENTED,
                *TWO_RANKS,
                f"{SAVE_DIR}={save_dir}",
                *args,
            ],
            cwd=REPO,
            env=with_plugins(quiet_env(tmp_path)),
            capture_output=True,
            text=True,
            timeout=300,
        )

    full, part = tmp_path / "full", tmp_path / "part"
    result = torchrun(full)
    assert result.returncode == 0, result.stderr[-3000:]
    result = torchrun(part, "model.signal_at_call=3")
    assert result.returncode != 0  # torchrun reports the ranks' exit code 4 (stopped) as a failure
    assert "exitcode:4" in result.stderr.replace(" ", ""), result.stderr[-3000:]
    assert (part / "checkpoint-epoch0-step3").is_dir()
    result = torchrun(part, "training.checkpoint.resume=latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert same_weights(weights(full), weights(part))
