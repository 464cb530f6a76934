"""tsdia: a Slurm/HPC job kit and experiment manager for PyTorch training."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from tsdia.weights import load_model

__all__ = ["__version__", "load_model"]


def __getattr__(name: str) -> Any:
    """`tsdia.load_model` imports torch only when it is first used (`import tsdia` stays cheap)."""
    if name == "load_model":
        from tsdia.weights import load_model

        return load_model
    raise AttributeError(f"module 'tsdia' has no attribute {name!r}")
