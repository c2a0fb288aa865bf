"""Log writers: JSON files (``LogWriter``) and TensorBoard event files (``TensorBoardWriter``).

Both write under ``{log_dir}/{run_name}``, as Snorkel's writers, and are context managers
that write/flush on exit, including when training raises.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping
from datetime import datetime
from types import TracebackType
from typing import Any

import numpy as np
import optax
from tensorboardX import SummaryWriter

from jaxmtl._io import atomic_write
from jaxmtl.training.config import LOG_WRITERS, LogWriterConfig, from_dict, merge_config


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
    if isinstance(value, optax.GradientTransformation):
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


def _number(value: Any) -> int | float:
    """A Python number from a Python, numpy or JAX scalar (JSON and protobuf need one)."""
    if isinstance(value, bool | int | float):
        return value
    return np.asarray(value).item()


class LogWriter:
    """Collects scalars in memory and writes them, and the run's config, as JSON.

    Files go to ``{log_dir}/{run_name}`` (created at construction): ``log.json`` maps
    each scalar name to a list of ``[step, value]`` pairs; ``config.json`` holds the
    config given to ``write_config``.

    Args:
      log_dir: root directory of all runs; None takes it from ``config`` (default "logs").
      run_name: this run's sub-directory; None takes it from ``config``, and if that is
        None too, a ``"%Y_%m_%d/%H_%M_%S/"`` timestamp as Snorkel's.
      config: a ``LogWriterConfig`` or dict; explicit arguments override its fields.

    Attributes:
      log_dir: the run's directory ``{log_dir}/{run_name}``.
      run_name: the run's name.
      run_log: scalar name -> list of ``[step, value]``.
    """

    def __init__(self, log_dir: str | None = None, run_name: str | None = None,
                 config: LogWriterConfig | dict[str, Any] | None = None) -> None:
        overrides = {key: value for key, value in (("log_dir", log_dir),
                                                   ("run_name", run_name))
                     if value is not None}
        self.config = merge_config(from_dict(LogWriterConfig, config), overrides)
        self.run_name = self.config.run_name
        if self.run_name is None:
            now = datetime.now()
            self.run_name = f"{now:%Y_%m_%d}/{now:%H_%M_%S}/"
        self.log_dir = os.path.join(self.config.log_dir, self.run_name)
        os.makedirs(self.log_dir, exist_ok=True)
        self.run_log: defaultdict[str, list[list[int | float]]] = defaultdict(list)

    def add_scalar(self, name: str, value: Any, step: int | float) -> None:
        """Records ``value`` of scalar ``name`` at ``step``.

        Args:
          name: the scalar's name, e.g. "model/all/train/loss".
          value: a Python, numpy or JAX scalar.
          step: the x-axis value (Snorkel logs ``LogManager.point_total``).
        """
        # Lists (not tuples) so that the log survives a JSON round trip unchanged.
        self.run_log[name].append([_number(step), _number(value)])

    def write_config(self, config: Any, config_filename: str = "config.json") -> None:
        """Writes ``config`` (a dataclass, dict, NamedTuple ...) as JSON in the run directory.

        Args:
          config: the configuration; values JSON cannot hold are written as their repr.
          config_filename: file name inside the run directory.
        """
        self.write_json(to_jsonable(config), config_filename)

    def write_log(self, log_filename: str = "log.json") -> None:
        """Writes the scalars recorded so far as JSON in the run directory.

        Args:
          log_filename: file name inside the run directory.
        """
        self.write_json(self.run_log, log_filename)

    def write_text(self, text: str, filename: str) -> None:
        """Writes ``text`` (e.g. the launch command) to ``filename`` in the run directory.

        Args:
          text: the text.
          filename: file name inside the run directory.
        """
        with open(os.path.join(self.log_dir, filename), "w") as f:
            f.write(text)

    def write_json(self, obj: Any, filename: str) -> None:
        """Writes a JSON-serialisable ``obj`` to ``filename`` in the run directory.

        Args:
          obj: the object; non-finite floats are written as JSON's NaN/Infinity.
          filename: file name inside the run directory; written atomically (``atomic_write``),
            so a reader or a crash never sees half a file.
        """
        atomic_write(os.path.join(self.log_dir, filename), lambda f: json.dump(obj, f), text=True)

    def cleanup(self) -> None:
        """Writes ``log.json``; call once training ends (the context manager does)."""
        self.write_log("log.json")

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        # Also on error: the scalars logged before a crash are the ones worth reading.
        self.cleanup()


class TensorBoardWriter(LogWriter):
    """Writes scalars to a TensorBoard event file in ``{log_dir}/{run_name}``.

    Scalars go only to TensorBoard (as Snorkel's ``TensorBoardWriter``; there is no
    ``log.json``); ``write_config`` writes ``config.json`` and adds the config as text.

    Args:
      log_dir, run_name, config: as ``LogWriter``.

    Attributes:
      writer: the ``tensorboardX.SummaryWriter``.
    """

    def __init__(self, log_dir: str | None = None, run_name: str | None = None,
                 config: LogWriterConfig | dict[str, Any] | None = None) -> None:
        super().__init__(log_dir=log_dir, run_name=run_name, config=config)
        self.writer = SummaryWriter(self.log_dir)

    def add_scalar(self, name: str, value: Any, step: int | float) -> None:
        """Adds ``value`` of scalar ``name`` at integer ``step`` to the event file.

        Args:
          name: the scalar's tag.
          value: a Python, numpy or JAX scalar.
          step: the global step; a float must be integral (TensorBoard steps are int64).

        Raises:
          ValueError: if ``step`` is not an integer.
        """
        step = _number(step)
        if isinstance(step, float) and not (math.isfinite(step) and step.is_integer()):
            raise ValueError(
                f"TensorBoardWriter.add_scalar('{name}'): step must be an integer, got {step}"
            )
        self.writer.add_scalar(name, _number(value), int(step))

    def write_config(self, config: Any, config_filename: str = "config.json") -> None:
        """Writes ``config`` as JSON beside the event file and adds it as TensorBoard text.

        Args:
          config: the configuration (see ``LogWriter.write_config``).
          config_filename: file name inside the run directory.
        """
        jsonable = to_jsonable(config)
        self.write_json(jsonable, config_filename)
        self.writer.add_text(tag="config", text_string=json.dumps(jsonable))

    def cleanup(self) -> None:
        """Flushes and closes the event file (safe to call more than once)."""
        self.writer.flush()
        self.writer.close()


def make_log_writer(name: str, config: LogWriterConfig | dict[str, Any] | None = None
                    ) -> LogWriter:
    """Builds the writer named by ``TrainerConfig.log_writer``.

    Args:
      name: "json" (``LogWriter``) or "tensorboard" (``TensorBoardWriter``).
      config: the writer's ``LogWriterConfig`` (or dict).

    Returns:
      The writer.

    Raises:
      ValueError: for an unknown ``name``.
    """
    if name == "json":
        return LogWriter(config=config)
    if name == "tensorboard":
        return TensorBoardWriter(config=config)
    raise ValueError(f"Unrecognized writer option '{name}'; expected one of {list(LOG_WRITERS)}")
