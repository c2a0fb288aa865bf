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
- ``FusedRunner`` (``TrainerConfig(steps_per_call=K)``): the train datasets live on the
  device; the host sends only row indices, and one call runs K steps in a ``lax.scan``,
  each selecting its loader's computation with ``lax.switch``. A call cut short (before an
  evaluation, or at the end of an epoch) is filled with no-op steps (no active row), which
  leave the state unchanged, so every call has the same shapes and compiles once.

A runner holds placement and compiled programs, never the state. Batches without any
labelled row are dropped on the host (Snorkel skips them too), so the compiled step never
needs a select over the whole state to undo an update.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import numpy as np

from ..data import is_active, mask_key
from ..loader import DictDataLoader
from ..model import ModelGraph
from ..parallel import DataParallel, prefetch
from ..signatures import (
    TaskFamily,
    family_of,
    task_families,
    view_modules,
    view_of,
    view_variables,
    write_back,
    write_back_variables,
)
from .accumulate import (
    Accumulator,
    FusedGroup,
    fit_family_step,
    fit_group_step,
    fit_step,
    fused_steps,
    zero_loss_accumulator,
)
from .compile_ahead import abstract, compile_in_background
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


def own_buffers(tree: Any) -> Any:
    """A copy of every array of ``tree``: buffers the step may donate.

    The step donates its state; without the copy it would delete arrays the caller still
    holds (the dict ``model.init`` returned, a ``model.params`` taken before ``fit``).
    """
    leaves, treedef = jax.tree.flatten(tree)
    arrays = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array)]
    # A device-to-device copy: no program to compile (jnp.copy would compile per shape).
    copies = jax.device_put([leaves[i] for i in arrays], may_alias=False)
    for i, copy in zip(arrays, copies, strict=True):
        leaves[i] = copy
    return jax.tree.unflatten(treedef, leaves)


class StepPrograms:
    """The per-step runner's compiled steps, kept by the Trainer across ``fit`` calls.

    ``general`` runs any batch group (one program per task set and batch signature);
    ``families`` holds one step per task family (one program per batch signature), run
    on the member's view of the state (its size does not grow with the members).
    """

    def __init__(self, graph: ModelGraph, parallel: DataParallel) -> None:
        self.graph, self.parallel = graph, parallel
        self.general = parallel.compile(
            functools.partial(fit_group_step, graph, axis_name=parallel.axis_name),
            donate_argnums=(0, 1))
        self.families: dict[TaskFamily, Any] = {}

    def programs(self) -> int:
        """How many train programs have been compiled (one per task set or family and
        batch signature that ran); jit's own cache size, so single and sharded modes."""
        return sum(program._cache_size()
                   for program in (self.general, *self.families.values()))

    def family(self, family: TaskFamily) -> Any:
        """The compiled ``fit_family_step`` of ``family``."""
        if family not in self.families:
            self.families[family] = self.parallel.compile(
                functools.partial(fit_family_step, self.graph, family,
                                  axis_name=self.parallel.axis_name, in_view=True),
                donate_argnums=(0, 1))
        return self.families[family]


class _Route(NamedTuple):
    """How a loader's batches reach a family step."""

    family: TaskFamily
    task: str
    input_keys: tuple[str, ...] | None
    member: int
    view: dict[str, str]
    program: Any = None


def _state_view(state: TrainState, view: dict[str, str], modules: set[str]) -> TrainState:
    """The member's view of the state: the modules its task runs, under the
    representative's names (``signatures.view_of``)."""
    return state.replace(params=view_of(state.params, view, modules),
                         opt_state=view_of(state.opt_state, view, modules),
                         model_state=view_variables(state.model_state, view))


def _write_view_back(state: TrainState, view_state: TrainState, view: dict[str, str],
                     modules: set[str]) -> TrainState:
    """``state`` with the member's updated view written back under the member's names."""
    return view_state.replace(
        params=write_back(state.params, view_state.params, view, modules),
        opt_state=write_back(state.opt_state, view_state.opt_state, view, modules),
        model_state=write_back_variables(state.model_state, view_state.model_state, view))


def _views_fit(state: TrainState, family: TaskFamily, graph: ModelGraph) -> bool:
    """Whether the optimizer sees each member's view as it sees the whole model.

    Optimizers that act leaf by leaf (all of jaxmtl's; clipping by the global norm sees
    the same norm, the other modules' gradients being zero) give the view the state
    ``view_of`` cuts from the full one; a user transformation that labels or masks
    modules by name may not, and its family then trains through the general step. (The
    structures can agree where the transformation keeps no state for the modules it tells
    apart, e.g. ``set_to_zero``; so the Trainer sends families to the general step whenever
    a user's transformation is configured: ``family_routes(shared=False)``.)
    """
    modules = set(state.params)
    # Every member's view has the representative's keys, so the optimizer's own state
    # for a view has one structure: traced once, compared with each member's cut.
    expected = jax.tree.structure(jax.eval_shape(
        state.tx.init, view_of(state.params, view_modules(graph, family, 0), modules)))
    return all(
        jax.tree.structure(view_of(state.opt_state, view_modules(graph, family, member),
                                   modules)) == expected
        for member in range(len(family.tasks)))


def family_routes(graph: ModelGraph, state: TrainState,
                  train_loaders: Sequence[DictDataLoader],
                  diagnostics: bool = False, shared: bool = True) -> dict[int, _Route]:
    """Loader id -> its family route, for loaders that label one task of a family.

    Empty with a balancer or interference diagnostics (they need the general step), when
    ``shared`` is False (a user's optax transformation, which may tell modules apart by
    name: a member's view renames them) or ``PerStepRunner.share_family_programs`` is False.
    """
    if (not shared or not PerStepRunner.share_family_programs or state.balancer is not None
            or diagnostics):
        return {}
    families = task_families(graph, state.variables)
    fits: dict[TaskFamily, bool] = {}
    routes = {}
    for dl in train_loaders:
        tasks = [k for k in dl.dataset.Y_dict if k in graph.op_sequences]
        family = family_of(families, tasks[0]) if len(tasks) == 1 else None
        if family is None:
            continue
        if family not in fits:
            fits[family] = _views_fit(state, family, graph)
        if not fits[family]:
            continue
        keys = graph.input_keys([family.representative])
        member = family.index(tasks[0])
        routes[id(dl)] = _Route(family, tasks[0], None if keys is None else tuple(sorted(keys)),
                                member, view_modules(graph, family, member))
    return routes


def _signature(args: Any) -> tuple:
    """What a jitted program is compiled for: the tree structure and each leaf's spec
    (a Python scalar counts by its type: jit traces it as a weak-typed array)."""
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple(
        (leaf.shape, str(leaf.dtype), getattr(leaf, "weak_type", False))
        if hasattr(leaf, "shape") else type(leaf) for leaf in leaves)


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

    def __init__(self, graph: ModelGraph, parallel: DataParallel, state: TrainState,
                 train_loaders: Sequence[DictDataLoader],
                 compiled: StepPrograms | None = None, compile_ahead: bool = False,
                 diagnostics: bool = False, family_programs: bool = True) -> None:
        self.parallel = parallel
        # (Programs of an earlier fit are compiled already.)
        self.compile_ahead = compile_ahead and parallel.mode == "single" and compiled is None
        self.n_accumulator = (len(train_loaders), len(graph.task_names), diagnostics)
        self.compiled = compiled or StepPrograms(graph, parallel)
        self.scheduler_loaders = list(train_loaders)
        self._loader_index = {id(dl): parallel.per_device(np.int32(i))
                              for i, dl in enumerate(train_loaders)}
        self._task_names = set(graph.task_names)
        self._modules = set(state.params)
        self._routes = {
            key: route._replace(program=self.compiled.family(route.family),
                                member=parallel.per_device(np.int32(route.member)))
            for key, route in family_routes(graph, state, train_loaders, diagnostics,
                                            family_programs).items()}
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
        if self.compile_ahead:
            compile_in_background(self._bucket_jobs(state, accumulator))
        return state, accumulator

    def _bucket_jobs(self, state: TrainState, accumulator: Accumulator) -> list[tuple]:
        """``(program, abstract args)`` of every program the loaders' batch shapes need.

        All of them, the first batch's included: the loop's first call waits for the
        compile in flight instead of starting its own, and the programs of the other
        loaders and shapes compile meanwhile. Loaders that share a program (a task
        family) give one job.
        """
        jobs, seen = [], set()
        for dl in self.scheduler_loaders:
            for shape in range(len(dl.bucket_shapes)):
                batch = dl.example_batch(shape)
                route = self._routes.get(id(dl))
                loader_index = self._loader_index[id(dl)]
                if route is None:
                    program = self.compiled.general
                    args = abstract((state, accumulator, (self._put(batch),), (loader_index,)))
                else:
                    program = route.program
                    args = abstract((_state_view(state, route.view, self._modules), accumulator,
                                     *self._put_member(batch, route), route.member,
                                     loader_index))
                key = (id(program), _signature(args))
                if key not in seen:
                    seen.add(key)
                    jobs.append((program, args))
        return jobs

    def batches(self, scheduled: Iterator[tuple[Any, Any]]) -> Iterator[tuple[Any, int]]:
        """The scheduler's batches on the devices, one batch ahead: ``(item, num_valid)``."""
        for item in prefetch(scheduled, self._to_devices):
            yield item, item[1]

    def step(self, state: TrainState, accumulator: Accumulator, item: tuple[Any, int, Any]
             ) -> tuple[TrainState, Accumulator]:
        """One step on the item's batches (none for a batch without labelled rows)."""
        device_batches, _, loader_indices = item
        if device_batches is None:
            return state, accumulator
        if self._wait_for_previous_step:
            jax.block_until_ready(state.step)
        if not isinstance(loader_indices[0], _Route):
            return self.compiled.general(state, accumulator, device_batches, loader_indices)
        route, loader_index = loader_indices
        # The step sees only the member's modules; the others are not even passed.
        view_state, accumulator = route.program(
            _state_view(state, route.view, self._modules), accumulator, *device_batches,
            route.member, loader_index)
        return _write_view_back(state, view_state, route.view, self._modules), accumulator

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

    def _to_devices(self, item: tuple[Any, Any]) -> tuple[Any, int, Any]:
        batches, dataloaders = item
        route = None if isinstance(dataloaders, tuple) else self._routes.get(id(dataloaders))
        if route is not None:
            return self._family_to_devices(batches, dataloaders, route)
        if not isinstance(dataloaders, tuple):  # one batch per step, else a "mixed" group
            batches, dataloaders = (batches,), (dataloaders,)
        device_batches, num_valid, active = [], 0, False
        for batch in batches:
            active = active or any(is_active(y[batch.mask]).any()
                                   for k, y in batch[1].items() if k in self._task_names)
            device_batches.append(self._put(batch))
            num_valid += batch.num_valid
        if not active:  # nothing to learn from: no step, as Snorkel skips it
            return None, 0, None
        loader_indices = tuple(self._loader_index[id(dl)] for dl in dataloaders)
        return tuple(device_batches), num_valid, loader_indices

    def _family_to_devices(self, batch: Any, dataloader: DictDataLoader, route: _Route
                           ) -> tuple[Any, int, Any]:
        if not is_active(batch[1][route.task][batch.mask]).any():
            return None, 0, None
        return self._put_member(batch, route), batch.num_valid, (
            route, self._loader_index[id(dataloader)])

    def _put(self, batch: Any) -> tuple:
        """``(X, Y, mask)`` on the devices, Y cut to the model's tasks (general step)."""
        X_dict, Y_dict = batch
        return self.parallel.put_batch(
            X_dict, {k: v for k, v in Y_dict.items() if k in self._task_names}, batch.mask)

    def _put_member(self, batch: Any, route: _Route) -> tuple:
        """``(X, labels, mask)`` on the devices for a family step."""
        X_dict, Y_dict = batch
        if route.input_keys is not None:  # every member's batch has the same X keys
            X_dict = {key: X_dict[key] for key in route.input_keys if key in X_dict}
        X, Y, mask = self.parallel.put_batch(X_dict, {"labels": Y_dict[route.task]},
                                             batch.mask)
        return X, Y["labels"], mask


class IndexBatch(NamedTuple):
    """A batch described by row indices only (the data stays on the device).

    ``shape`` indexes the loader's ``bucket_shapes``: the lengths its variable-length
    inputs are cut to (0 for a loader without any).
    """

    loader: int
    rows: np.ndarray
    num_valid: int
    shape: int = 0


class _IndexLoader:
    """Stands in for a loader in the batch scheduler, yielding ``IndexBatch``es in the
    same order (and with the same padding) as the loader's own batches."""

    def __init__(self, loader: DictDataLoader, index: int, task_names: set[str]) -> None:
        self.loader, self.index, self.dataset = loader, index, loader.dataset
        self._labels = [y for k, y in loader.dataset.Y_dict.items() if k in task_names]

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[IndexBatch]:
        order = self.loader.order(self.loader.epoch)
        self.loader.epoch += 1
        for batch_index in range(len(self.loader)):
            rows, num_valid = self.loader.rows_at(order, batch_index)
            if not any(is_active(y[rows[:num_valid]]).any() for y in self._labels):
                num_valid = 0  # no labelled row: skipped, as the per-step runner does
            yield IndexBatch(self.index, rows, num_valid, self.loader.shape_index(rows))


class FusedPrograms:
    """The fused runner's compiled scans, by branch layout (a later fit whose loaders
    group otherwise gets its own), kept by the Trainer across ``fit`` calls."""

    def __init__(self, graph: ModelGraph) -> None:
        self.graph = graph
        self.by_layout: dict[tuple[FusedGroup, ...], Any] = {}

    def programs(self) -> int:
        """How many fused programs have been compiled (one per layout and call shape)."""
        return sum(program._cache_size() for program in self.by_layout.values())

    def layout(self, groups: tuple[FusedGroup, ...]) -> Any:
        """The compiled ``fused_steps`` of the branch layout ``groups``."""
        if groups not in self.by_layout:
            self.by_layout[groups] = jax.jit(functools.partial(fused_steps, self.graph,
                                                               groups),
                                             donate_argnums=(0, 1))
        return self.by_layout[groups]


def _signature(tree: Any) -> Any:
    """Keys, trailing shapes and dtypes of a tree of [N, ...] arrays (rows left out)."""
    return tuple((str(path), np.shape(a)[1:], str(np.asarray(a).dtype))
                 for path, a in jax.tree_util.tree_flatten_with_path(tree)[0])


class FusedRunner:
    """Up to ``steps_per_call`` steps per device call, over device-resident datasets.

    Args: as ``PerStepRunner``, plus ``steps_per_call`` (K); ``compiled`` is a
    ``FusedPrograms``; ``diagnostics`` as ``PerStepRunner``'s (one task per step here:
    norms and weights only).

    Raises:
      ValueError: when ``parallel`` spans more than one device.
    """

    def __init__(self, graph: ModelGraph, parallel: DataParallel, state: TrainState,
                 train_loaders: Sequence[DictDataLoader], steps_per_call: int,
                 compiled: FusedPrograms | None = None, diagnostics: bool = False,
                 family_programs: bool = True) -> None:
        if parallel.mode != "single":
            raise ValueError(
                f"steps_per_call={steps_per_call} runs on one device; got parallel mode "
                f"'{parallel.mode}' over {parallel.n_devices} devices (set parallel='single' "
                f"or steps_per_call=1)"
            )
        self.parallel = parallel
        self.n_accumulator = (len(train_loaders), len(graph.task_names), diagnostics)
        self.steps_per_call = steps_per_call
        groups, data, self._placement = _fused_groups(graph, state, train_loaders,
                                                      diagnostics, family_programs)
        self._data = jax.device_put(data, parallel.devices[0])
        self._n_groups = len(groups)
        self._width = max(dl.batch_size for dl in train_loaders)
        self.compiled = compiled or FusedPrograms(graph)
        self._program = self.compiled.layout(groups)
        task_names = set(graph.task_names)
        self.scheduler_loaders = [_IndexLoader(dl, i, task_names)
                                  for i, dl in enumerate(train_loaders)]
        self._pending: list[IndexBatch] = []

    def prepare(self, state: TrainState, accumulator: Accumulator
                ) -> tuple[TrainState, Accumulator]:
        """Own copies of the state's buffers on the device."""
        return (self.parallel.replicate(own_buffers(state)),
                self.parallel.replicate(accumulator))

    def batches(self, scheduled: Iterator[tuple[IndexBatch, Any]]
                ) -> Iterator[tuple[IndexBatch, int]]:
        """The scheduler's ``IndexBatch``es: ``(item, num_valid)``."""
        for item, _ in scheduled:
            yield item, item.num_valid

    def step(self, state: TrainState, accumulator: Accumulator, item: IndexBatch
             ) -> tuple[TrainState, Accumulator]:
        """Queues the step; runs a call when ``steps_per_call`` steps are queued."""
        if item.num_valid == 0:
            return state, accumulator
        self._pending.append(item)
        if len(self._pending) < self.steps_per_call:
            return state, accumulator
        return self.flush(state, accumulator)

    def flush(self, state: TrainState, accumulator: Accumulator
              ) -> tuple[TrainState, Accumulator]:
        """Runs the queued steps (padded with no-op steps to ``steps_per_call``)."""
        if not self._pending:
            return state, accumulator
        pending, self._pending = self._pending, []
        return self._program(state, accumulator, self._data,
                             *_scan_inputs(pending, self._placement, self.steps_per_call,
                                           self._width, self._n_groups))

    def zero_accumulator(self) -> Accumulator:
        """A zero loss accumulator on the device."""
        return self.parallel.replicate(zero_loss_accumulator(*self.n_accumulator))

    def host(self, tree: Any) -> Any:
        """The tree itself (one device)."""
        return self.parallel.unreplicate(tree)


def _scan_inputs(pending: Sequence[IndexBatch], placement: Sequence[tuple], k: int,
                 width: int, n_groups: int) -> tuple[np.ndarray, ...]:
    """``fused_steps``'s per-step inputs for the queued steps, padded to ``k`` steps:
    (group_ids, loader_ids, members, rows, num_valid)."""
    # Unused slots run the no-op branch (index n_groups): the state passes through.
    group_ids = np.full(k, n_groups, np.int32)
    loader_ids = np.zeros(k, np.int32)
    members = np.zeros(k, np.int32)
    rows = np.zeros((k, width), np.int32)
    num_valid = np.zeros(k, np.int32)
    for i, item in enumerate(pending):
        shape_groups, offset, members[i] = placement[item.loader]
        group_ids[i] = shape_groups[item.shape]
        loader_ids[i], num_valid[i] = item.loader, item.num_valid
        rows[i, : len(item.rows)] = item.rows + offset
    return group_ids, loader_ids, members, rows, num_valid


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
                           diagnostics, family_programs)
    return PerStepRunner(graph, parallel, state, train_loaders,
                         compiled if isinstance(compiled, StepPrograms) else None,
                         compile_ahead, diagnostics, family_programs)


def _bucket_widths(dl: DictDataLoader) -> list[tuple]:
    """Per bucket shape of the loader: ``((input key, length), ...)``, masks included."""
    shapes = []
    for shape in dl.bucket_shapes:
        widths: list[tuple[str, int]] = []
        for key, length in zip(dl.ragged_keys, shape, strict=True):
            widths += [(key, length), (mask_key(key), length)]
        shapes.append(tuple(widths))
    return shapes


def _fused_groups(graph: ModelGraph, state: TrainState,
                  train_loaders: Sequence[DictDataLoader],
                  diagnostics: bool = False, family_programs: bool = True
                  ) -> tuple[tuple, list, list]:
    """The fused branches: one per (family and data signature, or other loader) and
    bucket shape.

    Returns:
      (groups, data, placement): the ``FusedGroup``s; the data parts (a family's
      loaders' datasets concatenated along the rows, stored once for all its bucket
      shapes); per loader ``(group per bucket shape, row offset, member)``.
    """
    routes = family_routes(graph, state, train_loaders, diagnostics, family_programs)
    groups: list[FusedGroup] = []
    parts: list[dict[str, Any]] = []
    placement: list[tuple[tuple[int, ...], int, int]] = []
    family_part: dict[tuple, int] = {}
    group_index: dict[tuple, int] = {}
    for index, dl in enumerate(train_loaders):
        X_dict, Y_dict = dl.dataset.X_dict, dl.dataset.Y_dict
        route = routes.get(id(dl))
        if route is None:
            family, loader, offset, member, part = None, index, 0, 0, len(parts)
            parts.append({"X": dict(X_dict),
                          "Y": {k: v for k, v in Y_dict.items() if k in graph.op_sequences}})
        else:
            keys = sorted(X_dict) if route.input_keys is None else route.input_keys
            X = {key: np.asarray(X_dict[key]) for key in keys}
            labels = np.asarray(Y_dict[route.task])
            key = (route.family, dl.batch_size, _signature(X), _signature(labels))
            if key not in family_part:
                family_part[key] = len(parts)
                parts.append({"X": {k: [] for k in keys}, "labels": [], "rows": 0})
            family, loader, member, part = route.family, -1, route.member, family_part[key]
            offset = parts[part]["rows"]
            for k in keys:
                parts[part]["X"][k].append(X[k])
            parts[part]["labels"].append(labels)
            parts[part]["rows"] += len(labels)
        shape_groups = []
        for widths in _bucket_widths(dl):
            if (part, widths) not in group_index:
                group_index[(part, widths)] = len(groups)
                groups.append(FusedGroup(family, loader, dl.batch_size, part, widths))
            shape_groups.append(group_index[(part, widths)])
        placement.append((tuple(shape_groups), offset, member))
    data = [part if "Y" in part else
            {"X": {k: np.concatenate(v) for k, v in part["X"].items()},
             "labels": np.concatenate(part["labels"])}
            for part in parts]
    return tuple(groups), data, placement
