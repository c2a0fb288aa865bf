"""Counts training progress and says when to evaluate and checkpoint (Snorkel's LogManager)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Mapping
from typing import Any, Protocol, TypeVar

from jaxmtl.training.config import LogManagerConfig, from_dict, merge_config

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT")

# The counters that define the manager's progress; ``state_dict`` saves exactly these.
_COUNTERS = (
    "point_count", "point_total",
    "batch_count", "batch_total",
    "epoch_count", "epoch_total",
    "unit_count", "unit_total",
    "trigger_count",
)


class _Writer(Protocol):
    def cleanup(self) -> None: ...


class _Checkpointer(Protocol):
    checkpoint_factor: int

    def load_best_model(self, model: Any) -> Any: ...


class LogManager:
    """Tracks points, batches and epochs seen, and triggers evaluation and checkpointing.

    Evaluation triggers every ``evaluation_freq`` ``counter_unit``s since the previous
    evaluation; checkpointing triggers on every ``checkpointer.checkpoint_factor``-th
    evaluation. ``*_count`` counters restart at each evaluation, ``*_total`` ones never.

    Args:
      n_batches_per_epoch: train batches in one epoch (converts batches to epochs).
      log_writer: a writer with ``cleanup()`` (``LogWriter``/``TensorBoardWriter``), closed
        by ``cleanup``; None for no logging.
      checkpointer: an object with ``checkpoint_factor`` and ``load_best_model(model)``
        (and optionally ``clear()``), as Snorkel's ``Checkpointer``; None disables
        checkpointing.
      counter_unit: "points", "batches" or "epochs"; None takes it from ``config``
        (default "epochs").
      evaluation_freq: evaluate every this many ``counter_unit``s; None takes it from
        ``config`` (default 1.0).
      config: a ``LogManagerConfig`` or dict; explicit ``counter_unit`` /
        ``evaluation_freq`` arguments override its fields.

    Raises:
      ValueError: for an unknown ``counter_unit`` ("Unrecognized counter_unit ...") or a
        non-positive ``evaluation_freq``, a non-positive ``n_batches_per_epoch``, or a
        checkpointer without ``checkpoint_factor``.
    """

    def __init__(
        self,
        n_batches_per_epoch: int,
        log_writer: _Writer | None = None,
        checkpointer: _Checkpointer | None = None,
        counter_unit: str | None = None,
        evaluation_freq: float | None = None,
        config: LogManagerConfig | dict[str, Any] | None = None,
    ) -> None:
        overrides = {
            key: value
            for key, value in (("counter_unit", counter_unit),
                               ("evaluation_freq", evaluation_freq))
            if value is not None
        }
        self.config = merge_config(from_dict(LogManagerConfig, config), overrides)
        if n_batches_per_epoch <= 0:
            raise ValueError(
                f"LogManager: n_batches_per_epoch must be > 0, got {n_batches_per_epoch!r}"
            )
        if checkpointer is not None and not hasattr(checkpointer, "checkpoint_factor"):
            # Fail at construction rather than at the first evaluation, hours in.
            raise ValueError(
                f"LogManager: checkpointer {type(checkpointer).__name__} has no "
                "'checkpoint_factor' attribute (evaluations per checkpoint)"
            )
        self.n_batches_per_epoch = n_batches_per_epoch
        self.log_writer = log_writer
        self.checkpointer = checkpointer
        self.counter_unit = self.config.counter_unit
        self.evaluation_freq = self.config.evaluation_freq

        self.point_count = 0
        self.point_total = 0
        self.batch_count = 0
        self.batch_total = 0
        self.epoch_count = 0.0
        self.epoch_total = 0.0
        self.unit_count: float = 0.0
        self.unit_total: float = 0.0
        # Evaluations since the last checkpoint; compared with checkpoint_factor.
        self.trigger_count = 0

    def update(self, batch_size: int) -> None:
        """Records one more train batch of ``batch_size`` points.

        Args:
          batch_size: number of examples in the batch.
        """
        self.point_count += batch_size
        self.point_total += batch_size
        self.batch_count += 1
        self.batch_total += 1
        # Epochs are recomputed from batches (not accumulated) so no float error builds up.
        self.epoch_count = self.batch_count / self.n_batches_per_epoch
        self.epoch_total = self.batch_total / self.n_batches_per_epoch
        self._sync_units()

    def _sync_units(self) -> None:
        if self.counter_unit == "points":
            self.unit_count, self.unit_total = self.point_count, self.point_total
        elif self.counter_unit == "batches":
            self.unit_count, self.unit_total = self.batch_count, self.batch_total
        else:
            self.unit_count, self.unit_total = self.epoch_count, self.epoch_total

    def trigger_evaluation(self) -> bool:
        """Returns whether it is time to evaluate; if so, restarts the ``*_count`` counters.

        Returns:
          True when ``evaluation_freq`` ``counter_unit``s passed since the last evaluation.
        """
        satisfied = self.unit_count >= self.evaluation_freq
        if satisfied:
            self.trigger_count += 1
            self.reset()
        return satisfied

    def trigger_checkpointing(self) -> bool:
        """Returns whether it is time to checkpoint (always False without a checkpointer).

        Call it after ``trigger_evaluation``: it fires on every
        ``checkpointer.checkpoint_factor``-th evaluation.

        Returns:
          True when enough evaluations happened since the last checkpoint.
        """
        if self.checkpointer is None:
            return False
        satisfied = self.trigger_count >= self.checkpointer.checkpoint_factor
        if satisfied:
            self.trigger_count = 0
        return satisfied

    def reset(self) -> None:
        """Restarts the since-last-evaluation counters (``*_count``); totals are kept."""
        self.point_count = 0
        self.batch_count = 0
        self.epoch_count = 0.0
        self.unit_count = 0.0

    def cleanup(self, model: ModelT) -> ModelT:
        """Closes the writer and returns the best checkpointed model (else ``model``).

        As Snorkel: the writer's ``cleanup()`` runs (writing its log file), then the
        checkpointer's ``clear()`` if it has one, then ``load_best_model(model)``.

        Args:
          model: the model trained so far.

        Returns:
          ``checkpointer.load_best_model(model)`` with a checkpointer, else ``model``.
        """
        if self.log_writer is not None:
            self.log_writer.cleanup()
        if self.checkpointer is not None:
            clear = getattr(self.checkpointer, "clear", None)
            if clear is not None:
                clear()
            model = self.checkpointer.load_best_model(model)
        return model

    def close_after_failure(self, write_log: bool = True) -> None:
        """Closes the writer (writing what was logged) and the checkpointer (finishing
        pending saves, releasing its directory) after training failed.

        Never raises: each is closed even when the other fails, and an error while
        closing is logged, so the error that stopped training is the one that propagates.

        Args:
          write_log: False for a run that failed before it trained (a failed resume):
            the writer only releases its directory (its ``release()``, if it has one), so
            the log already there is kept.
        """
        closers = []
        if self.log_writer is not None:
            release = getattr(self.log_writer, "release", None)
            closer = self.log_writer.cleanup if write_log or release is None else release
            closers.append(("log writer", closer))
        close = getattr(self.checkpointer, "close", None)
        if close is not None:
            closers.append(("checkpointer", close))
        for name, closer in closers:
            try:
                closer()
            except Exception:
                logger.exception("Closing the %s after a failed fit raised too; the "
                                 "original error follows", name)

    @contextlib.contextmanager
    def closed_on_failure(self) -> Iterator[LogManager]:
        """A context that, on an error inside it, flushes what was logged and finishes
        pending checkpoint writes (``close_after_failure``) before the error propagates
        (the original one, even if closing fails)."""
        try:
            yield self
        except BaseException:
            self.close_after_failure()
            raise

    def write_metrics(self, metrics: Mapping[str, float]) -> None:
        """Writes every metric to the log writer (if any) at the current ``point_total``."""
        if self.log_writer is not None:
            for name, value in metrics.items():
                self.log_writer.add_scalar(name, value, self.point_total)

    def state_dict(self) -> dict[str, Any]:
        """Returns the counters (and the settings they depend on) as a JSON-serialisable dict.

        Returns:
          ``{"config": {...}, "n_batches_per_epoch": int, <counter>: number, ...}``.
        """
        state: dict[str, Any] = {name: getattr(self, name) for name in _COUNTERS}
        state["n_batches_per_epoch"] = self.n_batches_per_epoch
        state["config"] = dataclasses.asdict(self.config)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the counters from ``state_dict()`` output, for an exact resume.

        Args:
          state: a dict from ``state_dict``.

        Raises:
          ValueError: if counters are missing or the saved ``counter_unit``,
            ``evaluation_freq`` or ``n_batches_per_epoch`` differ from this manager's
            (the counts would then mean something else).
        """
        missing = sorted(set(_COUNTERS) - set(state))
        if missing:
            raise ValueError(f"LogManager.load_state_dict: missing counter(s) {missing}")
        saved_config = state.get("config")
        if saved_config is not None and saved_config != dataclasses.asdict(self.config):
            raise ValueError(
                f"LogManager.load_state_dict: saved config {saved_config} differs from "
                f"this manager's {dataclasses.asdict(self.config)}"
            )
        saved_batches = state.get("n_batches_per_epoch", self.n_batches_per_epoch)
        if saved_batches != self.n_batches_per_epoch:
            raise ValueError(
                f"LogManager.load_state_dict: saved n_batches_per_epoch {saved_batches} "
                f"differs from this manager's {self.n_batches_per_epoch}"
            )
        for name in _COUNTERS:
            setattr(self, name, state[name])
