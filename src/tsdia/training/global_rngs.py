"""Seed, save, restore and compare the global RNGs user code draws from (`torch`, `random`, `numpy`), fast.

Per-sample seeding (`tsdia.training.sample_rng`) runs these for every sample or batch a DataLoader
loads, right after tensors have evicted the caches, where each Python call costs microseconds. So each
takes the shortest path that gives the same state as the library's public call:
- seeding: `default_generator.manual_seed` (not `torch.manual_seed`, which also walks every
  accelerator); the C `seed` of `random`'s hidden instance plus the reset of its cached normal deviate
  (what `random.seed(int)` does, without its Python wrapper); numpy's legacy `RandomState.seed`;
  all in one function, one call per sample;
- saving (to restore the main process's states, and to see whether a batch drew from an RNG):
  `random.getstate` builds 625 ints and numpy's `get_state`/`set_state` copy the twister word by word
  (~15 and ~60 us), so both are read as raw bytes from their C structs instead, after checking once
  that the bytes read back as the public call says (else the public calls are used).
"""

from __future__ import annotations

import _random
import array
import ctypes
import operator
import random
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

try:
    import numpy
except ImportError:  # numpy is optional: without it there is no numpy RNG to seed
    numpy = None  # type: ignore[assignment]

__all__ = ["NAMES", "GlobalRngs"]

NAMES = ("torch", "random", "numpy")


class _RawMt19937:
    """Saves and restores numpy's legacy global RNG by copying its Mersenne Twister struct.

    `RandomState` keeps one more piece of state outside the struct: a cached second normal deviate
    (`has_gauss`, `gauss`), which only `get_state` shows. `save` finds out whether one is cached by
    drawing a normal (a cached one comes back without moving the twister), then undoes the draw. That
    probe is skipped when the struct still holds the bytes of the last state seen without a cached
    deviate: caching one means drawing a pair, which moves the twister. Without a cached deviate, the
    usual case, `restore` is a `seed` (which clears the cache) and one copy; with one, `set_state`.
    """

    STATE_BYTES = 624 * 4 + 4  # mt19937_state: uint32_t key[624]; int pos;

    def __init__(self, legacy: Any) -> None:
        self.legacy = legacy
        self.address: int = legacy._bit_generator.ctypes.state_address
        self._uncached: bytes | None = None  # the last struct seen with no deviate cached

    @classmethod
    def for_(cls, legacy: Any) -> _RawMt19937 | None:
        """The raw copier, or None where the struct does not read back as `get_state` says."""
        bit_generator: Any = getattr(legacy, "_bit_generator", None)
        if type(bit_generator).__name__ != "MT19937" or not hasattr(bit_generator, "ctypes"):
            return None
        raw = cls(legacy)
        state = bit_generator.state["state"]
        key, pos = raw._decode(ctypes.string_at(raw.address, cls.STATE_BYTES))
        return raw if numpy.array_equal(key, state["key"]) and pos == state["pos"] else None

    def _decode(self, raw: bytes) -> tuple[Any, int]:
        return numpy.frombuffer(raw, numpy.uint32, 624), int(numpy.frombuffer(raw, numpy.intc, 1, 624 * 4)[0])

    def save(self) -> tuple[bytes, float | None]:
        raw = ctypes.string_at(self.address, self.STATE_BYTES)
        if raw == self._uncached:
            # (Only a `set_state` to these very bytes with a deviate cached could make this wrong.)
            return raw, None
        deviate = self.legacy.standard_normal()
        saved = raw, deviate if ctypes.string_at(self.address, self.STATE_BYTES) == raw else None
        self.restore(saved)  # undo the probe: saving leaves the RNG as it was
        return saved

    def restore(self, saved: tuple[bytes, float | None]) -> None:
        raw, cached_deviate = saved
        if cached_deviate is None:
            self.legacy.seed(0)  # clears the cached deviate; the copy below replaces the twister
            ctypes.memmove(self.address, raw, self.STATE_BYTES)
            self._uncached = raw
        else:
            key, pos = self._decode(raw)
            self.legacy.set_state(("MT19937", key, pos, 1, cached_deviate))


class _RawPythonRandom:
    """Reads `random`'s hidden instance by copying its C struct (`getstate` builds 625 ints: ~15 us).

    CPython's `RandomObject` is `PyObject_HEAD; int index; uint32_t state[624]`, unchanged for a decade;
    `for_` checks once that the bytes read back as `getstate` says, else the plain calls are used.
    Restoring goes through `setstate` (writing into the object is left to CPython).
    """

    OFFSET, STATE_BYTES = 16, 4 + 624 * 4

    def __init__(self, instance: Any) -> None:
        self.instance, self.address = instance, id(instance) + self.OFFSET

    @classmethod
    def for_(cls, instance: Any) -> _RawPythonRandom | None:
        """The raw reader, or None where the struct does not read back as `getstate` says."""
        raw = cls(instance)
        if sys.implementation.name != "cpython" or array.array("I").itemsize != 4:
            return None
        return raw if raw._decode(raw.save()) == instance.getstate() else None

    def save(self) -> tuple[bytes, Any]:
        return ctypes.string_at(self.address, self.STATE_BYTES), self.instance.gauss_next

    def restore(self, saved: tuple[bytes, Any]) -> None:
        self.instance.setstate(self._decode(saved))

    def _decode(self, saved: tuple[bytes, Any]) -> tuple[Any, ...]:
        raw, gauss_next = saved
        words = array.array("I", raw[4:]).tolist()
        return self.instance.VERSION, (*words, int.from_bytes(raw[:4], sys.byteorder)), gauss_next


class _Saver(NamedTuple):
    """Save, restore and compare one RNG's state (`same`: nothing was drawn in between)."""

    save: Callable[[], Any]
    restore: Callable[[Any], Any]
    same: Callable[[Any, Any], bool] = operator.eq


def _torch_saver(generator: torch.Generator) -> _Saver:
    """As bytes: two of them compare in a memcmp (`torch.equal` on the state tensors: ~10 us)."""

    def save() -> bytes:
        state = generator.get_state()
        return ctypes.string_at(state.data_ptr(), state.numel())

    def restore(state: bytes) -> None:
        generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))

    return _Saver(save, restore)


def _numpy_states_equal(a: Any, b: Any) -> bool:
    return bool(numpy.array_equal(a[1], b[1])) and a[2:] == b[2:]


class GlobalRngs:
    """The named global RNGs of this process: seeded together, saved and restored together.

    `seed(value)` seeds each RNG from a 64-bit value, exactly as its library's public seeding call would.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = [name for name in names if not (name == "numpy" and numpy is None)]
        unknown = sorted(set(self.names) - set(NAMES))
        if unknown:
            raise ValueError(f"unknown global RNG(s) {unknown}: choose from {list(NAMES)}")
        generator = torch.default_generator
        python: Any = random._inst  # the Random behind random.random, random.randint, ...
        legacy = numpy.random.mtrand._rand if "numpy" in self.names else None  # behind numpy.random.*
        self.seed = _seeder(
            generator.manual_seed if "torch" in self.names else None,
            python if "random" in self.names else None,
            legacy.seed if legacy is not None else None,
        )
        python_raw = _RawPythonRandom.for_(python)
        savers = {
            "torch": _torch_saver(generator),
            "random": _Saver(python_raw.save, python_raw.restore)
            if python_raw
            else _Saver(python.getstate, python.setstate),
        }
        if legacy is not None:
            raw = _RawMt19937.for_(legacy)
            savers["numpy"] = (
                _Saver(raw.save, raw.restore)
                if raw
                else _Saver(legacy.get_state, legacy.set_state, _numpy_states_equal)
            )
        self._savers = [savers[name] for name in self.names]

    def save(self) -> list[Any]:
        """Every RNG's state, in the order of `names`."""
        return [saver.save() for saver in self._savers]

    def restore(self, saved: list[Any]) -> None:
        """Put back the states `save` returned."""
        for saver, state in zip(self._savers, saved, strict=True):
            saver.restore(state)

    def drawn_from(self, before: list[Any]) -> list[str]:
        """The RNGs whose state moved since `before` (a `save()`): something drew from them."""
        pairs = zip(self.names, self._savers, before, self.save(), strict=True)
        return [name for name, saver, then, now in pairs if not saver.same(then, now)]


def _seeder(
    torch_seed: Callable[[int], Any] | None, python: Any, numpy_seed: Callable[[int], Any] | None
) -> Callable[[int], None]:
    """One function that seeds the given RNGs: one Python call per sample, and only local names in it.

    After a sample's tensors have evicted the caches, each extra frame or attribute lookup costs
    microseconds (a method reading `self.` attributes measured ~10 us more per sample than this).
    """
    python_seed = _random.Random.seed  # random.seed(value) without its Python wrapper

    def seed(
        value: int, torch_seed=torch_seed, python=python, python_seed=python_seed, numpy_seed=numpy_seed
    ) -> None:
        if torch_seed is not None:
            torch_seed(value & 0xFFFFFFFF)
        if python is not None:
            python_seed(python, value)
            python.gauss_next = None
        if numpy_seed is not None:
            # Other bits than torch's: both are MT19937, and equal seeds would give equal streams.
            numpy_seed(value >> 32)

    return seed
