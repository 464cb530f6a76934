"""The fast paths to the global RNGs give exactly the states of the libraries' public calls."""

from __future__ import annotations

import random
from typing import Any

import numpy
import pytest
import torch

from tsdia.training.global_rngs import GlobalRngs, _RawMt19937, _RawPythonRandom
from tsdia.training.sample_rng import SeededSamples

SEEDS = [0, 1, 2**32 - 1, 2**32, 0x9E3779B97F4A7C15, 2**64 - 1]


def _states() -> tuple[Any, ...]:
    """Every global RNG's whole state, numpy's cached normal deviate and Python's gauss_next included."""
    legacy = numpy.random.get_state()
    return (
        torch.get_rng_state().tolist(),
        random.getstate(),
        (legacy[0], legacy[1].tolist(), *legacy[2:]),
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_seeding_equals_the_public_calls(seed: int) -> None:
    # Dirty every state first, cached normal deviates included (random.gauss and numpy keep one).
    random.gauss(0, 1), numpy.random.standard_normal(), torch.randn(3)
    torch.manual_seed(seed & 0xFFFFFFFF), random.seed(seed), numpy.random.seed(seed >> 32)
    expected = _states()
    random.gauss(0, 1), numpy.random.standard_normal(), torch.randn(3)
    GlobalRngs(["torch", "random", "numpy"]).seed(seed)
    assert _states() == expected
    for name in ("torch", "random", "numpy"):  # one alone touches only its own
        random.gauss(0, 1), numpy.random.standard_normal(), torch.randn(3)
        dirty = _states()
        GlobalRngs([name]).seed(seed)
        index = ["torch", "random", "numpy"].index(name)
        assert [*dirty[:index], expected[index], *dirty[index + 1 :]] == list(_states())


def test_the_fast_paths_apply_here() -> None:
    """The raw copies apply to this numpy and CPython (else every batch pays ~140 us in get/set_state)."""
    assert _RawMt19937.for_(numpy.random.mtrand._rand) is not None
    assert _RawPythonRandom.for_(random._inst) is not None  # type: ignore[attr-defined]


@pytest.mark.parametrize("normals_before", [0, 1, 2])
def test_save_and_restore_bring_every_state_back(normals_before: int) -> None:
    """An odd number of legacy normals leaves a cached deviate, which lives outside the twister's struct."""
    rngs = GlobalRngs(["torch", "random", "numpy"])
    torch.manual_seed(7), random.seed(7), numpy.random.seed(7)
    numpy.random.standard_normal(normals_before)
    random.gauss(0, 1)
    before = _states()
    saved = rngs.save()
    rngs.seed(123)
    numpy.random.standard_normal(3), random.gauss(0, 1), torch.randn(5)
    rngs.restore(saved)
    assert _states() == before
    assert numpy.random.get_state()[3] == normals_before % 2  # has_gauss: the case was the one meant


def test_a_draw_is_seen_by_each_rng_even_from_a_cached_normal() -> None:
    rngs = GlobalRngs(["torch", "random", "numpy"])
    numpy.random.standard_normal()  # numpy now holds a cached deviate: the next normal moves no twister
    random.gauss(0, 1)  # and so does random (gauss_next)
    before = rngs.save()
    assert rngs.drawn_from(before) == []
    numpy.random.standard_normal(), random.gauss(0, 1)
    assert rngs.drawn_from(before) == ["random", "numpy"]
    torch.rand(())
    assert rngs.drawn_from(before) == ["torch", "random", "numpy"]


def test_loading_a_batch_in_the_main_process_changes_no_state() -> None:
    class Drawing(torch.utils.data.Dataset[float]):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> float:
            return float(torch.rand(())) + random.gauss(0, 1) + float(numpy.random.standard_normal())

    numpy.random.seed(3), numpy.random.standard_normal()  # a cached deviate in the main process
    before = _states()
    first = SeededSamples(Drawing(), seed=1, stream=0).__getitems__([(0, 1), (0, 3)])
    assert _states() == before
    assert SeededSamples(Drawing(), seed=1, stream=0).__getitems__([(0, 3)]) == first[1:]
