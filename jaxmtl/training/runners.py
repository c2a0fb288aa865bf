"""How the Trainer's steps reach the device: one call per batch, or many per call.

Both runners take the batches of an epoch in the batch scheduler's order and hold the
device-side ``state`` and loss ``accumulator``; ``flush()`` makes both current (the Trainer
flushes before it evaluates or checkpoints), so the two give the same results:

- ``PerStepRunner``: one jitted (or pmapped) step per batch, numpy batches sent to the
  devices one batch ahead of the step that needs them.
- ``FusedRunner`` (``TrainerConfig(steps_per_call=K)``): the train datasets live on the
  device; the host sends only row indices, and one call runs K steps in a ``lax.scan``,
  each selecting its loader's computation with ``lax.switch`` (one branch per loader and
  bucket shape: variable-length inputs stay padded to their longest row on the device
  and each branch slices them to its bucket length statically). A call cut short (before an
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
from .step import TrainState, train_step_on


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
    """[n_loaders, n_tasks] loss sums and active counts, zero (two distinct buffers)."""
    return {"loss_sum": jnp.zeros((n_loaders, n_tasks), jnp.float32),
            "count": jnp.zeros((n_loaders, n_tasks), jnp.float32)}


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


class PerStepRunner:
    """One device call per batch (jit, pmap or sharded jit, as ``parallel`` says)."""

    def __init__(self, graph: ModelGraph, parallel: DataParallel, state: TrainState,
                 accumulator: dict[str, jax.Array], train_loaders: Sequence[DictDataLoader],
                 compiled: Any = None) -> None:
        self.parallel = parallel
        self.n_accumulator = (len(train_loaders), len(graph.task_names))
        self.compiled = compiled or parallel.compile(
            functools.partial(fit_group_step, graph, axis_name=parallel.axis_name),
            donate_argnums=(0, 1),
        )
        self._loader_index = {id(dl): parallel.per_device(np.int32(i))
                              for i, dl in enumerate(train_loaders)}
        self._task_names = set(graph.task_names)
        self.loaders = list(train_loaders)
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
        self.state, self.accumulator = self.compiled(self.state, self.accumulator,
                                                     device_batches, loader_indices)

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


def fused_branches(loaders: Sequence[DictDataLoader]) -> tuple[tuple[int, tuple], ...]:
    """The fused step's branches: one per (loader, batch shape), in loader order.

    Each is ``(loader index, ((input key, length), ...))``: the lengths the loader's
    variable-length inputs and their masks are cut to (empty for fixed-shape data).
    """
    branches = []
    for index, dl in enumerate(loaders):
        for shape in dl.bucket_shapes:
            widths = []
            for key, length in zip(dl.ragged_keys, shape, strict=True):
                widths += [(key, length), (mask_key(key), length)]
            branches.append((index, tuple(widths)))
    return tuple(branches)


def fused_steps(graph: ModelGraph, batch_sizes: tuple[int, ...],
                branch_specs: tuple[tuple[int, tuple], ...], state: TrainState,
                accumulator: dict[str, jax.Array], data: list[dict[str, Any]],
                branch_ids: jax.Array, rows: jax.Array, num_valid: jax.Array
                ) -> tuple[TrainState, dict[str, jax.Array]]:
    """Runs ``len(branch_ids)`` steps in one ``lax.scan`` over device-resident data.

    Args:
      graph: the task graph (static).
      batch_sizes: each train loader's batch size (static).
      branch_specs: ``fused_branches(loaders)`` (static): per branch, its loader and the
        static lengths its variable-length inputs are sliced to.
      state, accumulator: as ``fit_step``.
      data: per loader ``{"X": {...}, "Y": {...}}`` arrays of its whole dataset.
      branch_ids: [K] the branch of each step; ``len(branch_specs)`` for a no-op step.
      rows: [K, max batch size] row indices into that loader's data.
      num_valid: [K] real rows per step (0 for a no-op step).
    """

    def branch(spec: tuple[int, tuple], carry: tuple, rows_k: jax.Array,
               valid_k: jax.Array) -> tuple:
        index, widths = spec
        widths = dict(widths)
        step_rows = rows_k[: batch_sizes[index]]
        mask = jnp.arange(batch_sizes[index]) < valid_k
        X = {k: (v[:, : widths[k]] if k in widths else v)[step_rows]
             for k, v in data[index]["X"].items()}
        Y = {k: _mask_labels(v[step_rows], mask) for k, v in data[index]["Y"].items()}
        return fit_step(graph, *carry, X, Y, mask, jnp.int32(index))

    def no_op(carry: tuple, rows_k: jax.Array, valid_k: jax.Array) -> tuple:
        return carry

    branches = [functools.partial(branch, spec) for spec in branch_specs] + [no_op]

    def body(carry: tuple, xs: tuple) -> tuple:
        loader_id, rows_k, valid_k = xs
        return jax.lax.switch(loader_id, branches, carry, rows_k, valid_k), None

    (state, accumulator), _ = jax.lax.scan(body, (state, accumulator),
                                           (branch_ids, rows, num_valid))
    return state, accumulator


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
        self._data = jax.device_put([
            {"X": dict(dl.dataset.X_dict),
             "Y": {k: v for k, v in dl.dataset.Y_dict.items() if k in task_names}}
            for dl in train_loaders
        ], parallel.devices[0])
        self._batch_sizes = tuple(dl.batch_size for dl in train_loaders)
        # One lax.switch branch per (loader, bucket shape), each slicing statically.
        branch_specs = fused_branches(train_loaders)
        self._n_branches = len(branch_specs)
        self._first_branch = np.cumsum([0] + [len(dl.bucket_shapes) for dl in train_loaders])
        self.compiled = compiled or jax.jit(
            functools.partial(fused_steps, graph, self._batch_sizes, branch_specs),
            donate_argnums=(0, 1))
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
        # Unused slots run the no-op branch (the last): the state passes through.
        branch_ids = np.full(k, self._n_branches, np.int32)
        rows = np.zeros((k, width), np.int32)
        num_valid = np.zeros(k, np.int32)
        for i, item in enumerate(self._pending):
            branch_ids[i] = self._first_branch[item.loader] + item.shape
            num_valid[i] = item.num_valid
            rows[i, : len(item.rows)] = item.rows
        self._pending = []
        self.state, self.accumulator = self.compiled(self.state, self.accumulator, self._data,
                                                     branch_ids, rows, num_valid)
