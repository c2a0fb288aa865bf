"""How the Trainer's steps reach the device: one call per batch, or many per call.

Both runners take the batches of an epoch in the batch scheduler's order and hold the
device-side ``state`` and loss ``accumulator``; ``flush()`` makes both current (the Trainer
flushes before it evaluates or checkpoints), so the two give the same results:

- ``PerStepRunner``: one jitted (or pmapped) step per batch, numpy batches sent to the
  devices one batch ahead of the step that needs them.
- ``FusedRunner`` (``TrainerConfig(steps_per_call=K)``): the train datasets live on the
  device; the host sends only row indices, and one call runs K steps in a ``lax.scan``,
  each selecting its loader's computation with ``lax.switch``. A call cut short (before an
  evaluation, or at the end of an epoch) is filled with no-op steps (no active row), which
  leave the state unchanged, so every call has the same shapes and compiles once.

Batches without any labelled row are dropped on the host (Snorkel skips them too), so the
compiled step never needs a select over the whole state to undo an update.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
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
from .step import TrainState, family_train_step, train_step_on


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


def zero_loss_accumulator(n_loaders: int, n_tasks: int) -> dict[str, jax.Array]:
    """[n_loaders, n_tasks] loss sums and active counts, zero (two distinct buffers).

    Made on the host and transferred: ``jnp.zeros`` would compile a program per shape,
    i.e. per number of tasks.
    """
    return jax.device_put({"loss_sum": np.zeros((n_loaders, n_tasks), np.float32),
                           "count": np.zeros((n_loaders, n_tasks), np.float32)})


def fit_step(
    graph: ModelGraph,
    state: TrainState,
    accumulator: dict[str, jax.Array],
    X_dict: dict[str, jax.Array],
    Y_dict: dict[str, jax.Array],
    mask: jax.Array,
    loader_index: jax.Array,
    axis_name: Any = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """``train_step`` plus on-device accumulation of loss sums and counts.

    ``accumulator`` holds [n_loaders, n_tasks] loss sums and active counts; row
    ``loader_index`` collects this batch's terms, so logging needs no per-step host sync.
    Under pmap the terms are summed over devices first, so every replica holds the totals.
    The batch must hold an active row.
    """
    return fit_group_step(graph, state, accumulator, ((X_dict, Y_dict, mask),),
                          (loader_index,), axis_name)


def fit_group_step(
    graph: ModelGraph,
    state: TrainState,
    accumulator: dict[str, jax.Array],
    batches: tuple,
    loader_indices: tuple,
    axis_name: Any = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """``fit_step`` on several batches in one update (one per loader: "mixed" schedule).

    The batches must hold an active row (the runners drop the others on the host).
    """
    state, metrics = train_step_on(graph, state, batches, axis_name=axis_name,
                                   skip_inactive=False)
    loss_sum, count = accumulator["loss_sum"], accumulator["count"]
    for terms, loader_index in zip(metrics["batch_terms"], loader_indices, strict=True):
        if axis_name is not None:
            terms = jax.lax.psum(terms, axis_name)
        for task_name, (task_sum, task_count) in terms.items():
            column = graph.task_names.index(task_name)
            loss_sum = loss_sum.at[loader_index, column].add(task_sum)
            count = count.at[loader_index, column].add(task_count)
    return state, {"loss_sum": loss_sum, "count": count}


def fit_family_step(
    graph: ModelGraph,
    family: TaskFamily,
    state: TrainState,
    accumulator: dict[str, jax.Array],
    X_dict: dict[str, jax.Array],
    labels: jax.Array,
    mask: jax.Array,
    member: jax.Array,
    loader_index: jax.Array,
    axis_name: Any = None,
    in_view: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """``fit_step`` for a batch of one task of ``family`` (``family_train_step``).

    The task's accumulator column is read from the member index, so one program serves
    every loader of every member with this batch signature.
    """
    state, metrics = family_train_step(graph, family, state, X_dict, labels, mask, member,
                                       axis_name=axis_name, in_view=in_view)
    task_sum, task_count = metrics["terms"]
    if axis_name is not None:
        task_sum, task_count = jax.lax.psum((task_sum, task_count), axis_name)
    column = jnp.asarray([graph.task_names.index(t) for t in family.tasks], jnp.int32)[member]
    return state, {"loss_sum": accumulator["loss_sum"].at[loader_index, column].add(task_sum),
                   "count": accumulator["count"].at[loader_index, column].add(task_count)}


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


def _views_fit(state: TrainState, family: TaskFamily, graph: ModelGraph) -> bool:
    """Whether the optimizer sees each member's view as it sees the whole model.

    Optimizers that act leaf by leaf (all of jaxmtl's; clipping by the global norm sees
    the same norm, the other modules' gradients being zero) give the view the state
    ``view_of`` cuts from the full one; a user transformation that labels or masks
    modules by name may not, and its family then trains through the general step.
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
                  train_loaders: Sequence[DictDataLoader]) -> dict[int, _Route]:
    """Loader id -> its family route, for loaders that label one task of a family.

    Empty with a balancer (it needs the general step) or when
    ``PerStepRunner.share_family_programs`` is False.
    """
    if not PerStepRunner.share_family_programs or state.balancer is not None:
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


class PerStepRunner:
    """One device call per batch (jit, pmap or sharded jit, as ``parallel`` says).

    A loader whose batches carry one task of a ``TaskFamily`` steps through the family's
    program (one for all members); other batches, "mixed" groups and balanced training
    use the general step, one program per task set.
    """

    #: False forces one program per task set (the reference the family steps must equal).
    share_family_programs = True

    def __init__(self, graph: ModelGraph, parallel: DataParallel, state: TrainState,
                 accumulator: dict[str, jax.Array], train_loaders: Sequence[DictDataLoader],
                 compiled: StepPrograms | None = None) -> None:
        self.parallel = parallel
        self.n_accumulator = (len(train_loaders), len(graph.task_names))
        self.compiled = compiled or StepPrograms(graph, parallel)
        self._loader_index = {id(dl): parallel.per_device(np.int32(i))
                              for i, dl in enumerate(train_loaders)}
        self._task_names = set(graph.task_names)
        self.loaders = list(train_loaders)
        self._modules = set(state.params)
        self._routes = {
            key: route._replace(program=self.compiled.family(route.family),
                                member=parallel.per_device(np.int32(route.member)))
            for key, route in family_routes(graph, state, train_loaders).items()}
        # XLA:CPU runs each device's part of a collective on a shared thread pool; with
        # many steps queued, parts of different steps can hold every thread and wait for
        # each other forever (an all-reduce rendezvous timeout). There, a step starts only
        # when the previous one is done.
        self._wait_for_previous_step = (parallel.mode != "single"
                                        and parallel.devices[0].platform == "cpu")
        self.state = parallel.replicate(own_buffers(state))
        self.accumulator = parallel.replicate(accumulator)

    @property
    def scheduler_loaders(self) -> list[Any]:
        """What the batch scheduler iterates: the loaders themselves."""
        return self.loaders

    def _to_devices(self, item: tuple[Any, Any]) -> tuple[Any, int, Any]:
        batches, dataloaders = item
        route = None if isinstance(dataloaders, tuple) else self._routes.get(id(dataloaders))
        if route is not None:
            return self._family_to_devices(batches, dataloaders, route)
        if not isinstance(dataloaders, tuple):  # one batch per step, else a "mixed" group
            batches, dataloaders = (batches,), (dataloaders,)
        device_batches, num_valid, active = [], 0, False
        for batch in batches:
            X_dict, Y_dict = batch
            Y_dict = {k: v for k, v in Y_dict.items() if k in self._task_names}
            active = active or any(is_active(y[batch.mask]).any() for y in Y_dict.values())
            device_batches.append(self.parallel.put_batch(X_dict, Y_dict, batch.mask))
            num_valid += batch.num_valid
        if not active:  # nothing to learn from: no step, as Snorkel skips it
            return None, 0, None
        loader_indices = tuple(self._loader_index[id(dl)] for dl in dataloaders)
        return tuple(device_batches), num_valid, loader_indices

    def _family_to_devices(self, batch: Any, dataloader: DictDataLoader, route: _Route
                           ) -> tuple[Any, int, Any]:
        X_dict, Y_dict = batch
        labels = Y_dict[route.task]
        if not is_active(labels[batch.mask]).any():
            return None, 0, None
        if route.input_keys is not None:  # every member's batch has the same X keys
            X_dict = {key: X_dict[key] for key in route.input_keys if key in X_dict}
        X, Y, mask = self.parallel.put_batch(X_dict, {"labels": labels}, batch.mask)
        return (X, Y["labels"], mask), batch.num_valid, (
            route, self._loader_index[id(dataloader)])

    def epoch(self, batches: Iterator[tuple[Any, DictDataLoader]]) -> Iterator[tuple[Any, int]]:
        """Wraps the scheduler's ``(batch, loader)`` pairs: yields ``(item, num_valid)``.

        ``num_valid`` is 0 for a batch without any labelled row (``push`` ignores it).
        """
        for device_item in prefetch(batches, self._to_devices):
            yield device_item, device_item[1]

    def push(self, item: tuple[Any, int, Any]) -> None:
        """Runs one step on the batch (none for a batch without labelled rows)."""
        device_batches, _, loader_indices = item
        if device_batches is None:
            return
        if self._wait_for_previous_step:
            jax.block_until_ready(self.state.step)
        if isinstance(loader_indices[0], _Route):
            route, loader_index = loader_indices
            state, modules = self.state, self._modules
            # The step sees only the member's modules; the others are not even passed.
            view_state, self.accumulator = route.program(
                _state_view(state, route.view, modules), self.accumulator, *device_batches,
                route.member, loader_index)
            self.state = view_state.replace(
                params=write_back(state.params, view_state.params, route.view, modules),
                opt_state=write_back(state.opt_state, view_state.opt_state, route.view,
                                     modules),
                model_state=write_back_variables(state.model_state, view_state.model_state,
                                                 route.view))
            return
        self.state, self.accumulator = self.compiled.general(
            self.state, self.accumulator, device_batches, loader_indices)

    def flush(self) -> None:
        """Nothing is buffered."""

    def reset_accumulator(self) -> None:
        """Zeroes the loss accumulator (after an evaluation read it)."""
        self.accumulator = self.parallel.replicate(zero_loss_accumulator(*self.n_accumulator))

    def host_state(self) -> TrainState:
        """The state, one copy (the first device's under pmap)."""
        return self.parallel.unreplicate(self.state)

    def host_accumulator(self) -> dict[str, jax.Array]:
        """The loss accumulator, one copy."""
        return self.parallel.unreplicate(self.accumulator)


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


def _mask_labels(labels: jax.Array, mask: jax.Array) -> jax.Array:
    keep = mask if labels.ndim == 1 else mask[:, None]
    return jnp.where(keep, labels, jnp.asarray(-1, labels.dtype))


class FusedGroup(NamedTuple):
    """One ``lax.switch`` branch of ``fused_steps``: one loader, or a family's loaders,
    at one bucket shape.

    Attributes:
      family: the TaskFamily whose loaders share the branch (their data concatenated
        along the rows, with the task's labels under "labels"), or None for one loader
        through the general step.
      loader: that one loader's index (-1 for a family branch).
      batch_size: the branch's batch size.
      part: the index of the branch's data in ``fused_steps``'s ``data``.
      widths: ``((input key, length), ...)``: the static lengths its variable-length
        inputs and their masks are cut to (empty for fixed-shape data).
    """

    family: TaskFamily | None
    loader: int
    batch_size: int
    part: int = 0
    widths: tuple = ()


def fused_steps(graph: ModelGraph, groups: tuple[FusedGroup, ...], state: TrainState,
                accumulator: dict[str, jax.Array], data: list[dict[str, Any]],
                group_ids: jax.Array, loader_ids: jax.Array, members: jax.Array,
                rows: jax.Array, num_valid: jax.Array
                ) -> tuple[TrainState, dict[str, jax.Array]]:
    """Runs ``len(group_ids)`` steps in one ``lax.scan`` over device-resident data.

    Each step selects its branch with ``lax.switch``: one per ``FusedGroup``, so the
    loaders of one task family (same batch signature) share one branch.

    Args:
      graph: the task graph (static).
      groups: the branches (static).
      state, accumulator: as ``fit_step``.
      data: per data part ``{"X": {...}, "Y": {...}}`` (one loader's whole dataset) or
        ``{"X": {...}, "labels": [N, ...]}`` (a family's loaders' datasets, concatenated);
        a group reads ``data[group.part]``, sliced to its bucket widths.
      group_ids: [K] the branch of each step; ``len(groups)`` for a no-op step.
      loader_ids, members: [K] each step's loader and member index (family branches).
      rows: [K, max batch size] row indices into that group's data.
      num_valid: [K] real rows per step (0 for a no-op step).
    """

    def branch(index: int, carry: tuple, loader_k: jax.Array, member_k: jax.Array,
               rows_k: jax.Array, valid_k: jax.Array) -> tuple:
        group = groups[index]
        part, widths = data[group.part], dict(group.widths)
        step_rows = rows_k[: group.batch_size]
        mask = jnp.arange(group.batch_size) < valid_k
        X = {k: (v[:, : widths[k]] if k in widths else v)[step_rows]
             for k, v in part["X"].items()}
        if group.family is not None:
            labels = _mask_labels(part["labels"][step_rows], mask)
            return fit_family_step(graph, group.family, *carry, X, labels, mask, member_k,
                                   loader_k)
        Y = {k: _mask_labels(v[step_rows], mask) for k, v in part["Y"].items()}
        return fit_step(graph, *carry, X, Y, mask, jnp.int32(group.loader))

    def no_op(carry: tuple, *args: jax.Array) -> tuple:
        return carry

    branches = [functools.partial(branch, i) for i in range(len(groups))] + [no_op]

    def body(carry: tuple, xs: tuple) -> tuple:
        group_id, *args = xs
        return jax.lax.switch(group_id, branches, carry, *args), None

    (state, accumulator), _ = jax.lax.scan(
        body, (state, accumulator), (group_ids, loader_ids, members, rows, num_valid))
    return state, accumulator


def _signature(tree: Any) -> Any:
    """Keys, trailing shapes and dtypes of a tree of [N, ...] arrays (rows left out)."""
    return tuple((str(path), np.shape(a)[1:], str(np.asarray(a).dtype))
                 for path, a in jax.tree_util.tree_flatten_with_path(tree)[0])


class FusedRunner(PerStepRunner):
    """Up to ``steps_per_call`` steps per device call, over device-resident datasets."""

    def __init__(self, graph: ModelGraph, parallel: DataParallel, state: TrainState,
                 accumulator: dict[str, jax.Array], train_loaders: Sequence[DictDataLoader],
                 steps_per_call: int, compiled: Any = None) -> None:
        if parallel.mode != "single":
            raise ValueError(
                f"steps_per_call={steps_per_call} runs on one device; got parallel mode "
                f"'{parallel.mode}' over {parallel.n_devices} devices (set parallel='single' "
                f"or steps_per_call=1)"
            )
        self.parallel = parallel
        self.n_accumulator = (len(train_loaders), len(graph.task_names))
        self.loaders = list(train_loaders)
        self.steps_per_call = steps_per_call
        task_names = set(graph.task_names)
        groups, data, self._placement = _fused_groups(graph, state, train_loaders)
        self._data = jax.device_put(data, parallel.devices[0])
        self._n_groups = len(groups)
        self._batch_sizes = tuple(dl.batch_size for dl in train_loaders)
        # Programs by branch layout: a later fit whose loaders group otherwise gets its own.
        self.compiled = {} if compiled is None else compiled
        if groups not in self.compiled:
            self.compiled[groups] = jax.jit(functools.partial(fused_steps, graph, groups),
                                            donate_argnums=(0, 1))
        self._program = self.compiled[groups]
        self._proxies = [_IndexLoader(dl, i, task_names) for i, dl in enumerate(train_loaders)]
        self._pending: list[IndexBatch] = []
        self.state = parallel.replicate(own_buffers(state))
        self.accumulator = parallel.replicate(accumulator)

    @property
    def scheduler_loaders(self) -> list[_IndexLoader]:
        """What the batch scheduler iterates instead of the loaders."""
        return self._proxies

    def epoch(self, batches: Iterator[tuple[IndexBatch, Any]]) -> Iterator[tuple[Any, int]]:
        """Wraps the scheduler's ``(IndexBatch, proxy)`` pairs: yields ``(item, num_valid)``."""
        for item, _ in batches:
            yield item, item.num_valid

    def push(self, item: IndexBatch) -> None:
        """Queues the step; runs a call when ``steps_per_call`` steps are queued."""
        if item.num_valid == 0:
            return
        self._pending.append(item)
        if len(self._pending) == self.steps_per_call:
            self.flush()

    def flush(self) -> None:
        """Runs the queued steps (padded with no-op steps to ``steps_per_call``)."""
        if not self._pending:
            return
        k, width = self.steps_per_call, max(self._batch_sizes)
        # Unused slots run the no-op branch (index n_groups): the state passes through.
        group_ids = np.full(k, self._n_groups, np.int32)
        loader_ids = np.zeros(k, np.int32)
        members = np.zeros(k, np.int32)
        rows = np.zeros((k, width), np.int32)
        num_valid = np.zeros(k, np.int32)
        for i, item in enumerate(self._pending):
            shape_groups, offset, members[i] = self._placement[item.loader]
            group_ids[i] = shape_groups[item.shape]
            loader_ids[i], num_valid[i] = item.loader, item.num_valid
            rows[i, : len(item.rows)] = item.rows + offset
        self._pending = []
        self.state, self.accumulator = self._program(
            self.state, self.accumulator, self._data, group_ids, loader_ids, members, rows,
            num_valid)


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
                  train_loaders: Sequence[DictDataLoader]) -> tuple[tuple, list, list]:
    """The fused branches: one per (family and data signature, or other loader) and
    bucket shape.

    Returns:
      (groups, data, placement): the ``FusedGroup``s; the data parts (a family's
      loaders' datasets concatenated along the rows, stored once for all its bucket
      shapes); per loader ``(group per bucket shape, row offset, member)``.
    """
    routes = family_routes(graph, state, train_loaders)
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
