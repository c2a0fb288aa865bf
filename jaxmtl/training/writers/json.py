"""``LogWriter``: scalars and the run's config as JSON files in the run directory."""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from typing import Any

from ..config import LogWriterConfig
from ..run_files import as_number
from .base import RunDirectoryWriter

logger = logging.getLogger(__name__)


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
        self.run_log[name].append([as_number(step), as_number(value)])

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
