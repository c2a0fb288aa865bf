"""The files of a run: its directory ``{log_dir}/{run_name}`` and JSON-ready values.

Shared by the log writers, the Checkpointer and resume, so that none of them imports
another: a Checkpointer finds the run directory without loading a log writer.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import numpy as np

from .config import LogWriterConfig, check_run_name, is_gradient_transformation


def to_jsonable(value: Any) -> Any:
    """Converts a config-like value to plain JSON types.

    Dataclasses (nested ones included) and mappings become dicts, tuples and lists become
    lists, numpy/JAX scalars and arrays become numbers and lists, and anything else that
    JSON cannot hold (an ``optax.GradientTransformation``, a function) becomes its repr.

    Args:
      value: the value to convert.

    Returns:
      A value ``json.dump`` accepts.
    """
    # GradientTransformation is a NamedTuple: it must be caught before the tuple branch.
    if is_gradient_transformation(value):
        return repr(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "_asdict"):  # Snorkel-style NamedTuple configs
        return to_jsonable(value._asdict())
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(item) for item in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic) or hasattr(value, "__array__"):
        return np.asarray(value).tolist()
    return repr(value)


def default_run_name(now: datetime | None = None) -> str:
    """Snorkel's default run name: the ``"%Y_%m_%d/%H_%M_%S/"`` timestamp of ``now``."""
    now = datetime.now() if now is None else now
    return f"{now:%Y_%m_%d}/{now:%H_%M_%S}/"


def run_directory(config: LogWriterConfig, run_name: str | None = None) -> str:
    """``{log_dir}/{run_name}`` of a writer built from ``config``.

    Args:
      config: the writer's config; its ``run_name`` (checked) wins over ``run_name``.
      run_name: the name to use when ``config.run_name`` is None (the default timestamp,
        which every process of a multi-process run must agree on).

    Raises:
      ValueError: for an invalid ``config.run_name``, or when both names are None.
    """
    if config.run_name is not None:
        run_name = check_run_name(config.run_name)
    if run_name is None:
        raise ValueError("run_directory: config.run_name is None and no run_name was given")
    return os.path.join(config.log_dir, run_name)


def as_number(value: Any) -> int | float:
    """A Python number from a Python, numpy or JAX scalar (JSON and protobuf need one)."""
    if isinstance(value, bool | int | float):
        return value
    return np.asarray(value).item()


__all__ = ["as_number", "check_run_name", "default_run_name", "run_directory", "to_jsonable"]
