"""The pure train steps: a ``TrainState`` pytree in, a ``TrainState`` and metrics out.

    state = TrainState.create(variables, optax.adam(1e-2), jax.random.PRNGKey(0))
    step = jax.jit(functools.partial(train_step, graph), donate_argnums=0)
    for batch in loader:                  # a DictDataLoader: fixed shapes, one compile
        X, Y = batch
        state, metrics = step(state, X, Y, batch.mask)

(README's "Your own loop" runs this in full.)

One family of short steps over one set of helpers (``gradients.py``):

- ``plain_step``: the ``loss_weight``-weighted sum of the task means (no balancer).
- ``balanced_step``: a ``Balancer`` combines the tasks' losses or gradients.
- ``train_step_on`` picks one of the two; ``train_step`` runs it on one batch.
- ``family_step`` (``family_train_step``): one task of a ``TaskFamily``, one program
  for all its members.

Each computes a gradient and hands it to ``apply_update`` (``update.py``: the optimizer;
modules no task of the batch runs keep their weights and moments). The accumulating
wrappers the Trainer compiles, and the fused scan, are in ``accumulate.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ..buckets import BucketShapes, at_bucket_shape
from ..model import ModelGraph, PyTree, active_mask, losses_from_outputs
from ..signatures import TaskFamily, apply_family, member_model_state, member_variables
from .gradients import (
    Batch,
    StepContext,
    StepGrads,
    cast_floats,
    per_task_grads,
    plain_grads,
    representation_grads,
    shared_task_grads,
    step_context,
    step_rngs,
    weighted_grads,
)
from .state import PRECISIONS, TrainState, make_optimizer
from .update import apply_update, finish_step, keep_members, without_optimizer_state

__all__ = ["TrainState", "apply_update", "balanced_step", "diagnosed_step", "family_step",
           "family_train_step", "gradient_function", "make_optimizer", "plain_step",
           "train_step", "train_step_on"]


def at_shape(grads: Callable[..., StepGrads], shapes: BucketShapes | None, shape: Any
             ) -> Callable[..., StepGrads]:
    """``grads`` computed at the bucket shape ``shapes[shape]`` of a batch sent at its
    loader's longest (``buckets.at_bucket_shape``); ``grads`` itself if ``shapes`` is None.

    Only the forward and backward passes are switched: their outputs (gradients, losses,
    statistics) do not depend on the lengths, and the optimizer update after them is
    compiled once (a switch over whole steps would copy the state through every branch).
    """
    if shapes is None:
        return grads

    def at(graph: ModelGraph, state: TrainState, batches: Sequence[Batch],
           ctx: StepContext) -> StepGrads:
        (X_dict, Y_dict, mask), = batches

        def run(X_cut: Mapping[str, Any], state: TrainState) -> StepGrads:
            return grads(graph, state, ((X_cut, Y_dict, mask),), ctx)

        return at_bucket_shape(shapes, shape, run, X_dict, without_optimizer_state(state))

    return at


# --- the steps ------------------------------------------------------------------------------
def plain_step(graph: ModelGraph, state: TrainState, batches: Sequence[Batch],
               axis_name: Any = None, skip_inactive: bool = True,
               shapes: BucketShapes | None = None, shape: Any = None
               ) -> tuple[TrainState, dict[str, Any]]:
    """One update with the summed loss (``state.balancer`` is ignored); as ``train_step_on``."""
    ctx = step_context(graph, state, batches, axis_name)
    return finish_step(graph, state, batches, ctx,
                       at_shape(plain_grads, shapes, shape)(graph, state, batches, ctx),
                       skip_inactive)


def balanced_step(graph: ModelGraph, state: TrainState, batches: Sequence[Batch],
                  axis_name: Any = None, skip_inactive: bool = True,
                  shapes: BucketShapes | None = None, shape: Any = None
                  ) -> tuple[TrainState, dict[str, Any]]:
    """One update whose gradient ``state.balancer`` combines; as ``train_step_on``.

    Loss-weighting methods pull their weights back in one backward pass; gradient
    methods get per-task gradients, w.r.t. the parameters or (MGDA-UB,
    ``representation_grads``) w.r.t. the shared representation.
    """
    balancer = state.balancer
    if balancer is None:
        raise ValueError("balanced_step needs a state with a balancer (TrainState.create("
                         "..., balancer=make_balancer(...))); got balancer=None: use "
                         "plain_step")
    ctx = step_context(graph, state, batches, axis_name)
    return finish_step(graph, state, batches, ctx,
                       at_shape(gradient_function(state), shapes, shape)(
                           graph, state, batches, ctx), skip_inactive)


def gradient_function(state: TrainState) -> Callable[..., StepGrads]:
    """The gradient function of the state's method: ``plain_grads`` without a balancer,
    ``weighted_grads`` (loss weighting), ``representation_grads`` (MGDA-UB) or
    ``per_task_grads`` (gradient methods)."""
    balancer = state.balancer
    if balancer is None:
        return plain_grads
    if not balancer.needs_task_grads:
        return weighted_grads
    if balancer.representation_grads:
        return representation_grads
    return per_task_grads


def train_step_on(
    graph: ModelGraph,
    state: TrainState,
    batches: Sequence[Batch],
    axis_name: Any = None,
    skip_inactive: bool = True,
    shapes: BucketShapes | None = None,
    shape: Any = None,
) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer update on several batches at once (e.g. one per task loader).

    Per task, the masked mean runs over the active rows of all the batches that carry it.
    Without a balancer the loss is the ``loss_weight``-weighted sum of the task means
    (``plain_step``); with one, the per-task losses [T] (graph order, 0 for absent tasks)
    and, for gradient methods, the per-task gradients go to ``state.balancer``, which
    returns the gradient for the optimizer (``balanced_step``).

    Args:
      graph: the task graph (static).
      state: the current TrainState.
      batches: ``(X_dict, Y_dict, mask)`` triples; their shapes may differ.
      axis_name: the pmap axis, as in ``train_step``.
      skip_inactive: leave the state unchanged when no batch has an active row. A caller
        that never passes such batches (the Trainer drops them on the host) sets False
        and saves the select over the whole state that this costs.
      shapes, shape: for one batch whose variable-length inputs come at its loader's
        longest bucket: the loader's bucket shapes (static) and the batch's own (traced
        int32): the passes run at that shape's lengths (``at_shape``).

    Returns:
      (state, metrics): metrics["batch_terms"] lists, per batch, task -> (loss sum,
      count); metrics["loss"] is the combined loss; metrics["weights"] the balancer's
      task weights [T] (ones without a balancer).
    """
    step = plain_step if state.balancer is None else balanced_step
    return step(graph, state, batches, axis_name, skip_inactive, shapes, shape)


def diagnosed_step(graph: ModelGraph, state: TrainState, batches: Sequence[Batch],
                   modules: Sequence[str], axis_name: Any = None
                   ) -> tuple[TrainState, dict[str, Any]]:
    """``train_step_on(..., skip_inactive=False)`` that also returns the per-task
    gradients on ``modules`` (the interference diagnostics' input).

    The update is the one ``train_step_on`` makes. Gradient methods' own per-task
    gradients are reused; otherwise ``shared_task_grads`` computes them (one more
    forward and backward pass per task, on the state before the update).

    Args:
      graph, state, batches, axis_name: as ``train_step_on``.
      modules: the shared modules (``diagnostics.shared_modules``).

    Returns:
      (state, metrics): ``train_step_on``'s metrics plus ``task_grads``
      (``{module: [T, ...]}``, summed across devices) and ``task_mask`` ([T] bool).
    """
    ctx = step_context(graph, state, batches, axis_name)
    out = gradient_function(state)(graph, state, batches, ctx)
    if out.task_grads is not None:
        task_grads = {module: out.task_grads[module] for module in modules}
    else:
        task_grads = shared_task_grads(graph, state, batches, ctx, modules)
    new_state, metrics = finish_step(graph, state, batches, ctx, out, skip_inactive=False)
    return new_state, {**metrics, "task_grads": task_grads, "task_mask": ctx.task_mask}


def train_step(
    graph: ModelGraph,
    state: TrainState,
    X_dict: Mapping[str, jax.Array],
    Y_dict: Mapping[str, jax.Array],
    mask: jax.Array,
    axis_name: Any = None,
) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer update on the batch's tasks.

    The loss is the sum over the batch's tasks of ``loss_weight * masked mean loss``
    (rows with label -1 and padded rows excluded). A batch with no active row leaves the
    state unchanged, as Snorkel skips its backward pass. Modules that none of the batch's
    tasks use keep their parameters and optimizer moments, as torch leaves parameters
    without a gradient alone (optax's update count, used for bias correction, is global).

    Args:
      graph: the task graph (static).
      state: the current TrainState.
      X_dict: input name -> [B, ...].
      Y_dict: label name -> [B] ints or [B, K] probabilities; names that are tasks train.
      mask: [B] bool, False on padded rows.
      axis_name: under ``jax.pmap``, the device axis name: the means then run over the
        rows of all devices and the gradients are summed across them.

    Returns:
      (state, metrics): metrics["terms"] maps task -> (loss sum, active count) of this
      batch (this device's share under pmap); metrics["loss"] is the summed task loss.
    """
    state, metrics = train_step_on(graph, state, ((X_dict, Y_dict, mask),), axis_name)
    return state, {"terms": metrics["batch_terms"][0], "loss": metrics["loss"]}


# --- one task of a family: one program for all members -------------------------------------
def family_loss(params: PyTree, graph: ModelGraph, family: TaskFamily, state: TrainState,
                X_dict: Mapping[str, jax.Array], labels: jax.Array, mask: jax.Array,
                member: jax.Array, rng: jax.Array, count: jax.Array, in_view: bool
                ) -> tuple[jax.Array, tuple]:
    """The member's weighted mean loss, and aux ((loss sum, active count), model state)."""
    compute_dtype = PRECISIONS[state.precision]
    if compute_dtype is not None:
        params = cast_floats(params, compute_dtype)
        X_dict = cast_floats(X_dict, compute_dtype)
    view = {"params": params, **state.model_state}
    if not in_view:
        view = member_variables(family, view, member)
    outputs, view = apply_family(graph, family, view, X_dict, member, train=True, rng=rng)
    terms = losses_from_outputs(graph, outputs, {family.representative: labels}, mask)
    loss_sum, active = terms[family.representative]
    weights = jnp.asarray([graph.loss_weights[t] for t in family.tasks], jnp.float32)
    loss = jnp.zeros((), jnp.float32) + weights[member] * loss_sum / jnp.maximum(count, 1.0)
    return loss, ((loss_sum, active), {col: tree for col, tree in view.items()
                                        if col != "params"})


def family_step(
    graph: ModelGraph,
    family: TaskFamily,
    state: TrainState,
    X_dict: Mapping[str, jax.Array],
    labels: jax.Array,
    mask: jax.Array,
    member: jax.Array,
    axis_name: Any = None,
    in_view: bool = False,
    shapes: BucketShapes | None = None,
    shape: Any = None,
) -> tuple[TrainState, dict[str, Any]]:
    """``train_step`` on a batch of one task of ``family``: one program for all members.

    The same update as ``train_step(graph, state, X_dict, {task: labels}, mask)`` for
    ``task = family.tasks[member]`` (the plain summed loss, no balancer): the member's
    weights are read from the stacked slot modules inside the step, and the modules of
    the other members, like every module the task does not run, keep their parameters
    and optimizer moments. The caller passes batches with an active row (the state is
    updated unconditionally, as ``train_step_on(..., skip_inactive=False)``).

    Args:
      graph: the task graph (static).
      family: the task's family (static).
      state: the current TrainState (``state.balancer`` must be None).
      X_dict: input name -> [B, ...], the keys the family reads.
      labels: [B] int labels (-1 = none) or [B, K] probabilities of the task.
      mask: [B] bool, False on padded rows.
      member: int32 scalar, the task's index in ``family.tasks`` (traced).
      axis_name: the pmap axis, as in ``train_step``.
      in_view: the state is already the member's view (``signatures.view_of`` of params,
        model state and optimizer state): it holds only the modules the task runs, under
        the representative's names, so the program's size does not grow with the number
        of members; the caller writes the result back (``signatures.write_back``).
        Otherwise the state is the whole model's, and the members' weights are stacked
        and indexed inside the step.
      shapes, shape: X_dict at the loader's longest bucket shape, passes run at
        ``shapes[shape]``'s lengths (as ``train_step_on``'s).

    Returns:
      (state, metrics): metrics["terms"] is the task's (loss sum, active count) of this
      batch (this device's share under pmap); metrics["loss"] the task's weighted loss.
    """
    if state.balancer is not None:
        raise ValueError(f"family_train_step trains with the plain summed loss; the state "
                         f"has balancer {state.balancer!r}: use train_step_on")
    rng, _ = step_rngs(state, axis_name)
    count = jnp.zeros((), jnp.float32) + jnp.sum(active_mask(labels, mask))
    if axis_name is not None:
        count = jax.lax.psum(count, axis_name)

    def passes(X_dict: Mapping[str, Any], state: TrainState) -> tuple:
        return jax.value_and_grad(family_loss, has_aux=True)(
            state.params, graph, family, state, X_dict, labels, mask, member, rng, count,
            in_view)

    (loss, (terms, view_state)), grads = (
        passes(X_dict, state) if shapes is None else
        at_bucket_shape(shapes, shape, passes, dict(X_dict), without_optimizer_state(state)))
    model_state = view_state if in_view else member_model_state(
        family, state.model_state, view_state, member)
    if axis_name is not None:
        grads = jax.lax.psum(grads, axis_name)
        loss = jax.lax.psum(loss, axis_name)
        model_state = jax.lax.pmean(model_state, axis_name)
    keep = None
    if not in_view:
        used = {graph.nodes[node_id].module_name
                for node_id in graph.task_nodes[family.representative]}
        unused = set(state.params) - (used | set(family.member_modules))

        def keep(new: PyTree, old: PyTree) -> PyTree:
            return keep_members(new, old, unused, family.member_modules, member)
    return apply_update(state, grads, keep, model_state=model_state), {"terms": terms,
                                                                      "loss": loss}


#: The name README and earlier releases use for ``family_step``.
family_train_step = family_step
