"""The fused runner (``TrainerConfig(steps_per_call=K)``): K steps per device call.

The train datasets live on the device; the host sends only row indices, and one call runs
K steps in a ``lax.scan``, each selecting its loader's computation with ``lax.switch``
(one branch per family and data signature, or other loader, and bucket shape). A call cut
short is filled with no-op steps (no active row), so every call has the same shapes.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from ..buckets import bucket_widths
from ..data import is_active
from ..loader import DictDataLoader
from ..model import ModelGraph
from ..parallel import DataParallel
from .accumulate import Accumulator, FusedGroup, fused_steps, zero_loss_accumulator
from .families import family_routes
from .state import own_buffers
from .step import TrainState


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

    def start_compiling(self, state: TrainState, accumulator: Accumulator,
                        after: threading.Event | None = None) -> None:
        """Nothing: the one fused program compiles at the first call."""

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
        for widths in bucket_widths(dl):
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
