"""Trainer: Snorkel's training loop around one jitted, buffer-donating step.

``fit`` reads top to bottom: check loaders -> build schedule, optimizer and state ->
for each batch: step -> every k units: evaluate / log -> hand the weights back to the model.
Training losses accumulate on the device and are read back only when logged.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from ..classifier import MultitaskClassifier
from ..data import DictDataLoader
from ..model import ModelGraph
from .batch_schedulers import make_batch_scheduler
from .config import TrainerConfig, from_dict, merge_config
from .log_manager import LogManager
from .lr_schedules import make_lr_schedule
from .step import TrainState, make_optimizer, train_step
from .writers import make_log_writer

logger = logging.getLogger(__name__)

Metrics = dict[str, float]
PROGRESS_REFRESH_SECONDS = 1.0


def _zero_loss_accumulator(n_loaders: int, n_tasks: int) -> dict[str, jax.Array]:
    # Two distinct buffers: both are donated to the step.
    return {"loss_sum": jnp.zeros((n_loaders, n_tasks), jnp.float32),
            "count": jnp.zeros((n_loaders, n_tasks), jnp.float32)}


def fit_step(
    graph: ModelGraph,
    state: TrainState,
    accumulator: dict[str, jax.Array],
    X_dict: Mapping[str, jax.Array],
    Y_dict: Mapping[str, jax.Array],
    mask: jax.Array,
    loader_index: jax.Array,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """``train_step`` plus on-device accumulation of loss sums and counts.

    ``accumulator`` holds [n_loaders, n_tasks] loss sums and active counts; row
    ``loader_index`` collects this batch's terms, so logging needs no per-step host sync.
    """
    state, metrics = train_step(graph, state, X_dict, Y_dict, mask)
    loss_sum, count = accumulator["loss_sum"], accumulator["count"]
    for task_name, (task_sum, task_count) in metrics["terms"].items():
        column = graph.task_names.index(task_name)
        loss_sum = loss_sum.at[loader_index, column].add(task_sum)
        count = count.at[loader_index, column].add(task_count)
    return state, {"loss_sum": loss_sum, "count": count}


class Trainer:
    """Trains a MultitaskClassifier, with Snorkel's configuration and loop semantics.

    Args:
      name: optional name of this trainer.
      config: a TrainerConfig or a dict of its fields.
      **kwargs: TrainerConfig fields, merged over ``config`` (nested configs as dicts).

    Raises:
      ValueError: for unknown keys or values outside the allowed sets.

    Attributes:
      config: the TrainerConfig.
      warmup_steps: warm-up length in batches (known after ``fit`` starts).
      seed: the seed the last ``fit`` used.
      state: the TrainState (params, optimizer state, step, rng) after ``fit``.
    """

    def __init__(self, name: str | None = None, config: TrainerConfig | dict | None = None,
                 **kwargs: Any) -> None:
        self.config: TrainerConfig = merge_config(from_dict(TrainerConfig, config), kwargs)
        self.name = name if name is not None else type(self).__name__
        self.warmup_steps = 0
        self.seed: int | None = self.config.seed
        self.state: TrainState | None = None
        self.metrics: Metrics = {}

    def fit(self, model: MultitaskClassifier, dataloaders: Sequence[DictDataLoader]) -> None:
        """Trains ``model`` on the loaders of the train split; evaluates on the valid split.

        Args:
          model: the classifier; initialised from the first train batch if needed.
          dataloaders: DictDataLoaders whose ``dataset.split`` is the train, valid or
            test split.
        """
        config = self.config
        train_loaders = self._check_dataloaders(dataloaders)
        n_batches_per_epoch = sum(len(dl) for dl in train_loaders)
        self.seed = config.seed if config.seed is not None else int(
            np.random.SeedSequence().entropy % 2**31
        )
        self.lr_schedule, self.warmup_steps = make_lr_schedule(
            config.lr, config.lr_scheduler, config.lr_scheduler_config,
            n_batches_per_epoch, config.n_epochs,
        )
        tx = make_optimizer(config, self.lr_schedule)
        first_X, _ = train_loaders[0].batch_at(train_loaders[0].order(0), 0)
        variables = model._ensure_variables(first_X)
        state = TrainState.create(variables, tx, jax.random.PRNGKey(self.seed))

        log_writer = make_log_writer(config.log_writer, config.log_writer_config) \
            if config.logging else None
        if log_writer is not None:
            log_writer.write_config(config)
        log_manager = LogManager(n_batches_per_epoch, log_writer=log_writer,
                                 checkpointer=None, config=config.log_manager_config)
        batch_scheduler = make_batch_scheduler(config.batch_scheduler, self.seed)
        step = jax.jit(functools.partial(fit_step, model.graph), donate_argnums=(0, 1))
        loader_index = {id(dl): np.int32(i) for i, dl in enumerate(train_loaders)}
        task_names = set(model.task_names)
        accumulator = _zero_loss_accumulator(len(train_loaders), len(model.task_names))

        self.metrics = {}
        try:
            for epoch in range(config.n_epochs):
                for dl in train_loaders:
                    dl.set_epoch(epoch)
                progress = tqdm(
                    batch_scheduler.get_batches(train_loaders, epoch),
                    total=n_batches_per_epoch, disable=not config.progress_bar,
                    desc=f"Epoch {epoch}",
                )
                points, started, refreshed = 0, time.perf_counter(), time.perf_counter()
                for batch, dataloader in progress:
                    X_dict, Y_dict = batch
                    Y_dict = {k: v for k, v in Y_dict.items() if k in task_names}
                    state, accumulator = step(state, accumulator, X_dict, Y_dict, batch.mask,
                                              loader_index[id(dataloader)])
                    log_manager.update(batch.num_valid)
                    points += batch.num_valid
                    if log_manager.trigger_evaluation():
                        model.variables = state.variables
                        self.metrics = self._aggregate_losses(
                            accumulator, train_loaders, model.task_names, state)
                        self.metrics.update(self._evaluate(model, dataloaders))
                        self._log_metrics(log_writer, log_manager, self.metrics)
                        accumulator = _zero_loss_accumulator(*accumulator["count"].shape)
                    now = time.perf_counter()
                    if config.progress_bar and now - refreshed > PROGRESS_REFRESH_SECONDS:
                        refreshed = now
                        self._show_progress(progress, accumulator, train_loaders, model,
                                            state, points / (now - started))
                if config.progress_bar:
                    self._show_progress(progress, accumulator, train_loaders, model, state,
                                        points / (time.perf_counter() - started))
                    progress.close()
        finally:
            model.variables = state.variables
            self.state = state
            if log_writer is not None:
                log_writer.cleanup()
        log_manager.cleanup(model)

    def _check_dataloaders(self, dataloaders: Sequence[DictDataLoader]) -> list[DictDataLoader]:
        config = self.config
        all_splits = [config.train_split, config.valid_split, config.test_split]
        for dl in dataloaders:
            if not isinstance(dl, DictDataLoader):
                raise ValueError(f"Expected DictDataLoaders, got {type(dl).__name__}")
            if dl.dataset.split not in all_splits:
                raise ValueError(
                    f"Dataloader splits must be one of {all_splits}; dataset "
                    f"'{dl.dataset.name}' has split '{dl.dataset.split}'"
                )
        train_loaders = [dl for dl in dataloaders if dl.dataset.split == config.train_split]
        if not train_loaders:
            raise ValueError(
                f"Cannot find any dataloaders with split matching train split: "
                f"{config.train_split}."
            )
        return train_loaders

    def _evaluate(self, model: MultitaskClassifier,
                  dataloaders: Sequence[DictDataLoader]) -> Metrics:
        valid = [dl for dl in dataloaders if dl.dataset.split == self.config.valid_split]
        return model.score(valid) if valid else {}

    def _aggregate_losses(self, accumulator: dict[str, jax.Array],
                          train_loaders: Sequence[DictDataLoader], task_names: Sequence[str],
                          state: TrainState) -> Metrics:
        """Mean train loss per task and loader, overall, and the current learning rate."""
        loss_sum = np.asarray(accumulator["loss_sum"], dtype=np.float64)
        count = np.asarray(accumulator["count"], dtype=np.float64)
        metrics: Metrics = {}
        for i, dl in enumerate(train_loaders):
            for j, task_name in enumerate(task_names):
                if count[i, j] > 0:
                    key = "/".join([task_name, dl.dataset.name, dl.dataset.split, "loss"])
                    metrics[key] = float(loss_sum[i, j] / count[i, j])
        if count.sum() > 0:
            metrics["model/all/train/loss"] = float(loss_sum.sum() / count.sum())
        metrics["model/all/train/lr"] = float(self.lr_schedule(int(state.step)))
        return metrics

    def _show_progress(self, progress: tqdm, accumulator: dict[str, jax.Array],
                       train_loaders: Sequence[DictDataLoader], model: MultitaskClassifier,
                       state: TrainState, points_per_second: float) -> None:
        # Reading the running loss waits for the queued steps, so it runs at most once a
        # second (and at the end of each epoch), never per step.
        running = self._aggregate_losses(accumulator, train_loaders, model.task_names, state)
        progress.set_postfix(loss=running.get("model/all/train/loss", float("nan")),
                             points_per_s=round(points_per_second))

    def _log_metrics(self, log_writer: Any, log_manager: LogManager, metrics: Metrics) -> None:
        if log_writer is not None:
            for name, value in metrics.items():
                log_writer.add_scalar(name, value, log_manager.point_total)
