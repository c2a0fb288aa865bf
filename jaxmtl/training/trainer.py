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
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from ..classifier import MultitaskClassifier
from ..compilation_cache import ensure_compilation_cache
from ..evaluation import loader_list
from ..loader import DictDataLoader
from ..parallel import check_balancer_parallel, choose_parallel
from . import preflight
from .accumulate import Accumulator, zero_loss_accumulator
from .batch_schedulers import make_batch_scheduler
from .checkpoint import Checkpointer
from .config import TrainerConfig, from_dict, merge_config
from .diagnostics import diagnostics_metrics
from .fit_checkpoints import checkpoint_run, make_checkpointer, resume_run
from .fit_setup import (
    CompiledFit,
    FitRun,
    check_dataloaders,
    compile_settings,
    fit_cache_key,
)
from .guards import DivergenceMonitor, InterruptGuard, all_finite, where
from .log_manager import LogManager
from .module_optimizers import check_module_names, uses_user_transformation
from .progress import EpochProgress, Metrics, train_loss_metrics
from .resume import continue_optimizer, load_optimizer_state, save_optimizer_state
from .runners import Runner, make_runner
from .step import TrainState
from .writers import make_log_writer

logger = logging.getLogger(__name__)


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
        self._compiled: dict[tuple, CompiledFit] = {}
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

    def fit(self, model: MultitaskClassifier,
            dataloaders: DictDataLoader | Sequence[DictDataLoader],
            resume_from: str | None = None) -> None:
        """Trains ``model`` on the loaders of the train split; evaluates on the valid split.

        Args:
          model: the classifier; initialised from the first train batch if needed.
          dataloaders: DictDataLoaders (a list, or one) whose ``dataset.split`` is the
            train, valid or test split.
          resume_from: a checkpoint directory (the ``checkpoint_dir`` of an earlier run),
            or "latest" for the configured one: training continues from the batch after
            its latest checkpoint, with the same parameters, optimizer state, PRNG key,
            batch order, counters and best-metric tracking, so the result equals an
            uninterrupted run's.
        """
        dataloaders = loader_list(dataloaders, "Trainer.fit")
        # The whole fit, set-up included, runs under one interrupt guard: a Ctrl-C is held
        # during each donating call, and one that Python dropped (raised inside a weakref
        # callback during set-up, say) is raised again at the next step.
        with InterruptGuard() as guard:
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
                # 2. the model gets the last completed step's weights (`state` read at exit);
                services.callback(lambda: self._hand_back(model, runner.host(state),
                                                          user_variables))
                # 1. on an error, the logs and pending checkpoint writes are closed.
                services.enter_context(log_manager.closed_on_failure())
                for epoch in range(start_epoch, self.config.n_epochs):
                    first = start_batch if epoch == start_epoch else 0
                    scheduled = self._scheduled(run, runner, scheduler, epoch, first)
                    with EpochProgress(epoch, run.n_batches_per_epoch, first,
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
                                    checkpointer, monitor, position, guard)
                            if progress.due():
                                self._show_progress(progress, runner.host(accumulator), run,
                                                    model, monitor, where(position))
                        with guard.critical():
                            state, accumulator = runner.flush(state, accumulator)
                        # Read at every epoch's end (one host sync an epoch): the running loss
                        # for the progress bar, and the divergence check.
                        self._show_progress(progress, runner.host(accumulator), run, model,
                                            monitor, f"the end of epoch {epoch}")
                monitor.check(all_finite(runner.host(state).params), "the end of training",
                              "the parameters")
            # A Ctrl-C now waits for the last checkpoint writes and the best model's load.
            with guard.critical():
                self._finish_run(model, log_manager, checkpointer)

    # --- set-up, evaluation and teardown of a fit -----------------------------------------
    def _set_up(self, model: MultitaskClassifier, dataloaders: Sequence[DictDataLoader]
                ) -> tuple[FitRun, TrainState, Accumulator]:
        """Checks the loaders, seeds them, builds (or reuses) the optimizer, LR schedule
        and balancer, initialises the model and returns the fresh state and accumulator."""
        config = self.config
        train_loaders = check_dataloaders(config, dataloaders)
        preflight.warn_unused_labels(model, dataloaders, config.train_split)
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
        cache_key = fit_cache_key(model, config, n_batches_per_epoch, self.parallel,
                                  train_loaders)
        compiled = self._compiled.get(cache_key)
        if compiled is None:
            compiled = compile_settings(config, model, n_batches_per_epoch)
        self.lr_schedule, self.warmup_steps = compiled.lr_schedule, compiled.warmup_steps
        run = FitRun(dataloaders, train_loaders, n_batches_per_epoch, cache_key, compiled)
        # Every module is created before the first step, each from the first loader
        # whose tasks use it (train loaders first), so a dataset needs only its own
        # tasks' inputs; the weights follow from the seed alone.
        init_loaders = [*train_loaders, *(dl for dl in dataloaders if dl not in train_loaders)]
        model_compiled = threading.Event()
        run = self._compile_while_initialising(model, run, init_loaders, model_compiled)
        try:
            model.init_from_loaders(init_loaders, fallback_seed=self.seed)
        finally:  # the steps' XLA compile waits for the model's: both at once, +75 MiB
            model_compiled.set()
        widths = preflight.check_labels_fit_heads(model, dataloaders)
        preflight.check_scalar_losses(model, dataloaders, widths)
        preflight.warn_single_task_steps(compiled.balancer, config.batch_scheduler, model,
                                         train_loaders)
        variables = model.variables if model.variables is not None else {"params": {}}
        check_module_names(config.module_optimizers, variables.get("params", {}))
        state = TrainState.create(variables, compiled.tx, jax.random.PRNGKey(self.seed),
                                  balancer=compiled.balancer, precision=config.precision)
        state, self._loaded_optimizer = continue_optimizer(state, self._loaded_optimizer), None
        accumulator = zero_loss_accumulator(len(train_loaders), len(model.task_names),
                                            config.log_task_gradients)
        return run, state, accumulator

    def _compile_while_initialising(self, model: MultitaskClassifier, run: FitRun,
                                    init_loaders: Sequence[DictDataLoader],
                                    model_compiled: threading.Event) -> FitRun:
        """``run`` with its runner, made from the shapes the state will have and already
        tracing the steps in a background thread, when this fit compiles ahead (first fit
        of these settings, one device, a runner that compiles ahead): the steps' trace and
        lowering overlap the model's initialisation, their XLA compile starts once
        ``model_compiled`` is set (peak memory). Otherwise ``run`` as it is (the runner is
        made after the set-up)."""
        config = self.config
        if not self._compiles_ahead(run) or self._loaded_optimizer is not None:
            return run
        try:
            variables = model.abstract_variables(init_loaders, fallback_seed=self.seed)
            if variables is None:
                return run
            state = TrainState.abstract(variables, run.compiled.tx,
                                        jax.random.PRNGKey(self.seed),
                                        run.compiled.balancer, config.precision)
        except Exception:  # the initialisation reports it, where it belongs
            logger.debug("no early compile: the state's shapes failed", exc_info=True)
            return run
        runner = self._make_runner(model, run, state)
        runner.start_compiling(state, runner.zero_accumulator(), after=model_compiled)
        return run._replace(runner=runner)

    def _open_logs(self, run: FitRun) -> tuple[LogManager, Checkpointer | None]:
        """The log writer (process 0 only), the checkpointer and the LogManager."""
        config = self.config
        primary = jax.process_index() == 0  # the one process that writes logs
        log_writer = make_log_writer(config.log_writer, config.log_writer_config) \
            if config.logging and primary else None
        checkpointer = make_checkpointer(config, log_writer) if config.checkpointing else None
        self.checkpoint_dir = None if checkpointer is None else checkpointer.checkpoint_dir
        self.metrics = {}
        return LogManager(run.n_batches_per_epoch, log_writer=log_writer,
                          checkpointer=checkpointer,
                          config=config.log_manager_config), checkpointer

    def _start_position(self, resume_from: str | None, model: MultitaskClassifier, run: FitRun,
                        state: TrainState, accumulator: Accumulator, log_manager: LogManager,
                        checkpointer: Checkpointer | None
                        ) -> tuple[TrainState, Accumulator, tuple[int, int]]:
        """The state, accumulator and (epoch, batch) to start from: the fresh ones at
        (0, 0), or a checkpoint's (``resume_from``); the run's config is logged."""
        position = (0, 0)
        if resume_from is not None:
            resumed = resume_run(resume_from, self.config, model, run.train_loaders, state,
                                 accumulator, log_manager, checkpointer)
            state, accumulator, position = resumed.state, resumed.accumulator, resumed.position
            self.seed, self.metrics = resumed.seed, resumed.metrics
        if log_manager.log_writer is not None:
            log_manager.log_writer.write_config(self.config)
        return state, accumulator, position

    def _make_runner(self, model: MultitaskClassifier, run: FitRun, state: TrainState
                     ) -> Runner:
        """The runner of ``config.steps_per_call``, with the programs of an earlier fit of
        the same model and settings (kept for the next one); the set-up's if it made one."""
        if run.runner is not None:
            return run.runner
        runner = make_runner(model.graph, self.parallel, state, run.train_loaders,
                             self.config.steps_per_call, run.compiled.steps,
                             compile_ahead=self._compiles_ahead(run),
                             diagnostics=self.config.log_task_gradients,
                             family_programs=not uses_user_transformation(self.config))
        self._compiled = {run.cache_key: run.compiled._replace(steps=runner.compiled)}
        return runner

    def _compiles_ahead(self, run: FitRun) -> bool:
        """Whether this fit compiles its steps in a background thread: the per-step
        runner's first fit of these settings on one device, not "mixed" (a mixed step
        takes one batch of every loader: its shapes are combinations)."""
        return (run.compiled.steps is None and self.config.steps_per_call == 1
                and self.config.batch_scheduler != "mixed" and self.parallel.mode == "single")

    def _scheduled(self, run: FitRun, runner: Runner, scheduler: Any, epoch: int,
                   first: int) -> Iterator[tuple[Any, int]]:
        """The epoch's ``(item, num_valid)`` from batch ``first`` on, in schedule order."""
        for dl in run.train_loaders:
            dl.set_epoch(epoch)
        scheduled = scheduler.get_batches(runner.scheduler_loaders, epoch)
        return runner.batches(itertools.islice(scheduled, first, None))

    def _evaluate_and_checkpoint(self, model: MultitaskClassifier, run: FitRun, runner: Runner,
                                 state: TrainState, accumulator: Accumulator,
                                 log_manager: LogManager, checkpointer: Checkpointer | None,
                                 monitor: DivergenceMonitor, position: tuple[int, int],
                                 guard: InterruptGuard) -> Accumulator:
        """Logs the train losses and valid metrics (``self.metrics``), checkpoints when
        due and the run is finite; returns the zeroed accumulator. A Ctrl-C during the
        checkpoint's save waits for it (Orbax cut mid-save leaves a temporary directory
        and prints its threads' errors); one during the evaluation stops at once."""
        host_state, accumulated = runner.host(state), runner.host(accumulator)
        finite = monitor.check_losses(accumulated["loss_sum"], where(position))
        model.variables = host_state.variables
        self.metrics = train_loss_metrics(accumulated, run.train_loaders, model.task_names,
                                          self.lr_schedule, int(host_state.step))
        self.metrics.update(diagnostics_metrics(accumulated, model.task_names))
        self.metrics.update(self._evaluate(model, run.dataloaders))
        log_manager.write_metrics(self.metrics)
        accumulator = runner.zero_accumulator()
        if log_manager.trigger_checkpointing() and finite and monitor.check(
                all_finite(host_state.params), where(position), "the parameters"):
            with guard.critical():
                checkpoint_run(checkpointer, model, host_state, runner.host(accumulator),
                               log_manager, run.train_loaders, position, self.seed,
                               self.metrics)
            monitor.last_checkpoint = f"{checkpointer.checkpoint_dir} at {where(position)}"
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

    # --- optimizer state -------------------------------------------------------------
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

        The next ``fit`` continues the loaded optimizer's moments (and Adam's
        bias-correction count) instead of a fresh optimizer's; its learning-rate schedule
        and step count start again. If ``model`` is None, uninitialised or its parameters
        do not match the saved optimizer state, only the config is restored and a warning
        says so.
        """
        params = None if model is None else model.params
        self.config, self._loaded_optimizer = load_optimizer_state(trainer_path, self.config,
                                                                   params)

    def _evaluate(self, model: MultitaskClassifier,
                  dataloaders: Sequence[DictDataLoader]) -> Metrics:
        valid = [dl for dl in dataloaders if dl.dataset.split == self.config.valid_split]
        return model.score(valid) if valid else {}

    def _show_progress(self, progress: EpochProgress, accumulated: Accumulator, run: FitRun,
                       model: MultitaskClassifier, monitor: DivergenceMonitor,
                       position: str) -> None:
        """Checks the running loss for divergence and shows it on the progress bar.

        Reading the running loss waits for the queued steps, so it runs at most once a
        second (and at the end of each epoch), never per step.
        """
        monitor.check_losses(accumulated["loss_sum"], position)
        progress.show_running_loss(accumulated, run.train_loaders, model.task_names,
                                   self.metrics)
