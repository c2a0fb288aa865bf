"""What every log writer shares: the ``MetricWriter`` protocol and the run directory."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from ..._io import atomic_write
from ..config import LogWriterConfig, from_dict, merge_config
from ..locks import DirectoryLock
from ..run_files import default_run_name, run_directory, to_jsonable

LOG_LOCK_FILE = ".jaxmtl-log.lock"


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

    Subclasses (``LogWriter``, ``TensorBoardWriter``: siblings) write scalars with ``add_scalar`` and define ``flush``, ``cleanup`` and
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
