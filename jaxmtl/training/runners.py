"""How the Trainer's steps reach the device: one call per batch, or many per call.

The Trainer threads the state through a runner, as a Flax ``train.py`` threads it
through its jitted step::

    state, accumulator = runner.prepare(state, accumulator)    # own, replicated buffers
    for item, num_valid in runner.batches(scheduled):
        state, accumulator = runner.step(state, accumulator, item)
    state, accumulator = runner.flush(state, accumulator)       # before reading them
    host_state = runner.host(state)

Two siblings implement the ``Runner`` protocol and give the same results:

- ``PerStepRunner``: one jitted (or pmapped) step per batch, numpy batches sent to the
  devices one batch ahead of the step that needs them.
- ``FusedRunner`` (``TrainerConfig(steps_per_call=K)``, in ``fused.py``): the train
  datasets live on the device; the host sends only row indices, and one call runs K steps in a ``lax.scan``,
  each selecting its loader's computation with ``lax.switch``. A call cut short (before an
  evaluation, or at the end of an epoch) is filled with no-op steps (no active row), which
  leave the state unchanged, so every call has the same shapes and compiles once.

A runner holds placement and compiled programs, never the state. Batches without any
labelled row are dropped on the host (Snorkel skips them too), so the compiled step never
needs a select over the whole state to undo an update.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

from ..buckets import BucketShapes, bucket_widths, pad_to_longest, switches_bucket_shapes
from ..data import is_active
from ..loader import Batch, DictDataLoader
from ..model import ModelGraph
from ..parallel import DataParallel, call_signature, prefetch
from ..signatures import TaskFamily
from .accumulate import (
    Accumulator,
    fit_family_step,
    fit_group_step,
    fit_step,
    zero_loss_accumulator,
)
from .compile_ahead import abstract, compile_in_background
from .families import Route, family_routes, state_view, write_view_back
from .fused import FusedPrograms, FusedRunner, IndexBatch
from .state import own_buffers
from .step import TrainState

__all__ = ["FusedPrograms", "FusedRunner", "IndexBatch", "PerStepRunner", "Runner",
           "StepPrograms", "family_routes", "fit_step", "make_runner", "own_buffers",
           "zero_loss_accumulator"]


@runtime_checkable
class Runner(Protocol):
    """What the Trainer's loop calls; the state and accumulator pass through, visibly.

    Attributes:
      scheduler_loaders: what the batch scheduler iterates (the loaders, or stand-ins).
      compiled: the compiled programs, kept by the Trainer across ``fit`` calls (a
        ``StepPrograms`` or ``FusedPrograms``, with ``programs() -> int``).
    """

    scheduler_loaders: Sequence[Any]
    compiled: Any

    def prepare(self, state: TrainState, accumulator: Accumulator
                ) -> tuple[TrainState, Accumulator]:
        """The state and accumulator on the devices, in buffers the steps may donate."""

    def start_compiling(self, state: TrainState, accumulator: Accumulator,
                        after: threading.Event | None = None) -> None:
        """Starts compiling the coming steps in the background, if the runner does
        (``state`` may hold ``jax.ShapeDtypeStruct`` leaves; XLA's compile waits for
        ``after`` if given); at most once."""

    def batches(self, scheduled: Iterator[tuple[Any, Any]]) -> Iterator[tuple[Any, int]]:
        """Wraps the scheduler's ``(batch, loader)`` pairs: yields ``(item, num_valid)``
        (``num_valid`` is 0 for a batch without any labelled row: no step, no count)."""

    def step(self, state: TrainState, accumulator: Accumulator, item: Any
             ) -> tuple[TrainState, Accumulator]:
        """Runs (or queues) the item's step."""

    def flush(self, state: TrainState, accumulator: Accumulator
              ) -> tuple[TrainState, Accumulator]:
        """Runs any queued steps: the results are then current."""

    def zero_accumulator(self) -> Accumulator:
        """A zero loss accumulator, placed as ``prepare`` places it."""

    def host(self, tree: Any) -> Any:
        """One copy of a placed tree (the first device's under pmap)."""


class StepPrograms:
    """The per-step runner's compiled steps, kept by the Trainer across ``fit`` calls.

    ``general`` runs any batch group (one program per task set and batch signature);
    ``families`` holds one step per task family (one program per batch signature), run
    on the member's view of the state (its size does not grow with the members);
    ``switched`` the same two for loaders with several bucket shapes, by their shapes
    (``buckets.at_bucket_shape``: one program for all of a loader's shapes).
    """

    def __init__(self, graph: ModelGraph, parallel: DataParallel) -> None:
        self.graph, self.parallel = graph, parallel
        self.general = parallel.compile(
            functools.partial(fit_group_step, graph, axis_name=parallel.axis_name),
            donate_argnums=(0, 1))
        self.families: dict[TaskFamily, Any] = {}
        self.switched: dict[tuple[TaskFamily | None, BucketShapes], Any] = {}

    def programs(self) -> int:
        """How many train programs have been compiled (one per task set or family and
        batch signature that ran); jit's own cache size, so single and sharded modes."""
        return sum(program._cache_size() for program in (
            self.general, *self.families.values(), *self.switched.values()))

    def family(self, family: TaskFamily) -> Any:
        """The compiled ``fit_family_step`` of ``family``."""
        if family not in self.families:
            self.families[family] = self.parallel.compile(
                functools.partial(fit_family_step, self.graph, family,
                                  axis_name=self.parallel.axis_name, in_view=True),
                donate_argnums=(0, 1))
        return self.families[family]

    def switched_step(self, family: TaskFamily | None, shapes: BucketShapes) -> Any:
        """The compiled step for batches of ``shapes`` (a loader's ``bucket_widths``) at
        the longest, with the shape index: ``fit_group_step`` (``family`` None) or
        ``fit_family_step`` on the member's view, with ``shapes`` bound."""
        key = (family, shapes)
        if key not in self.switched:
            axis_name = self.parallel.axis_name
            fn = (functools.partial(fit_group_step, self.graph, axis_name=axis_name,
                                    shapes=shapes) if family is None else
                  functools.partial(fit_family_step, self.graph, family,
                                    axis_name=axis_name, in_view=True, shapes=shapes))
            self.switched[key] = self.parallel.compile(fn, donate_argnums=(0, 1))
        return self.switched[key]


class PerStepRunner:
    """One device call per batch (jit, pmap or sharded jit, as ``parallel`` says).

    A loader whose batches carry one task of a ``TaskFamily`` steps through the family's
    program (one for all members); other batches, "mixed" groups and balanced training
    use the general step, one program per task set.

    Args:
      graph: the task graph.
      parallel: the device placement.
      state: a state of the run (read for its structure, balancer and optimizer only).
      train_loaders: the train loaders, in the accumulator's row order.
      compiled: the ``StepPrograms`` of an earlier fit of the same model and settings.
      compile_ahead: compile the step of every bucket shape of the loaders in a
        background thread from ``prepare`` on (for schedules of one loader's batch per
        step; single device), instead of stalling at each shape's first batch.
      diagnostics: the accumulator carries the interference diagnostics
        (``TrainerConfig.log_task_gradients``): every batch takes the general step.
    """

    #: False forces one program per task set (the reference the family steps must equal).
    share_family_programs = True
    #: False compiles one program per bucket shape of a loader (the reference the switched
    #: program, ``buckets.at_bucket_shape``, must equal).
    switch_bucket_shapes = True

    def __init__(self, graph: ModelGraph, parallel: DataParallel, state: TrainState,
                 train_loaders: Sequence[DictDataLoader],
                 compiled: StepPrograms | None = None, compile_ahead: bool = False,
                 diagnostics: bool = False, family_programs: bool = True) -> None:
        self.parallel = parallel
        # (Programs of an earlier fit are compiled already.)
        self.compile_ahead = compile_ahead and parallel.mode == "single" and compiled is None
        self._compiling = False
        self.n_accumulator = (len(train_loaders), len(graph.task_names), diagnostics)
        self.compiled = compiled or StepPrograms(graph, parallel)
        self.scheduler_loaders = list(train_loaders)
        self._loader_index = {id(dl): parallel.per_device(np.int32(i))
                              for i, dl in enumerate(train_loaders)}
        self._task_names = set(graph.task_names)
        self._modules = set(state.params)
        routes = family_routes(graph, state, train_loaders, diagnostics,
                               family_programs and self.share_family_programs)
        # A loader with several bucket shapes steps through one switched program (the
        # interference diagnostics want each batch at its own shape).
        self._shapes = {id(dl): bucket_widths(dl) for dl in train_loaders
                        if switches_bucket_shapes(parallel, len(dl.bucket_shapes))
                        and not diagnostics and self.switch_bucket_shapes}
        self._routes = {
            key: route._replace(
                program=(self.compiled.switched_step(route.family, self._shapes[key])
                         if key in self._shapes else self.compiled.family(route.family)),
                member=parallel.per_device(np.int32(route.member)))
            for key, route in routes.items()}
        # Loader id -> the switched general program of a loader without a family route.
        self._switched_general = {key: self.compiled.switched_step(None, shapes)
                                  for key, shapes in self._shapes.items() if key not in routes}
        # XLA:CPU runs each device's part of a collective on a shared thread pool; with
        # many steps queued, parts of different steps can hold every thread and wait for
        # each other forever (an all-reduce rendezvous timeout). There, a step starts only
        # when the previous one is done.
        self._wait_for_previous_step = (parallel.mode != "single"
                                        and parallel.devices[0].platform == "cpu")

    def prepare(self, state: TrainState, accumulator: Accumulator
                ) -> tuple[TrainState, Accumulator]:
        """Own copies of the state's buffers, replicated as ``parallel`` says."""
        state = self.parallel.replicate(own_buffers(state))
        accumulator = self.parallel.replicate(accumulator)
        self.start_compiling(state, accumulator)
        return state, accumulator

    def start_compiling(self, state: TrainState, accumulator: Accumulator,
                        after: threading.Event | None = None) -> None:
        """With ``compile_ahead``, starts compiling every program the loaders' batches
        need in a background thread; once per runner (``prepare`` calls it too).

        ``state`` may be the placed state or its shapes (``jax.ShapeDtypeStruct``
        leaves, e.g. from ``jax.eval_shape``): the Trainer starts the steps' trace and
        lowering before the model is initialised, so the two overlap, and their XLA
        compile ``after`` the model's (``compile_in_background``).
        """
        if self.compile_ahead and not self._compiling:
            self._compiling = True
            compile_in_background(self._bucket_jobs(state, accumulator), after=after)

    def _bucket_jobs(self, state: TrainState, accumulator: Accumulator) -> list[tuple]:
        """``(program, abstract args)`` of every program the loaders' batch shapes need.

        All of them, the first batch's included: the loop's first call waits for the
        compile in flight instead of starting its own, and the programs of the other
        loaders and shapes compile meanwhile. Loaders that share a program (a task
        family) give one job.
        """
        jobs, seen = [], set()
        placement = jax.sharding.SingleDeviceSharding(self.parallel.devices[0])
        for dl in self.scheduler_loaders:
            switched = id(dl) in self._shapes
            # A switched loader's one program takes every batch at its longest shape.
            for shape in [len(dl.bucket_shapes) - 1] if switched else range(
                    len(dl.bucket_shapes)):
                batch = dl.example_batch(shape)
                route = self._routes.get(id(dl))
                loader_index = self._loader_index[id(dl)]
                extra = {"shape": np.int32(shape)} if switched else {}
                if route is None:
                    program = self._switched_general.get(id(dl), self.compiled.general)
                    args = abstract((state, accumulator, (self._put(batch),),
                                     (loader_index,)), placement)
                else:
                    program = route.program
                    args = abstract((state_view(state, route.view, self._modules), accumulator,
                                     *self._put_member(batch, route), route.member,
                                     loader_index), placement)
                key = (id(program), call_signature(args))
                if key not in seen:
                    seen.add(key)
                    jobs.append((program, args, abstract(extra)))
        return jobs

    def batches(self, scheduled: Iterator[tuple[Any, Any]]) -> Iterator[tuple[Any, int]]:
        """The scheduler's batches on the devices, one batch ahead: ``(item, num_valid)``."""
        for item in prefetch(scheduled, self._to_devices):
            yield item, item[1]

    def step(self, state: TrainState, accumulator: Accumulator, item: tuple[Any, int, Any]
             ) -> tuple[TrainState, Accumulator]:
        """One step on the item's batches (none for a batch without labelled rows)."""
        device_batches, _, loader_indices, switched = item
        if device_batches is None:
            return state, accumulator
        if self._wait_for_previous_step:
            jax.block_until_ready(state.step)
        # ``switched``: (program, shape index) of a loader with several bucket shapes.
        shape = {} if switched is None else {"shape": switched[1]}
        if not isinstance(loader_indices[0], Route):
            program = self.compiled.general if switched is None else switched[0]
            return program(state, accumulator, device_batches, loader_indices, **shape)
        route, loader_index = loader_indices
        # The step sees only the member's modules; the others are not even passed.
        view_state, accumulator = route.program(
            state_view(state, route.view, self._modules), accumulator, *device_batches,
            route.member, loader_index, **shape)
        return write_view_back(state, view_state, route.view, self._modules), accumulator

    def flush(self, state: TrainState, accumulator: Accumulator
              ) -> tuple[TrainState, Accumulator]:
        """Nothing is queued: the state and accumulator as they are."""
        return state, accumulator

    def zero_accumulator(self) -> Accumulator:
        """A zero loss accumulator, replicated."""
        return self.parallel.replicate(zero_loss_accumulator(*self.n_accumulator))

    def host(self, tree: Any) -> Any:
        """One copy of a replicated tree (the first device's under pmap)."""
        return self.parallel.unreplicate(tree)

    def _to_devices(self, item: tuple[Any, Any]) -> tuple[Any, int, Any, Any]:
        batches, dataloaders = item
        switched = None
        route = None if isinstance(dataloaders, tuple) else self._routes.get(id(dataloaders))
        if not isinstance(dataloaders, tuple) and id(dataloaders) in self._shapes:
            X_dict, shape = pad_to_longest(batches[0], dataloaders)
            batches = Batch(X_dict, batches[1], batches.mask)
            program = route.program if route is not None else \
                self._switched_general[id(dataloaders)]
            switched = (program, np.int32(shape))
        if route is not None:
            return self._family_to_devices(batches, dataloaders, route, switched)
        if not isinstance(dataloaders, tuple):  # one batch per step, else a "mixed" group
            batches, dataloaders = (batches,), (dataloaders,)
        device_batches, num_valid, active = [], 0, False
        for batch in batches:
            active = active or any(is_active(y[batch.mask]).any()
                                   for k, y in batch[1].items() if k in self._task_names)
            device_batches.append(self._put(batch))
            num_valid += batch.num_valid
        if not active:  # nothing to learn from: no step, as Snorkel skips it
            return None, 0, None, None
        loader_indices = tuple(self._loader_index[id(dl)] for dl in dataloaders)
        return tuple(device_batches), num_valid, loader_indices, switched

    def _family_to_devices(self, batch: Any, dataloader: DictDataLoader, route: Route,
                           switched: Any) -> tuple[Any, int, Any, Any]:
        if not is_active(batch[1][route.task][batch.mask]).any():
            return None, 0, None, None
        return self._put_member(batch, route), batch.num_valid, (
            route, self._loader_index[id(dataloader)]), switched

    def _put(self, batch: Any) -> tuple:
        """``(X, Y, mask)`` on the devices, Y cut to the model's tasks (general step)."""
        X_dict, Y_dict = batch
        return self.parallel.put_batch(
            X_dict, {k: v for k, v in Y_dict.items() if k in self._task_names}, batch.mask)

    def _put_member(self, batch: Any, route: Route) -> tuple:
        """``(X, labels, mask)`` on the devices for a family step."""
        X_dict, Y_dict = batch
        if route.input_keys is not None:  # every member's batch has the same X keys
            X_dict = {key: X_dict[key] for key in route.input_keys if key in X_dict}
        X, Y, mask = self.parallel.put_batch(X_dict, {"labels": Y_dict[route.task]},
                                             batch.mask)
        return X, Y["labels"], mask


def make_runner(graph: ModelGraph, parallel: DataParallel, state: TrainState,
                train_loaders: Sequence[DictDataLoader], steps_per_call: int = 1,
                compiled: Any = None, compile_ahead: bool = False,
                diagnostics: bool = False, family_programs: bool = True) -> Runner:
    """The ``FusedRunner`` for ``steps_per_call > 1``, else the ``PerStepRunner``.

    ``compiled`` (an earlier runner's ``compiled``) is reused only when it is of the
    kind the runner keeps; ``compile_ahead`` as ``PerStepRunner``'s (the fused runner
    compiles one program); ``diagnostics``: the accumulator carries the interference
    diagnostics (``TrainerConfig.log_task_gradients``); ``family_programs``: False makes
    every loader of a task family step through the general program (``family_routes``).
    """
    if steps_per_call > 1:
        return FusedRunner(graph, parallel, state, train_loaders, steps_per_call,
                           compiled if isinstance(compiled, FusedPrograms) else None,
                           diagnostics,
                           family_programs and PerStepRunner.share_family_programs)
    return PerStepRunner(graph, parallel, state, train_loaders,
                         compiled if isinstance(compiled, StepPrograms) else None,
                         compile_ahead, diagnostics, family_programs)


