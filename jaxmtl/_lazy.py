"""Deferred imports: heavy optional-at-start-up libraries load on first use, not at import.

``import jaxmtl`` costs about what ``import jax, flax.linen, optax`` costs: Orbax (checkpoints),
tensorboardX (TensorBoard logs) and pandas (DataFrames) are imported by the first call that
needs them. A module keeps its usual spelling::

    ocp = lazy_module("orbax.checkpoint")   # instead of: import orbax.checkpoint as ocp
    ...
    ocp.CheckpointManager(...)              # imports orbax.checkpoint here, once

``tests/test_startup.py`` checks that ``import jaxmtl`` loads none of them.
"""

from __future__ import annotations

import importlib
import types
from typing import Any


class LazyModule(types.ModuleType):
    """A stand-in for a module that imports the real one on first attribute access.

    Args:
      name: the dotted module name, e.g. ``"orbax.checkpoint"``.
    """

    def __init__(self, name: str):
        super().__init__(name)
        self.__dict__["_lazy_target"] = None

    def _load(self) -> types.ModuleType:
        module = self.__dict__["_lazy_target"]
        if module is None:
            module = importlib.import_module(self.__name__)
            self.__dict__["_lazy_target"] = module
        return module

    def __getattr__(self, attribute: str) -> Any:
        # Only called for names not set on the stand-in itself.
        return getattr(self._load(), attribute)

    def __dir__(self) -> list[str]:
        return dir(self._load())

    def __repr__(self) -> str:
        state = "loaded" if self.__dict__["_lazy_target"] is not None else "not loaded yet"
        return f"<lazy module {self.__name__!r} ({state})>"


def lazy_module(name: str) -> Any:
    """A module object for ``name`` that is imported when one of its attributes is first read.

    Args:
      name: the dotted module name.

    Returns:
      A ``LazyModule`` (typed ``Any`` so attribute access type-checks as the real module's).
    """
    return LazyModule(name)
