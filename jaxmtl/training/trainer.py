"""Trainer: Snorkel's training loop around one jitted, buffer-donating step.

``fit`` reads like a Flax ``train.py``: set up (loaders, seed, optimizer, model, state) ->
for each epoch, for each batch: ``state, accumulator = runner.step(state, accumulator,
item)`` -> every k units: evaluate / log / checkpoint -> hand the weights back to the
model. Training losses accumulate on the device and are read back only when logged.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from ..classifier import MultitaskClassifier
from ..compilation_cache import ensure_compilation_cache
from ..loader import DictDataLoader
from ..parallel import check_balancer_parallel, choose_parallel
from .accumulate import Accumulator, zero_loss_accumulator
from .balancers import Balancer, balancer_for_tasks
from .batch_schedulers import make_batch_scheduler
from .checkpoint import (
    DEFAULT_CHECKPOINT_DIR,
    Checkpointer,
    agree_run_name,
    resolve_checkpoint_dir,
)
from .config import TrainerConfig, from_dict, merge_config
from .diagnostics import diagnostics_metrics
from .guards import DivergenceMonitor, InterruptGuard, all_finite
from .log_manager import LogManager
from .lr_schedules import make_lr_schedule
from .module_optimizers import check_module_names, lr_schedule_for, uses_user_transformation
from .preflight import check_labels_fit_heads, warn_unused_labels
from .resume import (
    continue_optimizer,
    load_optimizer_state,
    restore_training,
    save_optimizer_state,
    train_tree,
)
from .runners import Runner, make_runner
from .step import TrainState, make_optimizer
from .writers import make_log_writer

logger = logging.getLogger(__name__)

Metrics = dict[str, float]
PROGRESS_REFRESH_SECONDS = 1.0


def _make_balancer(config: TrainerConfig, model: MultitaskClassifier) -> Balancer | None:
    """The configured balancer; None for "equal" with no settings (the plain summed loss)."""
    if not isinstance(config.balancer, str):
        return config.balancer
    if config.balancer == "equal" and not config.balancer_config:
        return None
    task_modules = {name: {op.module_name for op in ops}
                    for name, ops in model.op_sequences.items()}
    return balancer_for_tasks(config.balancer, config.balancer_config, task_modules)


class _Compiled(NamedTuple):
    """What a later ``fit`` of the same model and settings reuses: nothing is traced or
    compiled again."""

    tx: Any
    lr_schedule: Any
    warmup_steps: int
    balancer: Balancer | None
    steps: Any  # the runner's compiled programs; None before the first fit


class _Run(NamedTuple):
    """What ``fit``'s set-up decided; read by the loop and its helpers."""

    dataloaders: Sequence[DictDataLoader]
    train_loaders: list[DictDataLoader]
    n_batches_per_epoch: int
    cache_key: tuple
    compiled: _Compiled


class _EpochProgress:
    """The epoch's progress bar and throughput (points per second since its start)."""

    def __init__(self, epoch: int, total: int, initial: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, initial=initial, disable=not enabled,
                        desc=f"Epoch {epoch}")
        self.enabled, self.points = enabled, 0
        self.started = self.refreshed = time.perf_counter()

    def __enter__(self) -> _EpochProgress:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.bar.close()

    def advance(self, num_valid: int) -> None:
        """One batch (``num_valid`` real rows; 0 for a skipped one) is done."""
        self.bar.update(1)
        self.points += num_valid

    def due(self) -> bool:
        """Whether the bar is shown and was last refreshed over a second ago (reading the
        running loss waits for the queued steps: at most once a second, never per step)."""
        now = time.perf_counter()
        if not self.enabled or now - self.refreshed <= PROGRESS_REFRESH_SECONDS:
            return False
        self.refreshed = now
        return True

    def points_per_second(self) -> float:
        """Real rows trained per second since the epoch started."""
        return self.points / max(time.perf_counter() - self.started, 1e-9)


@contextlib.contextmanager
def _closed_on_failure(log_manager: LogManager) -> Iterator[LogManager]:
    """On an error: flush what was logged and finish pending checkpoint writes before
    failing (the original error propagates even if closing fails)."""
    try:
        yield log_manager
    except BaseException:
        log_manager.close_after_failure()
        raise


def _where(position: tuple[int, int]) -> str:
    """"epoch E, batch B" for messages (B counts from 1: the batches done)."""
    return f"epoch {position[0]}, batch {position[1]}"


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
      checkpoint_dir: where the last ``fit`` checkpointed (None without checkpointing).
    """

    def __init__(self, name: str | None = None, config: TrainerConfig | dict | None = None,
                 **kwargs: Any) -> None:
        self.config: TrainerConfig = merge_config(from_dict(TrainerConfig, config), kwargs)
        check_balancer_parallel(self.config.balancer, self.config.balancer_config,
                                self.config.parallel)
        self.name = name if name is not None else type(self).__name__
        self.warmup_steps = 0
        self.seed: int | None = self.config.seed
        self.state: TrainState | None = None
        self.metrics: Metrics = {}
        self.checkpoint_dir: str | None = None
        self._compiled: dict[tuple, _Compiled] = {}
        self._loaded_optimizer: dict[str, Any] | None = None
        ensure_compilation_cache()  # JAX's persistent cache, unless the user decided

    @property
    def loaded_optimizer(self) -> dict[str, Any] | None:
        """The optimizer state ``load`` restored, which the next ``fit`` continues from
        (``{"opt_state": ..., "step": ...}``); None when there is none."""
        return self._loaded_optimizer

    @property
    def compiled_steps(self) -> Any:
        """The compiled train programs of the last ``fit`` (reused by the next fit of the
        same model and settings): a ``runners.StepPrograms`` (``general`` and
        ``families``) or, with ``steps_per_call > 1``, a ``runners.FusedPrograms``
        (``by_layout``); None before any ``fit``."""
        return next((cached.steps for cached in self._compiled.values()), None)

    def compiled_programs(self) -> int:
        """How many train programs the last ``fit``'s steps compiled (0 before any)."""
        steps = self.compiled_steps
        return 0 if steps is None else steps.programs()

    def fit(self, model: MultitaskClassifier, dataloaders: Sequence[DictDataLoader],
            resume_from: str | None = None) -> None:
        """Trains ``model`` on the loaders of the train split; evaluates on the valid split.

        Args:
          model: the classifier; initialised from the first train batch if needed.
          dataloaders: DictDataLoaders whose ``dataset.split`` is the train, valid or
            test split.
          resume_from: a checkpoint directory (the ``checkpoint_dir`` of an earlier run),
            or "latest" for the configured one: training continues from the batch after
            its latest checkpoint, with the same parameters, optimizer state, PRNG key,
            batch order, counters and best-metric tracking, so the result equals an
            uninterrupted run's.
        """
        run, state, accumulator = self._set_up(model, dataloaders)
        log_manager, checkpointer = self._open_logs(run)
        state, accumulator, (start_epoch, start_batch) = self._start_position(
            resume_from, model, run, state, accumulator, log_manager, checkpointer)
        user_variables = state.variables  # never donated: the steps get their own copies
        runner = self._make_runner(model, run, state)
        scheduler = make_batch_scheduler(self.config.batch_scheduler, self.seed)
        monitor = DivergenceMonitor(self.config.on_nonfinite)
        state, accumulator = runner.prepare(state, accumulator)
        with contextlib.ExitStack() as services:  # closed last-in first-out:
            # 3. the model gets the last completed step's weights (`state` read at exit);
            services.callback(lambda: self._hand_back(model, runner.host(state),
                                                      user_variables))
            # 2. Ctrl-C is restored (inside, it never cuts a donating call in half);
            guard = services.enter_context(InterruptGuard())
            # 1. on an error, the logs and pending checkpoint writes are closed.
            services.enter_context(_closed_on_failure(log_manager))
            for epoch in range(start_epoch, self.config.n_epochs):
                first = start_batch if epoch == start_epoch else 0
                scheduled = self._scheduled(run, runner, scheduler, epoch, first)
                with _EpochProgress(epoch, run.n_batches_per_epoch, first,
                                    self.config.progress_bar) as progress:
                    for batch_index, (item, num_valid) in enumerate(scheduled, start=first):
                        with guard.critical():
                            state, accumulator = runner.step(state, accumulator, item)
                        progress.advance(num_valid)
                        if num_valid == 0:  # no labelled row: no step, no count (as Snorkel)
                            continue
                        log_manager.update(num_valid)
                        position = (epoch, batch_index + 1)
                        if log_manager.trigger_evaluation():
                            with guard.critical():
                                state, accumulator = runner.flush(state, accumulator)
                            accumulator = self._evaluate_and_checkpoint(
                                model, run, runner, state, accumulator, log_manager,
                                checkpointer, monitor, position)
                        if progress.due():
                            self._show_progress(progress, runner.host(accumulator), run,
                                                model, monitor, _where(position))
                    with guard.critical():
                        state, accumulator = runner.flush(state, accumulator)
                    # Read at every epoch's end (one host sync an epoch): the running loss
                    # for the progress bar, and the divergence check.
                    self._show_progress(progress, runner.host(accumulator), run, model,
                                        monitor, f"the end of epoch {epoch}")
            monitor.check(all_finite(runner.host(state).params), "the end of training",
                          "the parameters")
        self._finish_run(model, log_manager, checkpointer)

    # --- set-up, evaluation and teardown of a fit -----------------------------------------
    def _set_up(self, model: MultitaskClassifier, dataloaders: Sequence[DictDataLoader]
                ) -> tuple[_Run, TrainState, Accumulator]:
        """Checks the loaders, seeds them, builds (or reuses) the optimizer, LR schedule
        and balancer, initialises the model and returns the fresh state and accumulator."""
        config = self.config
        train_loaders = self._check_dataloaders(dataloaders)
        warn_unused_labels(model, dataloaders, config.train_split)
        # Steps per epoch do not depend on the scheduler's seed (known only after resume).
        n_batches_per_epoch = make_batch_scheduler(config.batch_scheduler, 0).epoch_length(
            train_loaders)
        self.seed = config.seed if config.seed is not None else int(
            np.random.SeedSequence().entropy % 2**31
        )
        for index, dl in enumerate(train_loaders):
            dl.derive_seed(self.seed, index)  # one seed makes the run reproducible
        self.parallel = choose_parallel(config.parallel, model.dataparallel, model.devices)
        # A later fit of the same model with the same settings reuses the optimizer and
        # the compiled step: nothing is traced or compiled again.
        cache_key = (model.graph, repr(config), n_batches_per_epoch, self.parallel,
                     tuple(dl.batch_size for dl in train_loaders),
                     tuple((dl.ragged_keys, tuple(dl.bucket_shapes)) for dl in train_loaders))
        compiled = self._compiled.get(cache_key)
        if compiled is None:
            lr_schedule, warmup_steps = make_lr_schedule(
                config.lr, config.lr_scheduler, config.lr_scheduler_config,
                n_batches_per_epoch, config.n_epochs,
            )
            compiled = _Compiled(make_optimizer(config, lr_schedule, lr_schedule_for(
                config, n_batches_per_epoch)), lr_schedule,
                                 warmup_steps, _make_balancer(config, model), None)
        self.lr_schedule, self.warmup_steps = compiled.lr_schedule, compiled.warmup_steps
        # Every module is created before the first step, each from the first loader
        # whose tasks use it (train loaders first), so a dataset needs only its own
        # tasks' inputs; the weights follow from the seed alone.
        model.init_from_loaders([*train_loaders, *(dl for dl in dataloaders
                                                   if dl not in train_loaders)],
                                fallback_seed=self.seed)
        check_labels_fit_heads(model, dataloaders)
        variables = model.variables if model.variables is not None else {"params": {}}
        check_module_names(config.module_optimizers, variables.get("params", {}))
        state = TrainState.create(variables, compiled.tx, jax.random.PRNGKey(self.seed),
                                  balancer=compiled.balancer, precision=config.precision)
        state, self._loaded_optimizer = continue_optimizer(state, self._loaded_optimizer), None
        accumulator = zero_loss_accumulator(len(train_loaders), len(model.task_names),
                                            config.log_task_gradients)
        run = _Run(dataloaders, train_loaders, n_batches_per_epoch, cache_key, compiled)
        return run, state, accumulator

    def _open_logs(self, run: _Run) -> tuple[LogManager, Checkpointer | None]:
        """The log writer (process 0 only), the checkpointer and the LogManager."""
        config = self.config
        primary = jax.process_index() == 0  # the one process that writes logs
        log_writer = make_log_writer(config.log_writer, config.log_writer_config) \
            if config.logging and primary else None
        checkpointer = self._make_checkpointer(log_writer) if config.checkpointing else None
        self.checkpoint_dir = None if checkpointer is None else checkpointer.checkpoint_dir
        self.metrics = {}
        return LogManager(run.n_batches_per_epoch, log_writer=log_writer,
                          checkpointer=checkpointer,
                          config=config.log_manager_config), checkpointer

    def _start_position(self, resume_from: str | None, model: MultitaskClassifier, run: _Run,
                        state: TrainState, accumulator: Accumulator, log_manager: LogManager,
                        checkpointer: Checkpointer | None
                        ) -> tuple[TrainState, Accumulator, tuple[int, int]]:
        """The state, accumulator and (epoch, batch) to start from: the fresh ones at
        (0, 0), or a checkpoint's (``resume_from``); the run's config is logged."""
        position = (0, 0)
        if resume_from is not None:
            state, accumulator, position = self._resume(
                resume_from, model, run.train_loaders, state, accumulator, log_manager,
                checkpointer)
        if log_manager.log_writer is not None:
            log_manager.log_writer.write_config(self.config)
        return state, accumulator, position

    def _make_runner(self, model: MultitaskClassifier, run: _Run, state: TrainState
                     ) -> Runner:
        """The runner of ``config.steps_per_call``, with the programs of an earlier fit of
        the same model and settings (kept for the next one)."""
        # A "mixed" step takes one batch of every loader: its shapes are combinations.
        runner = make_runner(model.graph, self.parallel, state, run.train_loaders,
                             self.config.steps_per_call, run.compiled.steps,
                             compile_ahead=self.config.batch_scheduler != "mixed",
                             diagnostics=self.config.log_task_gradients,
                             family_programs=not uses_user_transformation(self.config))
        self._compiled = {run.cache_key: run.compiled._replace(steps=runner.compiled)}
        return runner

    def _scheduled(self, run: _Run, runner: Runner, scheduler: Any, epoch: int,
                   first: int) -> Iterator[tuple[Any, int]]:
        """The epoch's ``(item, num_valid)`` from batch ``first`` on, in schedule order."""
        for dl in run.train_loaders:
            dl.set_epoch(epoch)
        scheduled = scheduler.get_batches(runner.scheduler_loaders, epoch)
        return runner.batches(itertools.islice(scheduled, first, None))

    def _evaluate_and_checkpoint(self, model: MultitaskClassifier, run: _Run, runner: Runner,
                                 state: TrainState, accumulator: Accumulator,
                                 log_manager: LogManager, checkpointer: Checkpointer | None,
                                 monitor: DivergenceMonitor, position: tuple[int, int]
                                 ) -> Accumulator:
        """Logs the train losses and valid metrics (``self.metrics``), checkpoints when
        due and the run is finite; returns the zeroed accumulator."""
        host_state, accumulated = runner.host(state), runner.host(accumulator)
        finite = monitor.check_losses(accumulated["loss_sum"], _where(position))
        model.variables = host_state.variables
        self.metrics = self._aggregate_losses(accumulated, run.train_loaders,
                                              model.task_names, host_state)
        self.metrics.update(diagnostics_metrics(accumulated, model.task_names))
        self.metrics.update(self._evaluate(model, run.dataloaders))
        self._log_metrics(log_manager.log_writer, log_manager, self.metrics)
        accumulator = runner.zero_accumulator()
        if log_manager.trigger_checkpointing() and finite and monitor.check(
                all_finite(host_state.params), _where(position), "the parameters"):
            self._checkpoint(checkpointer, model, host_state, runner.host(accumulator),
                             log_manager, run.train_loaders, position)
            monitor.last_checkpoint = f"{checkpointer.checkpoint_dir} at {_where(position)}"
        return accumulator

    def _finish_run(self, model: MultitaskClassifier, log_manager: LogManager,
                    checkpointer: Checkpointer | None) -> None:
        """After a successful fit: every process's checkpoints written, the log closed,
        the best checkpointed model loaded (if so configured), the checkpointer closed."""
        if checkpointer is not None and self.parallel.multiprocess:
            checkpointer.wait_until_finished()
            multihost_utils.sync_global_devices("jaxmtl: checkpoints written")
        log_manager.cleanup(model)
        if checkpointer is not None:
            checkpointer.close()

    def _hand_back(self, model: MultitaskClassifier, state: TrainState,
                   user_variables: Any) -> None:
        """Gives the model the last completed step's weights (the state's own buffers).

        Should the state ever hold donated (deleted) buffers, the model keeps the
        weights it had before ``fit`` instead of unreadable arrays.
        """
        if any(getattr(leaf, "is_deleted", lambda: False)() for leaf in jax.tree.leaves(state)):
            logger.warning("fit was interrupted inside a training step; the model keeps "
                           "the weights it had before fit")
            model.variables = user_variables
            return
        self.state = state
        model.variables = state.variables

    # --- checkpoints and resume ---------------------------------------------------------
    def _make_checkpointer(self, log_writer: Any) -> Checkpointer:
        config = self.config
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

    def _checkpoint(self, checkpointer: Checkpointer, model: MultitaskClassifier,
                    state: TrainState, accumulator: dict[str, jax.Array],
                    log_manager: LogManager, train_loaders: Sequence[DictDataLoader],
                    position: tuple[int, int]) -> None:
        epoch, next_batch = position
        if next_batch == log_manager.n_batches_per_epoch:
            epoch, next_batch = epoch + 1, 0
        trainer_meta = {
            "seed": self.seed,
            "epoch": epoch,
            "batch_in_epoch": next_batch,
            "task_names": model.task_names,
            "loader_seeds": [dl.seed for dl in train_loaders],
            "log_manager": log_manager.state_dict(),
            "metrics": self.metrics,
        }
        model.variables = state.variables
        checkpointer.checkpoint(log_manager.unit_total, model, self.metrics,
                                train_state=train_tree(state, accumulator),
                                trainer_meta=trainer_meta)

    def _resume(self, resume_from: str, model: MultitaskClassifier,
                train_loaders: Sequence[DictDataLoader], state: TrainState,
                accumulator: dict[str, jax.Array], log_manager: LogManager,
                checkpointer: Checkpointer | None
                ) -> tuple[TrainState, dict[str, jax.Array], tuple[int, int]]:
        root = resume_from
        if resume_from == "latest":
            root = checkpointer.checkpoint_dir if checkpointer is not None else (
                self.config.checkpointer_config.checkpoint_dir or DEFAULT_CHECKPOINT_DIR)
        try:
            state, accumulator, meta = restore_training(
                root, model.task_names, len(train_loaders), state, accumulator,
                n_epochs=self.config.n_epochs, n_batches_per_epoch=log_manager.n_batches_per_epoch)
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
        self.seed = int(trainer_meta["seed"])
        for dl, seed in zip(train_loaders, trainer_meta["loader_seeds"], strict=True):
            dl.seed = int(seed)  # a loader built with seed=None drew another one
        self.metrics = dict(trainer_meta.get("metrics", {}))
        model.variables = state.variables
        position = int(trainer_meta["epoch"]), int(trainer_meta["batch_in_epoch"])
        logger.info("Resumed from %s at epoch %s, batch %s", root, *position)
        return state, accumulator, position

    def save(self, trainer_path: str) -> None:
        """Saves the config and the optimizer state (an Orbax directory ``trainer_path``).

        Raises:
          ValueError: before any ``fit`` (there is no optimizer state yet).
        """
        if self.state is None:
            raise ValueError("Trainer.save: nothing to save before fit() has run")
        save_optimizer_state(trainer_path, self.state, self.config)

    def load(self, trainer_path: str, model: MultitaskClassifier | None) -> None:
        """Restores the config and, when it fits ``model``, the optimizer state.

        The next ``fit`` continues from the loaded optimizer state (moments and update
        count) instead of a fresh optimizer. If ``model`` is None, uninitialised or its
        parameters do not match the saved optimizer state, only the config is restored and
        a warning says so.
        """
        params = None if model is None else model.params
        self.config, self._loaded_optimizer = load_optimizer_state(trainer_path, self.config,
                                                                   params)

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
                          state: TrainState | None = None) -> Metrics:
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
        if state is not None:
            metrics["model/all/train/lr"] = float(self.lr_schedule(int(state.step)))
        return metrics

    def _show_progress(self, progress: _EpochProgress, accumulated: Accumulator, run: _Run,
                       model: MultitaskClassifier, monitor: DivergenceMonitor,
                       position: str) -> None:
        """Checks the running loss for divergence and shows it on the progress bar.

        Reading the running loss waits for the queued steps, so it runs at most once a
        second (and at the end of each epoch), never per step.
        """
        monitor.check_losses(accumulated["loss_sum"], position)
        if progress.bar.disable:
            return
        running = self._aggregate_losses(accumulated, run.train_loaders, model.task_names)
        # Right after an evaluation the accumulator is empty: show what it logged.
        loss = running.get("model/all/train/loss",
                           self.metrics.get("model/all/train/loss", float("nan")))
        progress.bar.set_postfix(loss=f"{loss:.4g}",
                                 points_per_s=round(progress.points_per_second()))

    def _log_metrics(self, log_writer: Any, log_manager: LogManager, metrics: Metrics) -> None:
        if log_writer is not None:
            for name, value in metrics.items():
                log_writer.add_scalar(name, value, log_manager.point_total)
