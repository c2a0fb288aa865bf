"""Log writers: JSON files (``LogWriter``) and TensorBoard event files (``TensorBoardWriter``).

Both write under ``{log_dir}/{run_name}``, as Snorkel's writers, and are context managers
that write/flush on exit, including when training raises. They are siblings over
``RunDirectoryWriter`` (``base.py``: the run directory, its lock, config and text files;
each calls its ``__init__``) and both are ``MetricWriter``s, CLU's shape:
``write_scalars(step, {name: value})``, ``flush()``, ``close()``; Snorkel's
``add_scalar(name, value, step)`` and ``cleanup()`` stay. ``json.py`` holds ``LogWriter``,
``tensorboard.py`` ``TensorBoardWriter`` (tensorboardX loads with the first one).
"""

from __future__ import annotations

from typing import Any

from ... import registry
from ..config import LogWriterConfig
from ..run_files import check_run_name, default_run_name, run_directory, to_jsonable
from .base import LOG_LOCK_FILE, MetricWriter, RunDirectoryWriter
from .json import LogWriter
from .tensorboard import TensorBoardWriter


def make_log_writer(name: str, config: LogWriterConfig | dict[str, Any] | None = None
                    ) -> RunDirectoryWriter:
    """Builds the writer named by ``TrainerConfig.log_writer``.

    Args:
      name: a name of ``jaxmtl.registry.LOG_WRITERS``: "json" (``LogWriter``) or
        "tensorboard" (``TensorBoardWriter``).
      config: the writer's ``LogWriterConfig`` (or dict).

    Returns:
      The writer.

    Raises:
      ValueError: for an unknown ``name``.
    """
    return registry.LOG_WRITERS.load(name, "make_log_writer(name)")(config=config)


__all__ = [
    "LOG_LOCK_FILE",
    "LogWriter",
    "MetricWriter",
    "RunDirectoryWriter",
    "TensorBoardWriter",
    "check_run_name",
    "default_run_name",
    "make_log_writer",
    "run_directory",
    "to_jsonable",
]
