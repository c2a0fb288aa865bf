"""Checkpoints of a fit: where they go, what one records, and resuming from one.

``make_checkpointer`` places the ``Checkpointer`` (Snorkel's default: beside the logs);
``checkpoint_run`` writes the whole training state with the trainer's position (the batch
after the last one done), which ``resume_run`` restores, so that a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax

from ..loader import DictDataLoader
from .checkpoint import (
    DEFAULT_CHECKPOINT_DIR,
    Checkpointer,
    agree_run_name,
    resolve_checkpoint_dir,
)
from .config import TrainerConfig
from .log_manager import LogManager
from .resume import restore_training, train_tree
from .step import TrainState

if TYPE_CHECKING:
    from ..classifier import MultitaskClassifier

# The records keep the name of the Trainer's logger, where they were logged before.
logger = logging.getLogger("jaxmtl.training.trainer")


class Resumed(NamedTuple):
    """What ``resume_run`` restored: the training state and the trainer's position."""

    state: TrainState
    accumulator: dict[str, jax.Array]
    position: tuple[int, int]  # (epoch, batch in epoch) of the next batch
    seed: int
    metrics: dict[str, float]


def make_checkpointer(config: TrainerConfig, log_writer: Any) -> Checkpointer:
    """The fit's Checkpointer, in ``checkpointer_config.checkpoint_dir`` or, when that is
    None and logging is on, beside the logs of the run process 0's ``log_writer`` names."""
    run_name = None
    if config.checkpointer_config.checkpoint_dir is None and config.logging \
            and config.log_writer_config.run_name is None:
        # Snorkel's default: beside the logs, in the run named by process 0's writer.
        run_name = agree_run_name(log_writer.run_name if log_writer is not None else None)
    checkpoint_dir = resolve_checkpoint_dir(config.checkpointer_config.checkpoint_dir,
                                            config.logging, config.log_writer_config,
                                            run_name)
    manager_config = config.log_manager_config
    return Checkpointer(manager_config.counter_unit, manager_config.evaluation_freq,
                        config=config.checkpointer_config, checkpoint_dir=checkpoint_dir,
                        log_writer=log_writer)


def check_tracked_metrics(checkpointer: Checkpointer, metrics: dict[str, float]) -> None:
    """Raises if a tracked metric (``checkpoint_metric``, ``checkpoint_task_metrics``) is
    not among an evaluation's ``metrics``: a typo that would silently keep no best model
    (the Checkpointer alone, as Snorkel's, skips it).

    Raises:
      ValueError: naming the metric, the closest metric names and all of them.
    """
    for metric in checkpointer.checkpoint_task_metrics:
        if metric in metrics:
            continue
        field = ("checkpoint_metric" if metric in checkpointer.checkpoint_metric
                 else "checkpoint_task_metrics")
        close = difflib.get_close_matches(metric, list(metrics), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"CheckpointerConfig.{field}: '{metric}' is not among the metrics this "
            f"evaluation computed, so no best model would ever be kept{hint} "
            f"(metrics: {sorted(metrics)})")


def checkpoint_run(checkpointer: Checkpointer, model: MultitaskClassifier, state: TrainState,
                   accumulator: dict[str, jax.Array], log_manager: LogManager,
                   train_loaders: Sequence[DictDataLoader], position: tuple[int, int],
                   seed: int, metrics: dict[str, float]) -> None:
    """Checkpoints the model and the whole training state after batch ``position``.

    Args:
      checkpointer: the fit's Checkpointer.
      model: the classifier; it is given ``state``'s variables.
      state: the host TrainState.
      accumulator: the host loss accumulator.
      log_manager: the fit's LogManager (its counters are saved).
      train_loaders: the train loaders (their seeds are saved).
      position: (epoch, batches done in it).
      seed: the fit's seed.
      metrics: the metrics of this evaluation (the checkpoint metric among them).

    Raises:
      ValueError: if a tracked checkpoint metric is not in ``metrics`` (a typo).
    """
    check_tracked_metrics(checkpointer, metrics)
    epoch, next_batch = position
    if next_batch == log_manager.n_batches_per_epoch:
        epoch, next_batch = epoch + 1, 0
    trainer_meta = {
        "seed": seed,
        "epoch": epoch,
        "batch_in_epoch": next_batch,
        "task_names": model.task_names,
        "loader_seeds": [dl.seed for dl in train_loaders],
        "log_manager": log_manager.state_dict(),
        "metrics": metrics,
    }
    model.variables = state.variables
    checkpointer.checkpoint(log_manager.unit_total, model, metrics,
                            train_state=train_tree(state, accumulator),
                            trainer_meta=trainer_meta)


def resume_run(resume_from: str, config: TrainerConfig, model: MultitaskClassifier,
               train_loaders: Sequence[DictDataLoader], state: TrainState,
               accumulator: dict[str, jax.Array], log_manager: LogManager,
               checkpointer: Checkpointer | None) -> Resumed:
    """Restores a fit from its latest checkpoint in ``resume_from`` ("latest": the
    configured checkpoint directory); the loaders get their saved seeds, the model the
    restored variables, the LogManager its counters (and the log continues)."""
    root = resume_from
    if resume_from == "latest":
        root = checkpointer.checkpoint_dir if checkpointer is not None else (
            config.checkpointer_config.checkpoint_dir or DEFAULT_CHECKPOINT_DIR)
    try:
        state, accumulator, meta = restore_training(
            root, model.task_names, len(train_loaders), state, accumulator,
            n_epochs=config.n_epochs, n_batches_per_epoch=log_manager.n_batches_per_epoch)
        trainer_meta = meta["trainer"]
        log_manager.load_state_dict(trainer_meta["log_manager"])
        if log_manager.log_writer is not None:  # continue the resumed run's log
            log_manager.log_writer.continue_log(meta.get("log_dir"), log_manager.point_total)
        if checkpointer is not None:  # its best models, carried here if root is elsewhere
            checkpointer.resume(meta, root)
    except BaseException:
        # Release the directories; the resumed run's log stays as it was.
        log_manager.close_after_failure(write_log=False)
        raise
    seed = int(trainer_meta["seed"])
    for dl, loader_seed in zip(train_loaders, trainer_meta["loader_seeds"], strict=True):
        dl.seed = int(loader_seed)  # a loader built with seed=None drew another one
    metrics = dict(trainer_meta.get("metrics", {}))
    model.variables = state.variables
    position = int(trainer_meta["epoch"]), int(trainer_meta["batch_in_epoch"])
    logger.info("Resumed from %s at epoch %s, batch %s", root, *position)
    return Resumed(state, accumulator, position, seed, metrics)
