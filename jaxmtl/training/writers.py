"""Log writers: JSON files (``LogWriter``) and TensorBoard event files (``TensorBoardWriter``).

Both write under ``{log_dir}/{run_name}``, as Snorkel's writers, and are context managers
that write/flush on exit, including when training raises. They are siblings over
``RunDirectoryWriter`` (the run directory, its lock, config and text files) and both are
``MetricWriter``s, CLU's shape: ``write_scalars(step, {name: value})``, ``flush()``,
``close()``; Snorkel's ``add_scalar(name, value, step)`` and ``cleanup()`` stay.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import shutil
import uuid
from collections import defaultdict
from collections.abc import Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import numpy as np
import optax

from jaxmtl._io import atomic_write
from jaxmtl._lazy import lazy_module
from jaxmtl.training.config import LOG_WRITERS, LogWriterConfig, from_dict, merge_config
from jaxmtl.training.locks import DirectoryLock

# Imported by the first TensorBoardWriter, not by `import jaxmtl`.
tensorboardX = lazy_module("tensorboardX")

logger = logging.getLogger(__name__)

LOG_LOCK_FILE = ".jaxmtl-log.lock"


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


def default_run_name(now: datetime | None = None) -> str:
    """Snorkel's default run name: the ``"%Y_%m_%d/%H_%M_%S/"`` timestamp of ``now``."""
    now = datetime.now() if now is None else now
    return f"{now:%Y_%m_%d}/{now:%H_%M_%S}/"


def check_run_name(run_name: str) -> str:
    """Returns ``run_name`` if it names one directory inside ``log_dir``.

    Raises:
      ValueError: for an empty name, an absolute path, a path separator, or a "." or ".."
        name (any of which would put the logs outside ``{log_dir}/{run_name}``).
    """
    separators = [sep for sep in (os.sep, os.altsep, "/") if sep]
    if (not isinstance(run_name, str) or run_name in ("", ".", "..")
            or os.path.isabs(run_name) or any(sep in run_name for sep in separators)):
        raise ValueError(
            f"log_writer_config.run_name must be a plain directory name (no path separator, "
            f"not absolute, not '.' or '..'), got {run_name!r}"
        )
    return run_name


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


def _number(value: Any) -> int | float:
    """A Python number from a Python, numpy or JAX scalar (JSON and protobuf need one)."""
    if isinstance(value, bool | int | float):
        return value
    return np.asarray(value).item()


@runtime_checkable
class MetricWriter(Protocol):
    """Writes scalar metrics of a run (the shape of CLU's ``metric_writers.MetricWriter``).

    ``LogWriter`` and ``TensorBoardWriter`` implement it; so can any object with these
    three methods (``isinstance(obj, MetricWriter)`` checks their presence).
    """

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Records each ``{name: value}`` of ``scalars`` at ``step``."""

    def flush(self) -> None:
        """Makes what was written so far durable."""

    def close(self) -> None:
        """Flushes and releases the writer's resources; no writes afterwards."""


class RunDirectoryWriter:
    """The part both writers share: the run directory, its lock, config and text files.

    Subclasses write scalars with ``add_scalar`` and define ``flush``, ``cleanup`` and
    ``continue_log``; this class turns those into ``MetricWriter``'s ``write_scalars`` and
    ``close``.

    Args:
      log_dir: root directory of all runs; None takes it from ``config`` (default "logs").
      run_name: this run's sub-directory; None takes it from ``config``, and if that is
        None too, a ``"%Y_%m_%d/%H_%M_%S/"`` timestamp as Snorkel's. A given name must
        be one directory name (no separator, not absolute, not "..").
      config: a ``LogWriterConfig`` or dict; explicit arguments override its fields.

    Raises:
      ValueError: for an invalid ``run_name``.
      DirectoryLockedError: if another live run writes to the same run directory.

    Attributes:
      log_dir: the run's directory ``{log_dir}/{run_name}``.
      run_name: the run's name.
    """

    def __init__(self, log_dir: str | None = None, run_name: str | None = None,
                 config: LogWriterConfig | dict[str, Any] | None = None) -> None:
        overrides = {key: value for key, value in (("log_dir", log_dir),
                                                   ("run_name", run_name))
                     if value is not None}
        self.config = merge_config(from_dict(LogWriterConfig, config), overrides)
        self.run_name = self.config.run_name
        if self.run_name is None:
            self.run_name = default_run_name()
        self.log_dir = run_directory(self.config, self.run_name)
        self._lock = DirectoryLock(self.log_dir, LOG_LOCK_FILE, "log directory").acquire()

    def add_scalar(self, name: str, value: Any, step: int | float) -> None:
        """Records ``value`` of scalar ``name`` at ``step`` (Snorkel's writer method)."""
        raise NotImplementedError

    def flush(self) -> None:
        """Makes the scalars written so far durable."""
        raise NotImplementedError

    def cleanup(self) -> None:
        """Writes/flushes everything and releases the run directory (Snorkel's name)."""
        raise NotImplementedError

    def continue_log(self, previous_log_dir: str | None, up_to_step: int | float) -> None:
        """Continues the log of an interrupted run up to ``up_to_step`` (on resume)."""
        raise NotImplementedError

    def write_scalars(self, step: int | float, scalars: Mapping[str, Any]) -> None:
        """Records every ``{name: value}`` of ``scalars`` at ``step`` (``MetricWriter``).

        Args:
          step: the x-axis value (the Trainer logs ``LogManager.point_total``).
          scalars: scalar name -> Python, numpy or JAX scalar.
        """
        for name, value in scalars.items():
            self.add_scalar(name, value, step)

    def close(self) -> None:
        """``cleanup()`` under ``MetricWriter``'s name."""
        self.cleanup()

    def write_config(self, config: Any, config_filename: str = "config.json") -> None:
        """Writes ``config`` (a dataclass, dict, NamedTuple ...) as JSON in the run directory.

        Args:
          config: the configuration; values JSON cannot hold are written as their repr.
          config_filename: file name inside the run directory.
        """
        self.write_json(to_jsonable(config), config_filename)

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

    def release(self) -> None:
        """Releases the run directory without writing anything (a run that failed before
        it started must not replace the log already there)."""
        self._lock.release()

    def __enter__(self) -> RunDirectoryWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        # Also on error: the scalars logged before a crash are the ones worth reading.
        self.cleanup()


class LogWriter(RunDirectoryWriter):
    """Collects scalars in memory and writes them, and the run's config, as JSON.

    Files go to ``{log_dir}/{run_name}`` (created at construction): ``log.json`` maps
    each scalar name to a list of ``[step, value]`` pairs; ``config.json`` holds the
    config given to ``write_config``. Arguments, errors and attributes as
    ``RunDirectoryWriter``'s.

    Attributes:
      run_log: scalar name -> list of ``[step, value]``.
    """

    def __init__(self, log_dir: str | None = None, run_name: str | None = None,
                 config: LogWriterConfig | dict[str, Any] | None = None) -> None:
        super().__init__(log_dir=log_dir, run_name=run_name, config=config)
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

    def write_log(self, log_filename: str = "log.json") -> None:
        """Writes the scalars recorded so far as JSON in the run directory.

        Args:
          log_filename: file name inside the run directory.
        """
        self.write_json(self.run_log, log_filename)

    def flush(self) -> None:
        """Writes ``log.json`` now (the Checkpointer calls it before each checkpoint, so a
        resumed run finds every point logged up to its checkpoint)."""
        self.write_log("log.json")

    def continue_log(self, previous_log_dir: str | None, up_to_step: int | float) -> None:
        """Continues the log of an interrupted run (on resume).

        Reads ``{previous_log_dir}/log.json`` (the interrupted run's, possibly this
        writer's own directory) and keeps its points at steps ``<= up_to_step`` (those
        logged up to the checkpoint resumed from; later ones will be logged again).

        Args:
          previous_log_dir: the interrupted run's directory; None (it had no log) starts
            an empty log.
          up_to_step: the resumed checkpoint's step (``LogManager.point_total``).

        Raises:
          ValueError: if that ``log.json`` exists but is not a JSON log.
        """
        self.run_log = defaultdict(list)
        path = None if previous_log_dir is None else os.path.join(previous_log_dir, "log.json")
        if path is None or not os.path.exists(path):
            logger.info("No log of the resumed run found (%s); the log starts empty", path)
            return
        try:
            with open(path) as f:
                previous = json.load(f)
            for name, points in previous.items():
                kept = [[step, value] for step, value in points if step <= up_to_step]
                if kept:
                    self.run_log[name] = kept
        except (ValueError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}: not a jaxmtl JSON log ({error})") from error
        logger.info("Continuing the log %s up to step %s", path, up_to_step)

    def cleanup(self) -> None:
        """Writes ``log.json`` and releases the run directory; call once training ends
        (the context manager does)."""
        try:
            self.write_log("log.json")
        finally:
            self._lock.release()



class TensorBoardWriter(RunDirectoryWriter):
    """Writes scalars to a TensorBoard event file in ``{log_dir}/{run_name}``.

    Scalars go only to TensorBoard (as Snorkel's ``TensorBoardWriter``; there is no
    ``log.json``); ``write_config`` writes ``config.json`` and adds the config as text.

    Args:
      log_dir, run_name, config: as ``RunDirectoryWriter`` (and ``LogWriter``).

    Attributes:
      writer: the ``tensorboardX.SummaryWriter``.
    """

    def __init__(self, log_dir: str | None = None, run_name: str | None = None,
                 config: LogWriterConfig | dict[str, Any] | None = None) -> None:
        super().__init__(log_dir=log_dir, run_name=run_name, config=config)
        self.writer = self._open_event_file()

    def _open_event_file(self, purge_step: int | None = None) -> tensorboardX.SummaryWriter:
        # A unique suffix: tensorboardX names files by the second and the host, so two
        # writers of one second (a resume, a copied file) would share a file.
        self._suffix, self._added = f".{uuid.uuid4().hex[:8]}", 0
        return tensorboardX.SummaryWriter(self.log_dir, purge_step=purge_step,
                             filename_suffix=self._suffix)

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
        self._added += 1

    def write_config(self, config: Any, config_filename: str = "config.json") -> None:
        """Writes ``config`` as JSON beside the event file and adds it as TensorBoard text.

        Args:
          config: the configuration (see ``LogWriter.write_config``).
          config_filename: file name inside the run directory.
        """
        jsonable = to_jsonable(config)
        self.write_json(jsonable, config_filename)
        self.writer.add_text(tag="config", text_string=json.dumps(jsonable))
        self._added += 1

    def flush(self) -> None:
        """Flushes the event file to disk."""
        self.writer.flush()

    def continue_log(self, previous_log_dir: str | None, up_to_step: int | float) -> None:
        """Continues the TensorBoard run of an interrupted run (on resume).

        The interrupted run's event files are copied here (when it wrote elsewhere), and
        a new event file starts with ``purge_step = up_to_step + 1``: TensorBoard hides
        the points the interrupted run logged after its checkpoint, which this run logs
        again.

        Args:
          previous_log_dir: the interrupted run's directory; None starts a fresh run.
          up_to_step: the resumed checkpoint's step (``LogManager.point_total``).
        """
        self.writer.close()
        if not self._added:  # the file opened at construction holds nothing: drop it
            for path in glob.glob(os.path.join(self.log_dir, f"events.out.tfevents.*{self._suffix}")):
                os.remove(path)
        if previous_log_dir is not None and os.path.isdir(previous_log_dir) and (
                os.path.realpath(previous_log_dir) != os.path.realpath(self.log_dir)):
            for name in sorted(os.listdir(previous_log_dir)):
                if name.startswith("events.out.tfevents."):
                    shutil.copy2(os.path.join(previous_log_dir, name), self.log_dir)
        self.writer = self._open_event_file(purge_step=int(up_to_step) + 1)

    def release(self) -> None:
        """Closes the event file and releases the run directory."""
        try:
            self.writer.close()
        finally:
            self._lock.release()

    def cleanup(self) -> None:
        """Flushes and closes the event file and releases the run directory (safe to
        call more than once)."""
        try:
            self.writer.flush()
            self.writer.close()
        finally:
            self._lock.release()


def make_log_writer(name: str, config: LogWriterConfig | dict[str, Any] | None = None
                    ) -> RunDirectoryWriter:
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
