"""``TensorBoardWriter``: scalars to a TensorBoard event file (through tensorboardX)."""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import uuid
from typing import Any

from ..._lazy import lazy_module
from ..config import LogWriterConfig
from ..run_files import as_number, to_jsonable
from .base import RunDirectoryWriter

# Imported by the first TensorBoardWriter, not by `import jaxmtl`.
tensorboardX = lazy_module("tensorboardX")


def _event_files(directory: str, suffix: str = "") -> list[str]:
    """The TensorBoard event files in ``directory`` (those ending in ``suffix``), sorted."""
    return sorted(glob.glob(os.path.join(directory, f"events.out.tfevents.*{suffix}")))


class TensorBoardWriter(RunDirectoryWriter):
    """Writes scalars to a TensorBoard event file in ``{log_dir}/{run_name}``.

    Scalars go only to TensorBoard (as Snorkel's ``TensorBoardWriter``; there is no
    ``log.json``); ``write_config`` writes ``config.json`` and adds the config as text.
    A new run in the directory of an earlier one (the same ``run_name``) removes that
    run's event files when it first writes; a resumed run (``continue_log``) keeps them.

    Args:
      log_dir, run_name, config: as ``RunDirectoryWriter`` (and ``LogWriter``).

    Attributes:
      writer: the ``tensorboardX.SummaryWriter``.
    """

    def __init__(self, log_dir: str | None = None, run_name: str | None = None,
                 config: LogWriterConfig | dict[str, Any] | None = None) -> None:
        super().__init__(log_dir=log_dir, run_name=run_name, config=config)
        # An earlier run's event files in this run directory (the same run_name): a new
        # run replaces them when it first writes (TensorBoard would overlay both runs'
        # curves as one run), a resumed one continues them (``continue_log``).
        self._earlier = _event_files(self.log_dir)
        self.writer = self._open_event_file()

    def _replace_earlier_run(self) -> None:
        for path in self._earlier:
            if os.path.exists(path):
                os.remove(path)
        self._earlier = []

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
        step = as_number(step)
        if isinstance(step, float) and not (math.isfinite(step) and step.is_integer()):
            raise ValueError(
                f"TensorBoardWriter.add_scalar('{name}'): step must be an integer, got {step}"
            )
        self._replace_earlier_run()
        self.writer.add_scalar(name, as_number(value), int(step))
        self._added += 1

    def write_config(self, config: Any, config_filename: str = "config.json") -> None:
        """Writes ``config`` as JSON beside the event file and adds it as TensorBoard text.

        Args:
          config: the configuration (see ``LogWriter.write_config``).
          config_filename: file name inside the run directory.
        """
        jsonable = to_jsonable(config)
        self._replace_earlier_run()
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
        self._earlier = []  # the interrupted run's event files: this run continues them
        self.writer.close()
        if not self._added:  # the file opened at construction holds nothing: drop it
            for path in _event_files(self.log_dir, self._suffix):
                os.remove(path)
        if previous_log_dir is not None and os.path.isdir(previous_log_dir) and (
                os.path.realpath(previous_log_dir) != os.path.realpath(self.log_dir)):
            for path in _event_files(previous_log_dir):
                shutil.copy2(path, self.log_dir)
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
