"""Seed, save and restore the global RNGs user code draws from (`torch`, `random`, `numpy`), fast.

Per-sample seeding (`tsdia.training.sample_rng`) runs these for every sample a DataLoader loads, between
samples whose tensors have just evicted the caches, so each call takes the shortest path to the C code
that produces the same state as the library's public call:
- torch: `default_generator.manual_seed` (not `torch.manual_seed`, which also walks every accelerator);
- random: the C `seed` of the module's hidden `Random` instance plus the reset of its cached normal
  deviate, exactly what `random.seed(int)` does without its Python wrapper;
- numpy: the legacy `RandomState` behind `numpy.random.*`; its `get_state`/`set_state` copy the 624-word
  Mersenne Twister word by word (~60 us each), so saving and restoring it (once per batch, in the main
  process) copies the raw state struct instead, after checking once that the struct reads back as
  `get_state` says.
"""

from __future__ import annotations

import _random
import ctypes
import random
from collections.abc import Callable, Sequence
from typing import Any

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
    drawing a normal (a cached one comes back without moving the twister), then undoes the draw. Without
    a cached deviate, which is the usual case, `restore` is a `seed` (which clears the cache) and one
    copy; with one, it falls back to `set_state`.
    """

    STATE_BYTES = 624 * 4 + 4  # mt19937_state: uint32_t key[624]; int pos;

    def __init__(self, legacy: Any) -> None:
        self.legacy = legacy
        self.address: int = legacy._bit_generator.ctypes.state_address

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
        deviate = self.legacy.standard_normal()
        saved = raw, deviate if ctypes.string_at(self.address, self.STATE_BYTES) == raw else None
        self.restore(saved)  # undo the probe: saving leaves the RNG as it was
        return saved

    def restore(self, saved: tuple[bytes, float | None]) -> None:
        raw, cached_deviate = saved
        if cached_deviate is None:
            self.legacy.seed(0)  # clears the cached deviate; the copy below replaces the twister
            ctypes.memmove(self.address, raw, self.STATE_BYTES)
        else:
            key, pos = self._decode(raw)
            self.legacy.set_state(("MT19937", key, pos, 1, cached_deviate))


def _torch_state(generator: torch.Generator) -> tuple[Callable[[], bytes], Callable[[bytes], Any]]:
    """Save as bytes (states compare with ==) and restore from them."""

    def save() -> bytes:
        return generator.get_state().numpy().tobytes()

    def restore(state: bytes) -> None:
        generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))

    return save, restore


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
        savers: dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]] = {
            "torch": _torch_state(generator),
            "random": (python.getstate, python.setstate),
        }
        if legacy is not None:
            raw = _RawMt19937.for_(legacy)
            savers["numpy"] = (raw.save, raw.restore) if raw else (legacy.get_state, legacy.set_state)
        self._savers = [savers[name] for name in self.names]

    def save(self) -> list[Any]:
        """Every RNG's state, in the order of `names`; states compare with `==` (equal: nothing was drawn)."""
        return [save() for save, _ in self._savers]

    def restore(self, saved: list[Any]) -> None:
        """Put back the states `save` returned."""
        for (_, restore), state in zip(self._savers, saved, strict=True):
            restore(state)

    def drawn_from(self, before: list[Any]) -> list[str]:
        """The RNGs whose state moved since `before` (a `save()`): something drew from them."""
        return [
            name for name, state, now in zip(self.names, before, self.save(), strict=True) if state != now
        ]


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
