"""The steps the Trainer compiles: a train step plus an on-device loss accumulator.

    accumulator = zero_loss_accumulator(n_loaders, n_tasks)
    step = jax.jit(functools.partial(fit_step, graph), donate_argnums=(0, 1))
    state, accumulator = step(state, accumulator, X, Y, mask, loader_index)

The accumulator holds [n_loaders, n_tasks] loss sums and active counts, so logging needs
no per-step host sync; with ``zero_loss_accumulator(..., diagnostics=True)`` also the
interference diagnostics' sums (``diagnostics.py``), which the general step then fills. ``fit_step`` (one batch), ``fit_group_step`` (one batch per loader,
the "mixed" schedule) and ``fit_family_step`` (one task of a ``TaskFamily``) wrap the
steps of ``step.py``; ``fused_steps`` runs K of them in one ``lax.scan`` over
device-resident data.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..buckets import BucketShapes
from ..model import ModelGraph
from ..signatures import TaskFamily
from .diagnostics import (
    DIAGNOSTICS,
    accumulate_diagnostics,
    shared_modules,
    zero_diagnostics,
)
from .gradients import Terms
from .step import TrainState, diagnosed_step, family_step, train_step_on

__all__ = ["FusedGroup", "accumulate_terms", "fit_family_step", "fit_group_step", "fit_step",
           "fused_steps", "zero_loss_accumulator"]

Accumulator = dict[str, jax.Array]


def zero_loss_accumulator(n_loaders: int, n_tasks: int, diagnostics: bool = False
                          ) -> Accumulator:
    """[n_loaders, n_tasks] loss sums and active counts, zero (two distinct buffers).

    Made on the host and transferred: ``jnp.zeros`` would compile a program per shape,
    i.e. per number of tasks.

    Args:
      n_loaders, n_tasks: the accumulator's shape.
      diagnostics: add the interference diagnostics' sums under ``"diagnostics"``
        (``diagnostics.zero_diagnostics``); the steps then compute and accumulate them.
    """
    accumulator: dict[str, Any] = {"loss_sum": np.zeros((n_loaders, n_tasks), np.float32),
                                   "count": np.zeros((n_loaders, n_tasks), np.float32)}
    if diagnostics:
        accumulator[DIAGNOSTICS] = zero_diagnostics(n_tasks)
    return jax.device_put(accumulator)


def accumulate_terms(graph: ModelGraph, accumulator: Accumulator, terms: Terms,
                     loader_index: jax.Array, axis_name: Any = None) -> Accumulator:
    """``accumulator`` plus one batch's task -> (loss sum, count) in row ``loader_index``.

    Under pmap the terms are summed over devices first, so every replica holds the totals.
    """
    if axis_name is not None:
        terms = jax.lax.psum(terms, axis_name)
    loss_sum, count = accumulator["loss_sum"], accumulator["count"]
    for task_name, (task_sum, task_count) in terms.items():
        column = graph.task_names.index(task_name)
        loss_sum = loss_sum.at[loader_index, column].add(task_sum)
        count = count.at[loader_index, column].add(task_count)
    return {**accumulator, "loss_sum": loss_sum, "count": count}


def fit_step(
    graph: ModelGraph,
    state: TrainState,
    accumulator: Accumulator,
    X_dict: Accumulator,
    Y_dict: Accumulator,
    mask: jax.Array,
    loader_index: jax.Array,
    axis_name: Any = None,
) -> tuple[TrainState, Accumulator]:
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
    accumulator: Accumulator,
    batches: tuple,
    loader_indices: tuple,
    axis_name: Any = None,
    *,
    shapes: BucketShapes | None = None,
    shape: Any = None,
) -> tuple[TrainState, Accumulator]:
    """``fit_step`` on several batches in one update (one per loader: "mixed" schedule).

    The batches must hold an active row (the runners drop the others on the host). An
    accumulator with a ``"diagnostics"`` entry (``zero_loss_accumulator(...,
    diagnostics=True)``) also collects the interference diagnostics of the step
    (``diagnostics.accumulate_diagnostics``); without one, the step is ``train_step_on``
    (``shapes``/``shape``: one batch at its loader's longest bucket shape, as there).
    """
    if DIAGNOSTICS in accumulator:
        if shapes is not None:
            raise ValueError("fit_group_step: the interference diagnostics need batches "
                             "at their own bucket shape (shapes=None)")
        state, metrics = diagnosed_step(graph, state, batches,
                                        shared_modules(graph, state.params), axis_name)
        accumulator = {**accumulator, DIAGNOSTICS: accumulate_diagnostics(
            accumulator[DIAGNOSTICS], metrics["task_grads"], metrics["weights"],
            metrics["task_mask"])}
    else:
        state, metrics = train_step_on(graph, state, batches, axis_name=axis_name,
                                       skip_inactive=False, shapes=shapes, shape=shape)
    for terms, loader_index in zip(metrics["batch_terms"], loader_indices, strict=True):
        accumulator = accumulate_terms(graph, accumulator, terms, loader_index, axis_name)
    return state, accumulator


def fit_family_step(
    graph: ModelGraph,
    family: TaskFamily,
    state: TrainState,
    accumulator: Accumulator,
    X_dict: Accumulator,
    labels: jax.Array,
    mask: jax.Array,
    member: jax.Array,
    loader_index: jax.Array,
    axis_name: Any = None,
    in_view: bool = False,
    *,
    shapes: BucketShapes | None = None,
    shape: Any = None,
) -> tuple[TrainState, Accumulator]:
    """``fit_step`` for a batch of one task of ``family`` (``step.family_step``; its
    ``shapes``/``shape`` for a batch at its loader's longest bucket shape).

    The task's accumulator column is read from the member index, so one program serves
    every loader of every member with this batch signature.

    Raises:
      ValueError: for an accumulator with interference diagnostics: those need the
        general step (the runners route every batch there when they are on).
    """
    if DIAGNOSTICS in accumulator:
        raise ValueError("fit_family_step does not compute the interference diagnostics "
                         "(the accumulator has a 'diagnostics' entry); use fit_step")
    state, metrics = family_step(graph, family, state, X_dict, labels, mask, member,
                                 axis_name=axis_name, in_view=in_view, shapes=shapes,
                                 shape=shape)
    task_sum, task_count = metrics["terms"]
    if axis_name is not None:
        task_sum, task_count = jax.lax.psum((task_sum, task_count), axis_name)
    column = jnp.asarray([graph.task_names.index(t) for t in family.tasks], jnp.int32)[member]
    return state, {"loss_sum": accumulator["loss_sum"].at[loader_index, column].add(task_sum),
                   "count": accumulator["count"].at[loader_index, column].add(task_count)}


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
                accumulator: Accumulator, data: list[dict[str, Any]],
                group_ids: jax.Array, loader_ids: jax.Array, members: jax.Array,
                rows: jax.Array, num_valid: jax.Array
                ) -> tuple[TrainState, Accumulator]:
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
