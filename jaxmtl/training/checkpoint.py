"""Checkpoints on Orbax: Snorkel's best-model-by-metric, plus exact resume.

Layout of ``checkpoint_dir``::

    checkpoints/<n>/        the latest ``max_to_keep`` checkpoints, n = 0, 1, 2, ...
        model/              the model's variables {collection: {module: ...}}
        train/              (from the Trainer) params, model_state, opt_state, step, rng,
                            loss accumulator: everything an exact resume needs
        meta/               JSON: iteration, unit, metrics, best metrics, trainer position
    best_model_<metric>/<n>/    the best checkpoint for each tracked metric ("/", ":" -> "_"):
        model/, meta/

One run owns the directory at a time: the writing process holds the lock file
``.jaxmtl-checkpoint.lock`` (pid, host) while it runs. A fresh run (not a resume) replaces an
earlier run's ``checkpoints/`` and ``best_model_*/`` when it writes its first checkpoint, so
runs never mix and a run never loads another run's best model. A run resumed from another
directory carries that run's best models into its own directory.

Each checkpoint is written by ``orbax.checkpoint.CheckpointManager``: into a temporary
directory that is renamed when complete, so a crash mid-save never leaves a checkpoint that
loads half-written. Arrays are copied to the host before an (asynchronous) save returns, so
training goes on while the files are written.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from .config import (
    CheckpointerConfig,
    LogWriterConfig,
    from_dict,
    merge_config,
    parse_metric_modes,
)
from .locks import DirectoryLock
from .orbax_io import (
    CheckpointError,
    ocp,
    open_manager,
)
from .run_files import run_directory, to_jsonable

logger = logging.getLogger(__name__)

PyTree = Any
Metrics = Mapping[str, float]
CHECKPOINTS_SUBDIR = "checkpoints"
DEFAULT_CHECKPOINT_DIR = "checkpoints"
BEST_MODEL_PREFIX = "best_model_"
CHECKPOINT_LOCK_FILE = ".jaxmtl-checkpoint.lock"


def run_entries(checkpoint_dir: str) -> list[str]:
    """Names of a run's entries in ``checkpoint_dir``: ``checkpoints`` and ``best_model_*``."""
    if not os.path.isdir(checkpoint_dir):
        return []
    return sorted(name for name in os.listdir(checkpoint_dir)
                  if name == CHECKPOINTS_SUBDIR or name.startswith(BEST_MODEL_PREFIX))


def resolve_checkpoint_dir(checkpoint_dir: str | None, logging_enabled: bool,
                           log_writer_config: LogWriterConfig | dict | None,
                           run_name: str | None) -> str:
    """The directory a run checkpoints into; the same on every process of a run.

    As Snorkel: the configured ``checkpoint_dir``; else, with logging, the run's log
    directory ``{log_dir}/{run_name}`` (computed from the config, so processes without a
    log writer get it too); else ``DEFAULT_CHECKPOINT_DIR``.

    Args:
      checkpoint_dir: ``CheckpointerConfig.checkpoint_dir``.
      logging_enabled: ``TrainerConfig.logging``.
      log_writer_config: ``TrainerConfig.log_writer_config``.
      run_name: the run name to use when the config has none (the default timestamp,
        agreed by all processes); ignored when the config names the run.

    Raises:
      ValueError: for an invalid ``run_name`` in the config, or when logging names no
        run at all.
    """
    if checkpoint_dir is not None:
        return checkpoint_dir
    if not logging_enabled:
        return DEFAULT_CHECKPOINT_DIR
    return run_directory(from_dict(LogWriterConfig, log_writer_config), run_name)


def agree_run_name(run_name: str | None, max_bytes: int = 1024) -> str | None:
    """Process 0's ``run_name`` on every process (a collective: all processes must call it).

    The default run name is a timestamp taken by process 0's log writer; the other
    processes have no writer and need the same name to find the checkpoints.
    """
    if jax.process_count() == 1:
        return run_name
    from jax.experimental import multihost_utils

    data = np.zeros(max_bytes + 1, np.uint8)  # [0]: 1 if there is a name
    if jax.process_index() == 0 and run_name is not None:
        encoded = run_name.encode()
        if len(encoded) > max_bytes:
            raise ValueError(f"run_name {run_name!r} is longer than {max_bytes} bytes")
        data[0], data[1:1 + len(encoded)] = 1, np.frombuffer(encoded, np.uint8)
    data = np.asarray(multihost_utils.broadcast_one_to_all(data))
    if not data[0]:
        return None
    return bytes(data[1:]).rstrip(b"\0").decode()


def _is_better(value: float, best: float, mode: str) -> bool:
    return value > best if mode == "max" else value < best


class Checkpointer:
    """Saves checkpoints and keeps the best model per metric (Snorkel's Checkpointer).

    Args:
      counter_unit: the LogManager's unit (points, batches or epochs).
      evaluation_freq: evaluations happen every this many units; checkpoints every
        ``evaluation_freq * checkpoint_factor``.
      checkpoint_dir, checkpoint_factor, checkpoint_metric, checkpoint_task_metrics,
        checkpoint_runway, checkpoint_clear: as ``CheckpointerConfig`` (Snorkel's).
        ``checkpoint_runway`` delays best-model tracking only: resume checkpoints are
        written from the start.
      config: a CheckpointerConfig or dict; explicit arguments override its fields.
      max_to_keep: number of resume checkpoints kept.
      async_save: write checkpoints in the background (Orbax async checkpointing).
      write: whether this process writes; by default only process 0 does (every process
        still tracks the best metrics, so all of them load the same best model).
      log_writer: the run's log writer, if any: flushed before each checkpoint, and its
        directory recorded, so that a resumed run continues its log.

    Raises:
      ValueError: for a negative runway, a non-positive checkpoint frequency, or a
        malformed metric ("task/dataset/split/metric:mode", mode "min" or "max").
      DirectoryLockedError: (writing process) if another live run holds
        ``checkpoint_dir``.
    """

    def __init__(self, counter_unit: str = "epochs", evaluation_freq: float = 1.0,
                 config: CheckpointerConfig | dict | None = None, max_to_keep: int = 2,
                 async_save: bool = True, write: bool | None = None, log_writer: Any = None,
                 **kwargs: Any) -> None:
        self.config = merge_config(from_dict(CheckpointerConfig, config), kwargs)
        self.checkpoint_factor = self.config.checkpoint_factor
        self.checkpoint_freq = evaluation_freq * self.checkpoint_factor
        if not self.checkpoint_freq or self.checkpoint_freq <= 0:
            raise ValueError(
                f"Invalid checkpoint freq {self.checkpoint_freq}, must be greater than 0."
            )
        self.checkpoint_unit = counter_unit
        self.checkpoint_dir = self.config.checkpoint_dir or DEFAULT_CHECKPOINT_DIR
        self.checkpoint_runway = self.config.checkpoint_runway
        self.checkpoint_clear = self.config.checkpoint_clear
        self.checkpoint_metric = parse_metric_modes([self.config.checkpoint_metric],
                                                    "CheckpointerConfig.checkpoint_metric")
        self.checkpoint_task_metrics = parse_metric_modes(
            self.config.checkpoint_task_metrics, "CheckpointerConfig.checkpoint_task_metrics")
        self.checkpoint_task_metrics.update(self.checkpoint_metric)
        self.max_to_keep = max_to_keep
        self.async_save = async_save
        self.write = jax.process_index() == 0 if write is None else write
        self.best_metric_dict: dict[str, float] = {}
        self.checkpoint_condition_met = False
        self.save_count = 0
        self.log_writer = log_writer
        self._managers: dict[str, ocp.CheckpointManager] = {}
        # False until this run owns the directory's run entries: a fresh run replaces the
        # earlier run's at its first save, a resumed run takes them over in ``resume``.
        self._run_started = False
        self._lock = DirectoryLock(self.checkpoint_dir, CHECKPOINT_LOCK_FILE, "checkpoint_dir")
        if self.write:
            self._lock.acquire()

    # --- saving ----------------------------------------------------------------------
    def _manager_for(self, subdir: str, max_to_keep: int | None) -> ocp.CheckpointManager:
        if subdir not in self._managers:
            path = os.path.join(self.checkpoint_dir, subdir)
            os.makedirs(path, exist_ok=True)
            self._managers[subdir] = open_manager(path, max_to_keep, self.async_save)
        return self._managers[subdir]

    def checkpoint(self, iteration: float, model: Any, metric_dict: Metrics,
                   train_state: PyTree | None = None,
                   trainer_meta: Mapping[str, Any] | None = None) -> None:
        """Saves a checkpoint at ``iteration`` units and updates the best models.

        Args:
          iteration: units trained so far (``LogManager.unit_total``).
          model: the classifier (its ``variables`` are saved).
          metric_dict: current metrics; tracked ones update the best models.
          train_state: (from the Trainer) the full training-state tree for resume.
          trainer_meta: (from the Trainer) JSON-able position and settings for resume.
        """
        if not isinstance(iteration, (int, float)):
            raise TypeError(f"Invalid iteration type {type(iteration)}, must be int or float.")
        tracking = iteration >= self.checkpoint_runway
        if tracking and not self.checkpoint_condition_met:
            self.checkpoint_condition_met = True
            logger.info("checkpoint_runway condition has been met. Start checkpointing.")
        if train_state is None and not tracking:
            return
        new_best = self._new_best(metric_dict) if tracking else set()
        variables = jax.device_get(model.variables)
        meta = {
            "iteration": iteration,
            "unit": self.checkpoint_unit,
            "metrics": to_jsonable(dict(metric_dict)),
            "best_metric_dict": dict(self.best_metric_dict),
            "checkpoint_condition_met": self.checkpoint_condition_met,
            "save_count": self.save_count + 1,
            "trainer": to_jsonable(dict(trainer_meta or {})),
        }
        self.save_count += 1
        if not self.write:
            return
        if not self._run_started:
            self._replace_earlier_run()
        if self.log_writer is not None:
            # The log on disk then holds every point up to this checkpoint.
            self.log_writer.flush()
            meta["log_dir"] = self.log_writer.log_dir
        items = {"model": ocp.args.StandardSave(variables), "meta": ocp.args.JsonSave(meta)}
        if train_state is not None:
            items["train"] = ocp.args.StandardSave(jax.device_get(train_state))
        step = self.save_count - 1
        self._save(CHECKPOINTS_SUBDIR, self.max_to_keep, step, items)
        for metric in sorted(new_best):
            self._save(self.best_subdir(metric), 1, step,
                       {"model": ocp.args.StandardSave(variables),
                        "meta": ocp.args.JsonSave(meta)})
            logger.info("Best model of %s at %s %s", metric, iteration, self.checkpoint_unit)

    def _save(self, subdir: str, max_to_keep: int | None, step: int,
              items: dict[str, Any]) -> None:
        manager = self._manager_for(subdir, max_to_keep)
        # Steps at or after this one were written by the interrupted run after the
        # checkpoint this run resumed from: this run writes them again.
        for later in [s for s in manager.all_steps() if s >= step]:
            manager.delete(later)
        if not manager.save(step, args=ocp.args.Composite(**items)):
            raise CheckpointError(
                f"{os.path.join(self.checkpoint_dir, subdir)}: Orbax declined to save "
                f"checkpoint {step} (existing steps {sorted(manager.all_steps())})"
            )

    def _replace_earlier_run(self) -> None:
        """Removes an earlier run's checkpoints and best models (a fresh run's first save)."""
        self._run_started = True
        earlier = run_entries(self.checkpoint_dir)
        if not earlier:
            return
        logger.info("checkpoint_dir %s holds an earlier run's %s: this new run replaces them",
                    self.checkpoint_dir, earlier)
        self._close_managers()
        for name in earlier:
            shutil.rmtree(os.path.join(self.checkpoint_dir, name))

    @staticmethod
    def best_subdir(metric: str) -> str:
        """Directory (under ``checkpoint_dir``) of the best model by ``metric``."""
        return f"best_model_{metric.replace('/', '_').replace(':', '_')}"

    def _new_best(self, metric_dict: Metrics) -> set[str]:
        improved = set()
        for metric, mode in self.checkpoint_task_metrics.items():
            if metric not in metric_dict:
                continue
            value = float(metric_dict[metric])
            if np.isnan(value):
                continue
            best = self.best_metric_dict.get(metric)
            if best is None or _is_better(value, best, mode):
                self.best_metric_dict[metric] = value
                improved.add(metric)
        return improved

    # --- loading and housekeeping --------------------------------------------------------
    def wait_until_finished(self) -> None:
        """Blocks until background saves are on disk."""
        for manager in self._managers.values():
            manager.wait_until_finished()

    def _close_managers(self) -> None:
        for manager in self._managers.values():
            manager.wait_until_finished()
            manager.close()
        self._managers.clear()

    def close(self) -> None:
        """Finishes pending saves, releases the managers and the directory's lock."""
        try:
            self._close_managers()
        finally:
            self._lock.release()

    def clear(self) -> None:
        """Removes the resume checkpoints, keeping the best models (if ``checkpoint_clear``)."""
        if not self.checkpoint_clear or not self.write:
            return
        manager = self._managers.pop(CHECKPOINTS_SUBDIR, None)
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
        shutil.rmtree(os.path.join(self.checkpoint_dir, CHECKPOINTS_SUBDIR), ignore_errors=True)

    def load_best_model(self, model: Any) -> Any:
        """Loads the best model by ``checkpoint_metric`` into ``model`` (``model.load``).

        The best model is the one tracked by this Checkpointer; one that has saved nothing
        yet (e.g. built in a new process over the same ``checkpoint_dir``) loads the best
        model on disk, into an uninitialised model too.

        Raises:
          CheckpointError: if there is no best model and ``model`` is uninitialised.
          ValueError: as ``model.load``, if the best model does not fit ``model``.
        """
        metric = next(iter(self.checkpoint_metric))
        directory = os.path.join(self.checkpoint_dir, self.best_subdir(metric))
        on_disk = self.save_count == 0 and os.path.isdir(directory)
        if metric not in self.best_metric_dict and not on_disk:
            if model.variables is None:
                raise CheckpointError(
                    f"No best model of {metric} in {directory}, and the model is "
                    f"uninitialised: there is nothing to load and no model to keep"
                )
            logger.info("No best model found for %s; keeping the current model.", metric)
            return model
        self.wait_until_finished()
        model.load(directory)
        return model

    def state_dict(self) -> dict[str, Any]:
        """JSON-able best-metric tracking state (restored on resume)."""
        return {"best_metric_dict": dict(self.best_metric_dict),
                "checkpoint_condition_met": self.checkpoint_condition_met,
                "save_count": self.save_count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores what ``state_dict`` returned."""
        self.best_metric_dict = {k: float(v) for k, v in state["best_metric_dict"].items()}
        self.checkpoint_condition_met = bool(state["checkpoint_condition_met"])
        self.save_count = int(state["save_count"])

    def resume(self, meta: Mapping[str, Any], source_dir: str) -> None:
        """Continues the run whose checkpoint (metadata ``meta``) was read from ``source_dir``.

        Restores the best-metric tracking. When ``source_dir`` is another directory, this
        directory's earlier run entries are replaced by that run's best models (those saved
        up to the resumed checkpoint), so the best model is found here at the end.

        Args:
          meta: the resumed checkpoint's metadata (``restore_checkpoint``'s second value).
          source_dir: the ``checkpoint_dir`` it was read from.
        """
        self.load_state_dict(meta)
        self._run_started = True
        same = os.path.realpath(source_dir) == os.path.realpath(self.checkpoint_dir)
        if not self.write or same:
            return
        earlier = run_entries(self.checkpoint_dir)
        if earlier:
            logger.info("checkpoint_dir %s holds an earlier run's %s: the resumed run "
                        "replaces them", self.checkpoint_dir, earlier)
            for name in earlier:
                shutil.rmtree(os.path.join(self.checkpoint_dir, name))
        resumed_step = self.save_count - 1
        for metric in self.best_metric_dict:
            source = os.path.join(source_dir, self.best_subdir(metric))
            steps = [int(name) for name in os.listdir(source) if name.isdigit()] \
                if os.path.isdir(source) else []
            kept = [step for step in steps if step <= resumed_step]
            if not kept:
                raise CheckpointError(
                    f"{source}: the resumed checkpoint tracks a best {metric} of "
                    f"{self.best_metric_dict[metric]}, but its best model is missing"
                )
            target = os.path.join(self.checkpoint_dir, self.best_subdir(metric), str(max(kept)))
            shutil.copytree(os.path.join(source, str(max(kept))), target)
            logger.info("Copied the best model of %s from %s to %s", metric, source, target)
