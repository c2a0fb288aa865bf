"""The pure train step: a ``TrainState`` pytree in, a ``TrainState`` and metrics out.

    state = TrainState.create(variables, optax.adam(1e-2), jax.random.PRNGKey(0))
    step = jax.jit(functools.partial(train_step, graph), donate_argnums=0)
    for batch in loader:                  # a DictDataLoader: fixed shapes, one compile
        X, Y = batch
        state, metrics = step(state, X, Y, batch.mask)

(README's "Your own loop" runs this in full.)

``train_step_on`` takes several batches at once (one per task loader, as the "mixed"
batch scheduler gives them) and a ``Balancer`` that combines the tasks' gradients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ..model import (
    ModelGraph,
    PyTree,
    active_mask,
    apply_ops,
    losses_from_outputs,
    shared_representation,
    task_loss_terms,
    total_loss,
)
from ..signatures import TaskFamily, apply_family, member_model_state, member_variables
from .balancers import balanced_grads
from .state import PRECISIONS, TrainState, make_optimizer

__all__ = ["TrainState", "family_train_step", "make_optimizer", "train_step",
           "train_step_on"]

Batch = tuple[Mapping[str, jax.Array], Mapping[str, jax.Array], jax.Array]


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


def _cast_floats(tree: PyTree, dtype: Any) -> PyTree:
    def cast(x: Any) -> Any:
        return x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x
    return jax.tree.map(cast, tree)


def train_step_on(
    graph: ModelGraph,
    state: TrainState,
    batches: Sequence[Batch],
    axis_name: Any = None,
    skip_inactive: bool = True,
) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer update on several batches at once (e.g. one per task loader).

    Per task, the masked mean runs over the active rows of all the batches that carry it.
    Without a balancer the loss is the ``loss_weight``-weighted sum of the task means (as
    ``train_step``); with one, the per-task losses [T] (graph order, 0 for absent tasks)
    and, for gradient methods, the per-task gradients go to ``state.balancer``, which
    returns the gradient for the optimizer (``balancers.balanced_grads``).

    Args:
      graph: the task graph (static).
      state: the current TrainState.
      batches: ``(X_dict, Y_dict, mask)`` triples; their shapes may differ.
      axis_name: the pmap axis, as in ``train_step``.
      skip_inactive: leave the state unchanged when no batch has an active row. A caller
        that never passes such batches (the Trainer drops them on the host) sets False
        and saves the select over the whole state that this costs.

    Returns:
      (state, metrics): metrics["batch_terms"] lists, per batch, task -> (loss sum,
      count); metrics["loss"] is the combined loss; metrics["weights"] the balancer's
      task weights [T] (ones without a balancer).
    """
    rng = jax.random.fold_in(state.rng, state.step)
    balancer_rng = rng  # identical on every device, as PCGrad's task order must be
    if axis_name is not None:  # each device draws its own dropout masks
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    compute_dtype = PRECISIONS[state.precision]

    # Active rows per task follow from the labels alone: the divisors of the task means
    # (global under pmap) and which tasks are present, known before any forward pass.
    counts = {task: jnp.zeros((), jnp.float32) for task in graph.task_names}
    for _, Y_dict, mask in batches:
        for task, labels in Y_dict.items():
            if task in counts:
                counts[task] = counts[task] + jnp.sum(active_mask(labels, mask))
    if axis_name is not None:
        counts = jax.lax.psum(counts, axis_name)

    def forward(params: PyTree, model_state: PyTree, only_task: str | None = None
                ) -> tuple[list, dict, PyTree]:
        """Loss terms per batch (only ``only_task``'s, if given) and the merged terms."""
        if compute_dtype is not None:
            params = _cast_floats(params, compute_dtype)
        batch_terms: list[dict] = []
        for index, (X_dict, Y_dict, mask) in enumerate(batches):
            if only_task is not None:
                if only_task not in Y_dict:
                    batch_terms.append({})
                    continue
                Y_dict = {only_task: Y_dict[only_task]}
            if compute_dtype is not None:
                X_dict = _cast_floats(X_dict, compute_dtype)
            batch_rng = rng if len(batches) == 1 else jax.random.fold_in(rng, index)
            terms, variables = task_loss_terms(
                graph, {"params": params, **model_state}, X_dict, Y_dict, mask,
                train=True, rng=batch_rng)
            model_state = {col: tree for col, tree in variables.items() if col != "params"}
            batch_terms.append(terms)
        merged: dict[str, tuple[jax.Array, jax.Array]] = {}
        for terms in batch_terms:
            for task, (loss_sum, count) in terms.items():
                if task in merged:
                    loss_sum, count = merged[task][0] + loss_sum, merged[task][1] + count
                merged[task] = (loss_sum, count)
        return batch_terms, merged, model_state

    def task_losses(merged: dict) -> jax.Array:
        return jnp.stack([
            graph.loss_weights[task] * merged[task][0] / jnp.maximum(counts[task], 1.0)
            if task in merged else jnp.zeros((), jnp.float32)
            for task in graph.task_names
        ])

    task_mask = jnp.stack([counts[task] > 0 for task in graph.task_names])
    if state.balancer is None:
        def loss_fn(params: PyTree) -> tuple[jax.Array, tuple]:
            batch_terms, merged, model_state = forward(params, state.model_state)
            return total_loss(graph, merged, counts), (batch_terms, model_state)

        (loss, (batch_terms, model_state)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        if axis_name is not None:
            grads = jax.lax.psum(grads, axis_name)
            loss = jax.lax.psum(loss, axis_name)
        weights = jnp.ones(len(graph.task_names), jnp.float32)
        balancer_state = state.balancer_state
    elif not state.balancer.needs_task_grads:
        # Loss weighting: one forward, one backward with the weights as cotangent.
        def loss_vector(params: PyTree) -> tuple[jax.Array, tuple]:
            batch_terms, merged, model_state = forward(params, state.model_state)
            return task_losses(merged), (batch_terms, model_state)

        out = balanced_grads(
            state.balancer, loss_vector, state.params, state.balancer_state,
            rng=balancer_rng, task_mask=task_mask, has_aux=True, axis_name=axis_name)
        grads, weights, balancer_state = out.grads, out.weights, out.state
        batch_terms, model_state = out.aux
        loss = jnp.sum(out.weights * out.task_losses)
    elif state.balancer.representation_grads:
        batch_terms, model_state, grads, weights, balancer_state, loss = _upper_bound_step(
            graph, state, batches, forward, task_losses, task_mask, balancer_rng, rng,
            compute_dtype, axis_name)
    else:
        # Gradient methods: each task is differentiated through the batches that carry it
        # only, so T tasks in T batches cost T forward/backward passes of one batch each
        # (as the summed loss does), not T backward passes through every batch.
        model_state, grads_per_task, losses, terms_per_task = state.model_state, [], [], []
        for task in graph.task_names:
            def task_loss(params: PyTree, model_state: PyTree, task: str = task) -> tuple:
                batch_terms, merged, new_state = forward(params, model_state, only_task=task)
                return task_losses(merged)[graph.task_names.index(task)], (batch_terms,
                                                                          new_state)

            (loss_t, (terms_t, model_state)), grad_t = jax.value_and_grad(
                task_loss, has_aux=True)(state.params, model_state)
            grads_per_task.append(grad_t)
            losses.append(loss_t)
            terms_per_task.append(terms_t)
        task_grads = jax.tree.map(lambda *g: jnp.stack(g), *grads_per_task)
        losses = jnp.stack(losses)
        if axis_name is not None:
            task_grads = jax.lax.psum(task_grads, axis_name)
            losses = jax.lax.psum(losses, axis_name)
        losses = jax.lax.stop_gradient(losses)
        grads, weights, balancer_state = state.balancer.update(
            losses, task_grads, state.balancer_state, state.params, balancer_rng, task_mask)
        batch_terms = [{task: terms for per_task in terms_per_task
                        for task, terms in per_task[index].items()}
                       for index in range(len(batches))]
        loss = jnp.sum(weights * losses)
    if axis_name is not None:
        # Running statistics are averaged so replicas stay identical.
        model_state = jax.lax.pmean(model_state, axis_name)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    unused = set(state.params) - _modules_used(graph, batches)
    if unused:
        # As torch skips parameters whose gradient is None, modules outside this batch's
        # tasks keep their weights and optimizer moments (momentum would move them).
        params = {name: state.params[name] if name in unused else tree
                  for name, tree in params.items()}
        opt_state = _keep_modules(opt_state, state.opt_state, unused)
    updated = state.replace(step=state.step + 1, params=params, model_state=model_state,
                            opt_state=opt_state, balancer_state=balancer_state)
    if not skip_inactive:
        return updated, {"batch_terms": batch_terms, "loss": loss, "weights": weights}
    new_state = jax.lax.cond(jnp.any(task_mask), lambda: updated, lambda: state)
    return new_state, {"batch_terms": batch_terms, "loss": loss, "weights": weights}


def _upper_bound_step(graph: ModelGraph, state: TrainState, batches: Sequence[Batch],
                      forward: Any, task_losses: Any, task_mask: jax.Array,
                      balancer_rng: jax.Array, rng: jax.Array, compute_dtype: Any,
                      axis_name: Any) -> tuple:
    """MGDA-UB: task weights from the gradients w.r.t. the shared representation.

    The representation is the output of the last op every task of the batches runs; the
    task gradients with respect to it (stacked over the batches) are cheap, as only the
    task heads are differentiated. The update is then the gradient of
    ``sum_t weights_t L_t`` through the whole model.
    """
    if axis_name is not None:
        raise ValueError("MGDA-UB (balancer_config upper_bound=True) does not run under "
                         "pmap; use parallel='sharded' (same result as one device) or "
                         "parallel='single'")
    tasks = list(dict.fromkeys(t for _, Y, _ in batches for t in Y if t in graph.op_sequences))
    representation = shared_representation(graph, tasks)
    params = state.params if compute_dtype is None else _cast_floats(state.params,
                                                                      compute_dtype)
    variables = {"params": params, **state.model_state}
    prefixes = []
    for index, (X_dict, Y_dict, _) in enumerate(batches):
        if compute_dtype is not None:
            X_dict = _cast_floats(X_dict, compute_dtype)
        batch_rng = rng if len(batches) == 1 else jax.random.fold_in(rng, index)
        names = [t for t in Y_dict if t in graph.op_sequences]
        prefix, _ = apply_ops(graph, variables, X_dict, names, train=True, rng=batch_rng,
                              until=representation)
        prefixes.append(jax.lax.stop_gradient(prefix))

    def head_losses(reps: list) -> jax.Array:
        merged: dict[str, tuple] = {}
        for index, ((X_dict, Y_dict, mask), prefix) in enumerate(zip(batches, prefixes,
                                                                    strict=True)):
            batch_rng = rng if len(batches) == 1 else jax.random.fold_in(rng, index)
            overrides = {**prefix, representation: reps[index]}
            terms, _ = task_loss_terms(graph, variables, X_dict, Y_dict, mask, train=True,
                                       rng=batch_rng, overrides=overrides)
            for task, (loss_sum, count) in terms.items():
                if task in merged:
                    loss_sum, count = merged[task][0] + loss_sum, merged[task][1] + count
                merged[task] = (loss_sum, count)
        return task_losses(merged)

    reps = [prefix[representation] for prefix in prefixes]
    losses, vjp_fn = jax.vjp(head_losses, reps)
    basis = jnp.eye(losses.shape[0], dtype=losses.dtype)
    (rep_grads,) = jax.vmap(vjp_fn)(basis)  # per batch: [T, B, ...]
    _, weights, balancer_state = state.balancer.update(
        jax.lax.stop_gradient(losses), rep_grads, state.balancer_state, state.params,
        balancer_rng, task_mask)
    weights = jax.lax.stop_gradient(weights)

    def weighted(params: PyTree) -> tuple[jax.Array, tuple]:
        batch_terms, merged, model_state = forward(params, state.model_state)
        return jnp.sum(weights * task_losses(merged)), (batch_terms, model_state)

    (loss, (batch_terms, model_state)), grads = jax.value_and_grad(
        weighted, has_aux=True)(state.params)
    return batch_terms, model_state, grads, weights, balancer_state, loss


def _modules_used(graph: ModelGraph, batches: Sequence[Batch]) -> set[str]:
    tasks = [name for _, Y_dict, _ in batches for name in Y_dict if name in graph.op_sequences]
    return {op.module_name for op in graph.ops_for(list(dict.fromkeys(tasks)))}


def _keep_modules(new: PyTree, old: PyTree, modules: set[str]) -> PyTree:
    """``new`` with the leaves under a params-mirroring ``[module]`` key taken from ``old``.

    Optimizer states mirror the params tree (Adam's ``mu``/``nu``, momentum traces) below
    NamedTuple fields; the first dict key on a leaf's path is then a module name.
    """
    def pick(path: tuple, new_leaf: Any, old_leaf: Any) -> Any:
        keys = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
        return old_leaf if keys and keys[0] in modules else new_leaf

    return jax.tree_util.tree_map_with_path(pick, new, old)


def family_train_step(
    graph: ModelGraph,
    family: TaskFamily,
    state: TrainState,
    X_dict: Mapping[str, jax.Array],
    labels: jax.Array,
    mask: jax.Array,
    member: jax.Array,
    axis_name: Any = None,
    in_view: bool = False,
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

    Returns:
      (state, metrics): metrics["terms"] is the task's (loss sum, active count) of this
      batch (this device's share under pmap); metrics["loss"] the task's weighted loss.
    """
    if state.balancer is not None:
        raise ValueError(f"family_train_step trains with the plain summed loss; the state "
                         f"has balancer {state.balancer!r}: use train_step_on")
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    compute_dtype = PRECISIONS[state.precision]
    count = jnp.zeros((), jnp.float32) + jnp.sum(active_mask(labels, mask))
    if axis_name is not None:
        count = jax.lax.psum(count, axis_name)
    weights = jnp.asarray([graph.loss_weights[t] for t in family.tasks], jnp.float32)
    representative = family.representative

    def loss_fn(params: PyTree) -> tuple[jax.Array, tuple]:
        X = X_dict
        if compute_dtype is not None:
            params = _cast_floats(params, compute_dtype)
            X = _cast_floats(X, compute_dtype)
        view = {"params": params, **state.model_state}
        if not in_view:
            view = member_variables(family, view, member)
        outputs, view = apply_family(graph, family, view, X, member, train=True, rng=rng)
        terms = losses_from_outputs(graph, outputs, {representative: labels}, mask)
        loss_sum, active = terms[representative]
        loss = jnp.zeros((), jnp.float32) + weights[member] * loss_sum / jnp.maximum(count,
                                                                                      1.0)
        model_state = {col: tree for col, tree in view.items() if col != "params"}
        return loss, ((loss_sum, active), model_state)

    (loss, (terms, view_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    model_state = view_state if in_view else member_model_state(
        family, state.model_state, view_state, member)
    if axis_name is not None:
        grads = jax.lax.psum(grads, axis_name)
        loss = jax.lax.psum(loss, axis_name)
        model_state = jax.lax.pmean(model_state, axis_name)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if in_view:
        return state.replace(step=state.step + 1, params=params, model_state=model_state,
                             opt_state=opt_state), {"terms": terms, "loss": loss}
    used = {graph.nodes[node_id].module_name
            for node_id in graph.task_nodes[representative]} | set(family.member_modules)
    unused = set(state.params) - used
    owner = family.member_modules
    params = _keep_members(params, state.params, unused, owner, member)
    opt_state = _keep_members(opt_state, state.opt_state, unused, owner, member)
    updated = state.replace(step=state.step + 1, params=params, model_state=model_state,
                            opt_state=opt_state)
    return updated, {"terms": terms, "loss": loss}


def _keep_members(new: PyTree, old: PyTree, unused: set[str], owner: Mapping[str, int],
                  member: jax.Array) -> PyTree:
    """``_keep_modules`` for a family step: ``unused`` modules and the slot modules of the
    members other than ``member`` (``owner``: slot module -> its member) keep ``old``."""
    def pick(path: tuple, new_leaf: Any, old_leaf: Any) -> Any:
        keys = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
        if not keys:
            return new_leaf
        if keys[0] in unused:
            return old_leaf
        if keys[0] in owner:
            return jnp.where(member == owner[keys[0]], new_leaf, old_leaf)
        return new_leaf

    return jax.tree_util.tree_map_with_path(pick, new, old)
