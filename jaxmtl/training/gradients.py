"""The gradient of one update: the forward pass's loss terms and the plain or balanced
gradient, as pure functions over a ``StepContext``.

    ctx = step_context(graph, state, batches)          # keys, active counts, dtype
    out = plain_grads(graph, state, batches, ctx)      # or weighted_grads, per_task_grads,
                                                       # representation_grads (balancers)

Each gradient function returns a ``StepGrads``; ``update.finish_step`` applies it. The
steps that combine them are in ``step.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ..model import (
    ModelGraph,
    PyTree,
    active_mask,
    apply_ops,
    shared_representation,
    task_loss_terms,
    total_loss,
)
from .balancers import balanced_grads
from .state import PRECISIONS, TrainState

__all__ = ["StepContext", "StepGrads", "active_counts", "cast_floats", "forward_terms",
           "merge_terms", "per_task_grads", "plain_grads", "representation_grads",
           "shared_task_grads", "step_context", "step_rngs", "task_loss_vector",
           "weighted_grads"]

Batch = tuple[Mapping[str, jax.Array], Mapping[str, jax.Array], jax.Array]
Terms = dict[str, tuple[jax.Array, jax.Array]]


# --- shared helpers ---------------------------------------------------------------------
class StepContext(NamedTuple):
    """What every step derives from the state and the batches before its forward pass.

    Attributes:
      rng: this step's dropout key (per device under pmap).
      balancer_rng: the balancer's key, identical on every device (PCGrad's task order).
      compute_dtype: the dtype of the forward/backward pass, None for float32.
      counts: task -> active rows over all batches (and devices): the means' divisors.
      task_mask: [T] bool, graph order: the tasks with an active row.
      axis_name: the pmap axis, or None.
    """

    rng: jax.Array
    balancer_rng: jax.Array
    compute_dtype: Any
    counts: dict[str, jax.Array]
    task_mask: jax.Array
    axis_name: Any


class StepGrads(NamedTuple):
    """What a gradient function hands to ``finish_step``.

    Attributes:
      grads: the gradient for the optimizer (summed across devices).
      loss: the combined loss (scalar).
      weights: [T] the task weights (ones without a balancer).
      balancer_state: the balancer's new state.
      batch_terms: per batch, task -> (loss sum, active count) (this device's share).
      model_state: the non-params collections after the forward pass.
      task_grads: the per-task gradients [T, ...] (summed across devices) when the
        method computed them (``per_task_grads``), else None; the interference
        diagnostics reuse them.
    """

    grads: PyTree
    loss: jax.Array
    weights: jax.Array
    balancer_state: PyTree
    batch_terms: list[Terms]
    model_state: PyTree
    task_grads: PyTree | None = None


def cast_floats(tree: PyTree, dtype: Any) -> PyTree:
    """``tree`` with its floating-point leaves cast to ``dtype`` (other leaves as they are)."""
    def cast(x: Any) -> Any:
        return x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x
    return jax.tree.map(cast, tree)


def step_rngs(state: TrainState, axis_name: Any = None) -> tuple[jax.Array, jax.Array]:
    """(dropout key, balancer key) of this step: ``fold_in(state.rng, state.step)``, the
    dropout key further folded with the device index under pmap."""
    rng = jax.random.fold_in(state.rng, state.step)
    balancer_rng = rng
    if axis_name is not None:  # each device draws its own dropout masks
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    return rng, balancer_rng


def active_counts(graph: ModelGraph, batches: Sequence[Batch], axis_name: Any = None
                  ) -> dict[str, jax.Array]:
    """Task -> active rows (labelled, not padded) over the batches, and over all devices
    under pmap. Follows from the labels alone, known before any forward pass."""
    counts = {task: jnp.zeros((), jnp.float32) for task in graph.task_names}
    for _, Y_dict, mask in batches:
        for task, labels in Y_dict.items():
            if task in counts:
                counts[task] = counts[task] + jnp.sum(active_mask(labels, mask))
    if axis_name is not None:
        counts = jax.lax.psum(counts, axis_name)
    return counts


def step_context(graph: ModelGraph, state: TrainState, batches: Sequence[Batch],
                 axis_name: Any = None) -> StepContext:
    """The ``StepContext`` of one update on ``batches``."""
    rng, balancer_rng = step_rngs(state, axis_name)
    compute_dtype = PRECISIONS[state.precision]
    counts = active_counts(graph, batches, axis_name)
    task_mask = jnp.stack([counts[task] > 0 for task in graph.task_names])
    return StepContext(rng, balancer_rng, compute_dtype, counts, task_mask, axis_name)


def batch_rng(rng: jax.Array, n_batches: int, index: int) -> jax.Array:
    """The dropout key of batch ``index`` of ``n_batches`` (the step's own for one)."""
    return rng if n_batches == 1 else jax.random.fold_in(rng, index)


def merge_terms(batch_terms: Sequence[Terms]) -> Terms:
    """Task -> (loss sum, count) summed over the batches that carry the task."""
    merged: Terms = {}
    for terms in batch_terms:
        for task, (loss_sum, count) in terms.items():
            if task in merged:
                loss_sum, count = merged[task][0] + loss_sum, merged[task][1] + count
            merged[task] = (loss_sum, count)
    return merged


def forward_terms(graph: ModelGraph, ctx: StepContext, batches: Sequence[Batch],
                  params: PyTree, model_state: PyTree, only_task: str | None = None
                  ) -> tuple[list[Terms], Terms, PyTree]:
    """The training forward pass over ``batches`` (in the compute dtype).

    Returns:
      (batch_terms, merged, model_state): per batch, task -> (loss sum, count) (only
      ``only_task``'s, if given: the other batches contribute ``{}``); the same merged
      over the batches; the updated non-params collections.
    """
    if ctx.compute_dtype is not None:
        params = cast_floats(params, ctx.compute_dtype)
    batch_terms: list[Terms] = []
    for index, (X_dict, Y_dict, mask) in enumerate(batches):
        if only_task is not None:
            if only_task not in Y_dict:
                batch_terms.append({})
                continue
            Y_dict = {only_task: Y_dict[only_task]}
        if ctx.compute_dtype is not None:
            X_dict = cast_floats(X_dict, ctx.compute_dtype)
        terms, variables = task_loss_terms(
            graph, {"params": params, **model_state}, X_dict, Y_dict, mask, train=True,
            rng=batch_rng(ctx.rng, len(batches), index))
        model_state = {col: tree for col, tree in variables.items() if col != "params"}
        batch_terms.append(terms)
    return batch_terms, merge_terms(batch_terms), model_state


def task_loss_vector(graph: ModelGraph, merged: Terms, counts: Mapping[str, jax.Array]
                     ) -> jax.Array:
    """[T] ``loss_weight * loss sum / count`` per task, graph order; 0 for absent tasks."""
    return jnp.stack([
        graph.loss_weights[task] * merged[task][0] / jnp.maximum(counts[task], 1.0)
        if task in merged else jnp.zeros((), jnp.float32)
        for task in graph.task_names
    ])


# --- gradients: plain and balanced --------------------------------------------------------
def plain_grads(graph: ModelGraph, state: TrainState, batches: Sequence[Batch],
                ctx: StepContext) -> StepGrads:
    """The gradient of the summed loss ``sum_t loss_weight_t * mean_t`` (``total_loss``)."""
    def loss_fn(params: PyTree) -> tuple[jax.Array, tuple]:
        batch_terms, merged, model_state = forward_terms(graph, ctx, batches, params,
                                                         state.model_state)
        return total_loss(graph, merged, ctx.counts), (batch_terms, model_state)

    (loss, (batch_terms, model_state)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    if ctx.axis_name is not None:
        grads = jax.lax.psum(grads, ctx.axis_name)
        loss = jax.lax.psum(loss, ctx.axis_name)
    weights = jnp.ones(len(graph.task_names), jnp.float32)
    return StepGrads(grads, loss, weights, state.balancer_state, batch_terms, model_state)


def weighted_grads(graph: ModelGraph, state: TrainState, batches: Sequence[Batch],
                   ctx: StepContext) -> StepGrads:
    """Loss weighting: one forward, one backward with the balancer's weights as cotangent."""
    def loss_vector(params: PyTree) -> tuple[jax.Array, tuple]:
        batch_terms, merged, model_state = forward_terms(graph, ctx, batches, params,
                                                         state.model_state)
        return task_loss_vector(graph, merged, ctx.counts), (batch_terms, model_state)

    out = balanced_grads(state.balancer, loss_vector, state.params, state.balancer_state,
                         rng=ctx.balancer_rng, task_mask=ctx.task_mask, has_aux=True,
                         axis_name=ctx.axis_name)
    batch_terms, model_state = out.aux
    return StepGrads(out.grads, jnp.sum(out.weights * out.task_losses), out.weights,
                     out.state, batch_terms, model_state)


def per_task_grads(graph: ModelGraph, state: TrainState, batches: Sequence[Batch],
                   ctx: StepContext) -> StepGrads:
    """Gradient methods: each task differentiated through the batches that carry it only.

    T tasks in T batches cost T forward/backward passes of one batch each (as the summed
    loss does), not T backward passes through every batch.
    """
    model_state, grads_per_task, losses, terms_per_task = state.model_state, [], [], []
    for index, task in enumerate(graph.task_names):
        def task_loss(params: PyTree, model_state: PyTree, task: str = task,
                      index: int = index) -> tuple:
            batch_terms, merged, new_state = forward_terms(graph, ctx, batches, params,
                                                           model_state, only_task=task)
            return task_loss_vector(graph, merged, ctx.counts)[index], (batch_terms,
                                                                        new_state)

        (loss_t, (terms_t, model_state)), grad_t = jax.value_and_grad(
            task_loss, has_aux=True)(state.params, model_state)
        grads_per_task.append(grad_t)
        losses.append(loss_t)
        terms_per_task.append(terms_t)
    task_grads = jax.tree.map(lambda *g: jnp.stack(g), *grads_per_task)
    losses = jnp.stack(losses)
    if ctx.axis_name is not None:
        task_grads = jax.lax.psum(task_grads, ctx.axis_name)
        losses = jax.lax.psum(losses, ctx.axis_name)
    losses = jax.lax.stop_gradient(losses)
    grads, weights, balancer_state = state.balancer.update(
        losses, task_grads, state.balancer_state, state.params, ctx.balancer_rng,
        ctx.task_mask)
    batch_terms = [{task: terms for per_task in terms_per_task
                    for task, terms in per_task[index].items()}
                   for index in range(len(batches))]
    return StepGrads(grads, jnp.sum(weights * losses), weights, balancer_state, batch_terms,
                     model_state, task_grads)


def representation_grads(graph: ModelGraph, state: TrainState, batches: Sequence[Batch],
                         ctx: StepContext) -> StepGrads:
    """MGDA-UB: task weights from the gradients w.r.t. the shared representation.

    The representation is the output of the last op every task of the batches runs; the
    task gradients with respect to it (stacked over the batches) are cheap, as only the
    task heads are differentiated. The update is then the gradient of
    ``sum_t weights_t L_t`` through the whole model.
    """
    if ctx.axis_name is not None:
        raise ValueError("MGDA-UB (balancer_config upper_bound=True) does not run under "
                         "pmap; use parallel='sharded' (same result as one device) or "
                         "parallel='single'")
    prefixes, representation = representation_prefixes(graph, state, batches, ctx)
    params = state.params if ctx.compute_dtype is None else cast_floats(
        state.params, ctx.compute_dtype)
    variables = {"params": params, **state.model_state}

    def head_losses(reps: list) -> jax.Array:
        batch_terms = []
        for index, ((X_dict, Y_dict, mask), prefix) in enumerate(zip(batches, prefixes,
                                                                    strict=True)):
            overrides = {**prefix, representation: reps[index]}
            terms, _ = task_loss_terms(graph, variables, X_dict, Y_dict, mask, train=True,
                                       rng=batch_rng(ctx.rng, len(batches), index),
                                       overrides=overrides)
            batch_terms.append(terms)
        return task_loss_vector(graph, merge_terms(batch_terms), ctx.counts)

    losses, vjp_fn = jax.vjp(head_losses, [prefix[representation] for prefix in prefixes])
    (rep_grads,) = jax.vmap(vjp_fn)(jnp.eye(losses.shape[0], dtype=losses.dtype))
    _, weights, balancer_state = state.balancer.update(
        jax.lax.stop_gradient(losses), rep_grads, state.balancer_state, state.params,
        ctx.balancer_rng, ctx.task_mask)
    weights = jax.lax.stop_gradient(weights)

    def weighted(params: PyTree) -> tuple[jax.Array, tuple]:
        batch_terms, merged, model_state = forward_terms(graph, ctx, batches, params,
                                                         state.model_state)
        return jnp.sum(weights * task_loss_vector(graph, merged, ctx.counts)), (
            batch_terms, model_state)

    (loss, (batch_terms, model_state)), grads = jax.value_and_grad(
        weighted, has_aux=True)(state.params)
    return StepGrads(grads, loss, weights, balancer_state, batch_terms, model_state)


def representation_prefixes(graph: ModelGraph, state: TrainState, batches: Sequence[Batch],
                            ctx: StepContext) -> tuple[list[dict], str]:
    """Per batch, the node outputs up to the shared representation (no gradient), and
    the representation's node name."""
    tasks = list(dict.fromkeys(t for _, Y, _ in batches for t in Y if t in graph.op_sequences))
    representation = shared_representation(graph, tasks)
    params = state.params if ctx.compute_dtype is None else cast_floats(
        state.params, ctx.compute_dtype)
    variables = {"params": params, **state.model_state}
    prefixes = []
    for index, (X_dict, Y_dict, _) in enumerate(batches):
        if ctx.compute_dtype is not None:
            X_dict = cast_floats(X_dict, ctx.compute_dtype)
        names = [t for t in Y_dict if t in graph.op_sequences]
        prefix, _ = apply_ops(graph, variables, X_dict, names, train=True,
                              rng=batch_rng(ctx.rng, len(batches), index),
                              until=representation)
        prefixes.append(jax.lax.stop_gradient(prefix))
    return prefixes, representation


def shared_task_grads(graph: ModelGraph, state: TrainState, batches: Sequence[Batch],
                      ctx: StepContext, modules: Sequence[str]) -> PyTree:
    """Per-task gradients [T, ...] of the ``modules`` parameters only (diagnostics).

    For steps whose method does not compute per-task gradients (the plain summed loss,
    loss weighting, MGDA-UB): each task present in the batches is differentiated through
    the batches that carry it, with respect to ``modules`` only (the other parameters are
    constants), with the step's dropout keys. That is one more forward and backward pass
    per task (as ``per_task_grads``); a task absent from every batch gets zeros without
    any pass. Under pmap the gradients are summed across devices.

    Args:
      graph, state, batches, ctx: as the gradient functions.
      modules: the module names to differentiate (keys of ``state.params``).

    Returns:
      ``{module: [T, ...] leaves}``: task t's gradient of its loss (``task_loss_vector``
      entry) in row t, graph order.
    """
    shared = {module: state.params[module] for module in modules}
    others = {module: tree for module, tree in state.params.items() if module not in shared}
    present = {task for _, Y_dict, _ in batches for task in Y_dict}
    rows = []
    for index, task in enumerate(graph.task_names):
        if task not in present:
            rows.append(jax.tree.map(jnp.zeros_like, shared))
            continue

        def task_loss(shared_params: PyTree, task: str = task, index: int = index
                      ) -> jax.Array:
            _, merged, _ = forward_terms(graph, ctx, batches, {**others, **shared_params},
                                         state.model_state, only_task=task)
            return task_loss_vector(graph, merged, ctx.counts)[index]

        rows.append(jax.grad(task_loss)(shared))
    task_grads = jax.tree.map(lambda *g: jnp.stack(g), *rows)
    if ctx.axis_name is not None:
        task_grads = jax.lax.psum(task_grads, ctx.axis_name)
    return task_grads
