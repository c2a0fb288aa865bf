"""Settings of the Trainer's services: evaluation cadence, checkpoints and logs.

``LogManagerConfig`` (when to evaluate), ``CheckpointerConfig`` (what to keep, by which
metric) and ``LogWriterConfig`` (where logs go), with Snorkel's field names and defaults,
validated at construction; ``parse_metric_modes`` and ``check_run_name`` are their checks,
shared with the services. No implementation module (nor JAX) is imported.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from .. import registry
from .config_base import check_finite, check_finite_non_negative


@dataclass(frozen=True)
class LogManagerConfig:
    """When to evaluate: every ``evaluation_freq`` ``counter_unit``s (Snorkel's semantics).

    Attributes:
      counter_unit: "points", "batches" or "epochs".
      evaluation_freq: evaluate (score the valid loaders, log, checkpoint) every this
        many units, > 0 (e.g. 0.5 epochs, 25 batches).
    """

    counter_unit: str = "epochs"
    evaluation_freq: float = 1.0

    def __post_init__(self) -> None:
        registry.COUNTER_UNITS.check(self.counter_unit, "LogManagerConfig.counter_unit")
        check_finite("LogManagerConfig", "evaluation_freq", self.evaluation_freq)
        if self.evaluation_freq <= 0:
            raise ValueError(
                f"LogManagerConfig.evaluation_freq must be > 0, got {self.evaluation_freq!r}"
            )


@dataclass(frozen=True)
class CheckpointerConfig:
    """Checkpointing settings, as Snorkel's ``CheckpointerConfig``.

    ``checkpoint_dir`` defaults to "checkpoints" as in Snorkel 0.10; None puts the
    checkpoints beside the logs when logging is on (else in "checkpoints").
    ``checkpoint_metric`` and each of ``checkpoint_task_metrics`` is
    ``"task/dataset/split/metric:mode"`` with mode "min" or "max" (a list is stored as a
    tuple).
    """

    checkpoint_dir: str | None = "checkpoints"
    checkpoint_factor: int = 1
    checkpoint_metric: str = "model/all/train/loss:min"
    checkpoint_task_metrics: tuple[str, ...] | None = None
    checkpoint_runway: float = 0
    checkpoint_clear: bool = True

    def __post_init__(self) -> None:
        owner = "CheckpointerConfig"
        if self.checkpoint_dir is not None and (
                not isinstance(self.checkpoint_dir, str) or not self.checkpoint_dir):
            raise ValueError(f"{owner}.checkpoint_dir must be a non-empty path or None, got "
                             f"{self.checkpoint_dir!r}")
        if (isinstance(self.checkpoint_factor, bool) or not isinstance(self.checkpoint_factor, int)
                or self.checkpoint_factor < 1):
            raise ValueError(f"{owner}.checkpoint_factor must be an int >= 1, got "
                             f"{self.checkpoint_factor!r}")
        check_finite_non_negative(owner, "checkpoint_runway", self.checkpoint_runway)
        if not isinstance(self.checkpoint_clear, bool):
            raise ValueError(f"{owner}.checkpoint_clear must be a bool, got "
                             f"{self.checkpoint_clear!r}")
        parse_metric_modes([self.checkpoint_metric], f"{owner}.checkpoint_metric")
        if self.checkpoint_task_metrics is not None:
            if isinstance(self.checkpoint_task_metrics, str):
                raise ValueError(
                    f"{owner}.checkpoint_task_metrics must be a list of "
                    f"'task/dataset/split/metric:mode' strings or None, got the string "
                    f"{self.checkpoint_task_metrics!r}")
            object.__setattr__(self, "checkpoint_task_metrics",
                               tuple(self.checkpoint_task_metrics))
            parse_metric_modes(self.checkpoint_task_metrics, f"{owner}.checkpoint_task_metrics")


def parse_metric_modes(metric_modes: Iterable[str] | None, where: str) -> dict[str, str]:
    """Parses checkpoint metrics ``"task/dataset/split/metric:mode"`` into metric -> mode.

    Args:
      metric_modes: the strings; None means none.
      where: the field that holds them, for error messages.

    Returns:
      ``{"task/dataset/split/metric": "min" | "max"}`` in the given order.

    The mode follows the last ":", so a task name with a colon (a slice task such as
    ``task_slice:short_pred``) can be checkpointed on.

    Raises:
      ValueError: for a string without ":" (or nothing before it), a mode other than
        "min"/"max", or a metric name without four "/"-separated parts.
    """
    modes: dict[str, str] = {}
    for metric_mode in metric_modes or ():
        metric, colon, mode = str(metric_mode).rpartition(":")
        if not colon or not metric:
            raise ValueError(
                f"{where}: metric must be of the form 'metric_name:mode' where mode is "
                f"'max' or 'min', got {metric_mode!r}"
            )
        registry.METRIC_MODES.check(mode, f"{where}, metric {metric!r}")
        if len(metric.split("/")) != 4:
            raise ValueError(
                f"{where} must be formatted 'task/dataset/split/metric:mode', got "
                f"{metric_mode!r}"
            )
        modes[metric] = mode
    return modes


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


@dataclass(frozen=True)
class LogWriterConfig:
    """Where logs go: ``{log_dir}/{run_name}``; ``run_name`` defaults to a timestamp.

    ``run_name``, when given, must be a plain directory name (see ``check_run_name``).
    """

    log_dir: str = "logs"
    run_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.log_dir, str | os.PathLike) or not os.fspath(self.log_dir):
            raise ValueError(
                f"LogWriterConfig.log_dir must be a non-empty path, got {self.log_dir!r}")
        if self.run_name is not None:
            check_run_name(self.run_name)

