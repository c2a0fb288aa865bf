"""The balancer interface and the tree helpers every method shares.

A balancer is an optax-like NamedTuple of pure functions (``optax/_src/base.py``):

    balancer = make_balancer("pcgrad")
    state = balancer.init(params)
    combined, weights, state = balancer.update(task_losses, task_grads, state, params,
                                               rng, task_mask)

Loss-weighting methods (``needs_task_grads=False``) receive ``task_grads=None`` and
return ``combined=None`` plus per-task ``weights`` [T]; the caller differentiates
``sum_t weights_t * loss_t``. Gradient methods (``needs_task_grads=True``) receive
``task_grads`` with a leading task axis on every leaf ([T, ...], see ``per_task_grads``)
and return the combined gradient (no task axis). ``balanced_grads`` does either in one
call and is what a jitted train step uses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax

PyTree = Any
# Which parameter leaves are shared between tasks: None (all), module names (the
# top-level keys of a ``{module_name: params}`` tree) or a predicate on the key path.
SharedSpec = None | Sequence[str] | Callable[[tuple[str, ...]], bool]

_HIGHEST = jax.lax.Precision.HIGHEST


class InitFn(Protocol):
    """``init(params) -> state``: the balancer state, a pytree of arrays."""

    def __call__(self, params: PyTree) -> PyTree: ...


class UpdateFn(Protocol):
    """``update(task_losses, task_grads, state, params, rng, task_mask)``.

    Args:
      task_losses: [T] per-task losses (treated as constants; no gradient flows).
      task_grads: a pytree whose leaves are [T, ...] per-task gradients, or None for
        loss-weighting methods.
      state: the balancer state from ``init`` or a previous ``update``.
      params: the model parameters (no task axis); accepted for optax symmetry.
      rng: a PRNG key; required by "rlw" and "pcgrad", ignored (may be None) otherwise.
      task_mask: [T] bool, False for tasks absent from the batch; None = all present.

    Returns:
      (combined_grads, weights, new_state): the combined gradient pytree (None when
      ``task_grads`` is None), weights [T] float32 (0 on absent tasks), the new state.
    """

    def __call__(self, task_losses: jax.Array, task_grads: PyTree | None, state: PyTree,
                 params: PyTree, rng: jax.Array | None = None,
                 task_mask: jax.Array | None = None
                 ) -> tuple[PyTree | None, jax.Array, PyTree]: ...


class Balancer(NamedTuple):
    """A multi-task balancing method as pure functions (cf. ``optax.GradientTransformation``).

    Attributes:
      init: ``init(params) -> state``; the state is a pytree of arrays (jittable,
        pmappable, checkpointable) that lives in the train state.
      update: see ``UpdateFn``.
      needs_task_grads: True for gradient methods, which need per-task gradients;
        loss-weighting methods do not and must be called with ``task_grads=None``
        (``balanced_grads`` then never computes them).
      weighted_loss: for methods with learnable parameters ("uncertainty"), the pure
        objective ``weighted_loss(task_losses, balancer_params, task_mask) -> scalar``
        whose ``balancer_params`` a caller may train alongside the model; None otherwise.
      representation_grads: the method wants the task gradients with respect to the
        shared representation (MGDA-UB), not the parameters; the caller then uses only
        the returned weights and differentiates ``sum_t weights_t L_t`` itself.
    """

    init: InitFn
    update: UpdateFn
    needs_task_grads: bool
    weighted_loss: Callable[..., jax.Array] | None = None
    representation_grads: bool = False


def empty_state(params: PyTree) -> Any:
    """``init`` of a stateless method: ``optax.EmptyState()``."""
    del params
    return optax.EmptyState()


class BalancedGrads(NamedTuple):
    """What ``balanced_grads`` returns.

    Attributes:
      grads: the gradient pytree to hand to the optimizer (like ``params``).
      weights: [T] per-task weights the balancer used (0 on absent tasks).
      state: the new balancer state.
      task_losses: [T] per-task losses (summed across devices under ``axis_name``).
      aux: the loss function's auxiliary output, or None without ``has_aux``.
    """

    grads: PyTree
    weights: jax.Array
    state: PyTree
    task_losses: jax.Array
    aux: Any


def _path_names(path: tuple) -> tuple[str, ...]:
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return tuple(names)


def shared_mask(tree: PyTree, shared: SharedSpec = None) -> PyTree:
    """A pytree of Python bools, True on the leaves that are shared between tasks.

    Works on parameters and on per-task gradients alike (only key paths are read).

    Args:
      tree: a parameter pytree, e.g. ``{module_name: {...}}``, or per-task gradients.
      shared: None (every leaf is shared), a sequence of module names (a leaf is shared
        when the first key of its path is one of them), or a predicate
        ``shared(path) -> bool`` on the key path as a tuple of strings, e.g.
        ``("linear1A", "kernel")``.

    Returns:
      A pytree with the structure of ``tree`` and bool leaves.
    """
    if shared is None:
        return jax.tree.map(lambda _: True, tree)
    if isinstance(shared, str):
        raise ValueError(f"shared={shared!r}: expected a sequence of module names, "
                         "a predicate on key paths, or None")
    if callable(shared):
        predicate = shared
    else:
        names = frozenset(shared)

        def predicate(path: tuple[str, ...]) -> bool:
            return bool(path) and path[0] in names

    return jax.tree_util.tree_map_with_path(
        lambda path, _: bool(predicate(_path_names(path))), tree)


def split_shared(params: PyTree, shared: SharedSpec = None) -> tuple[PyTree, PyTree]:
    """Split ``params`` into (shared, task-specific) trees of the same structure.

    Leaves that belong to the other part are None, so ``jax.tree.leaves`` of either part
    lists only its own leaves; ``merge_shared`` puts them back together.

    Args:
      params: a parameter (or per-task gradient) pytree.
      shared: see ``shared_mask``.

    Returns:
      (shared_params, specific_params).
    """
    mask = shared_mask(params, shared)
    shared_part = jax.tree.map(lambda m, x: x if m else None, mask, params)
    specific_part = jax.tree.map(lambda m, x: None if m else x, mask, params)
    return shared_part, specific_part


def merge_shared(shared_params: PyTree, specific_params: PyTree) -> PyTree:
    """Inverse of ``split_shared``: take each leaf from whichever part is not None."""
    return jax.tree.map(lambda a, b: b if a is None else a, shared_params, specific_params,
                        is_leaf=lambda x: x is None)


def resolve_task_mask(task_mask: jax.Array | None, num_tasks: int) -> jax.Array:
    """``task_mask`` as a [T] bool array (all True when None), shape-checked."""
    if task_mask is None:
        return jnp.ones((num_tasks,), bool)
    task_mask = jnp.asarray(task_mask)
    if task_mask.shape != (num_tasks,):
        raise ValueError(f"task_mask has shape {task_mask.shape}, expected ({num_tasks},) "
                         "bools, one per task")
    return task_mask.astype(bool)


def check_task_losses(task_losses: jax.Array, num_tasks: int | None) -> jax.Array:
    """``task_losses`` as a [T] float array without gradient, shape-checked."""
    task_losses = jnp.asarray(task_losses)
    if task_losses.ndim != 1 or (num_tasks is not None and task_losses.shape[0] != num_tasks):
        expected = "[T]" if num_tasks is None else f"({num_tasks},)"
        raise ValueError(f"task_losses has shape {task_losses.shape}, expected {expected}: "
                         "one scalar loss per task")
    if not jnp.issubdtype(task_losses.dtype, jnp.floating):
        task_losses = task_losses.astype(jnp.float32)
    return jax.lax.stop_gradient(task_losses)


def num_tasks_of(task_grads: PyTree) -> int:
    """The leading (task) dimension shared by every leaf of ``task_grads``."""
    leaves = jax.tree.leaves(task_grads)
    if not leaves:
        raise ValueError("task_grads has no leaves; expected [T, ...] per-task gradients")
    sizes = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"task_grads leaves have leading dimensions {sorted(map(str, sizes))}; "
                         "every leaf needs the same leading task axis [T, ...]")
    return sizes.pop()


def mask_task_grads(task_grads: PyTree, task_mask: jax.Array) -> PyTree:
    """Zero the gradients of absent tasks (``where``, so NaNs there cannot leak)."""
    def mask_leaf(leaf: jax.Array) -> jax.Array:
        mask = task_mask.reshape((-1,) + (1,) * (leaf.ndim - 1))
        return jnp.where(mask, leaf, jnp.zeros((), leaf.dtype))

    return jax.tree.map(mask_leaf, task_grads)


def gram_matrix(task_grads: PyTree, leaf_mask: PyTree | None = None) -> jax.Array:
    """The [T, T] float32 matrix of inner products ``<g_s, g_t>`` over selected leaves.

    Every gradient method reduces to this matrix plus a weighted sum of the task
    gradients, so the per-method work is O(T^2), independent of the model size.

    Args:
      task_grads: pytree of [T, ...] per-task gradients.
      leaf_mask: optional pytree of bools (``shared_mask``); only True leaves count.
    """
    num_tasks = num_tasks_of(task_grads)
    leaves = jax.tree.leaves(task_grads)
    if leaf_mask is not None:
        leaves = [leaf for leaf, keep in zip(leaves, jax.tree.leaves(leaf_mask), strict=True)
                  if keep]
    gram = jnp.zeros((num_tasks, num_tasks), jnp.float32)
    for leaf in leaves:
        flat = leaf.reshape(num_tasks, -1).astype(jnp.float32)
        # HIGHEST: on GPUs the default f32 matmul may run in TF32, too coarse for
        # the sign tests (PCGrad) and the solvers.
        gram = gram + jnp.matmul(flat, flat.T, precision=_HIGHEST)
    return gram


def weighted_task_sum(task_grads: PyTree, weights: jax.Array,
                      leaf_mask: PyTree | None = None,
                      other_weights: jax.Array | None = None) -> PyTree:
    """``sum_t weights_t * g_t`` on every leaf; leaves with False mask use ``other_weights``.

    Elementwise multiply-and-add over the tasks rather than a matmul, so weights of
    exactly 1 give the plain sum of the task gradients.

    Args:
      task_grads: pytree of [T, ...] per-task gradients (absent tasks already zeroed).
      weights: [T] weights for the (shared) leaves.
      leaf_mask: optional pytree of bools; None means every leaf uses ``weights``.
      other_weights: [T] weights for leaves whose mask is False.

    Returns:
      A pytree like one task's gradient (no task axis).
    """
    def combine(leaf: jax.Array, w: jax.Array) -> jax.Array:
        # An unrolled sum over the (small, static) task axis: XLA:CPU reduces a leading
        # axis ~30x slower than it adds contiguous slices. With weights of exactly 1 it
        # equals ``jnp.sum(g, axis=0)`` for two tasks bit for bit.
        w = w.astype(leaf.dtype)
        total = w[0] * leaf[0]
        for task in range(1, leaf.shape[0]):
            total = total + w[task] * leaf[task]
        return total

    if leaf_mask is None:
        return jax.tree.map(lambda leaf: combine(leaf, weights), task_grads)
    return jax.tree.map(lambda keep, leaf: combine(leaf, weights if keep else other_weights),
                        leaf_mask, task_grads)


def per_task_grads(loss_fn: Callable[..., Any], params: PyTree, *args: Any,
                   has_aux: bool = False) -> tuple:
    """All per-task gradients of a [T]-vector loss in one call.

    This is ``jax.jacrev(loss_fn)(params)`` (one forward pass, then the T backward
    passes vectorised with ``jax.vmap`` over the rows of the identity) written with
    ``jax.vjp`` so that the loss values of the same forward pass come back too.

    Args:
      loss_fn: ``loss_fn(params, *args) -> task_losses [T]`` (or ``(task_losses, aux)``
        with ``has_aux``).
      params: the pytree to differentiate.
      *args: further arguments to ``loss_fn`` (not differentiated).
      has_aux: whether ``loss_fn`` returns ``(task_losses, aux)``.

    Returns:
      ``(task_losses [T], task_grads)`` or ``(task_losses, task_grads, aux)``;
      ``task_grads`` has the structure of ``params`` with a leading [T] axis on each leaf.
    """
    task_losses, vjp_fn, aux = _vjp(loss_fn, params, args, has_aux)
    task_grads = _vmapped_vjp(vjp_fn, task_losses)
    return (task_losses, task_grads, aux) if has_aux else (task_losses, task_grads)


def _vjp(loss_fn: Callable[..., Any], params: PyTree, args: tuple, has_aux: bool) -> tuple:
    fn = lambda p: loss_fn(p, *args)  # noqa: E731
    if has_aux:
        task_losses, vjp_fn, aux = jax.vjp(fn, params, has_aux=True)
    else:
        (task_losses, vjp_fn), aux = jax.vjp(fn, params), None
    if task_losses.ndim != 1:
        raise ValueError(f"loss_fn returned shape {task_losses.shape}, expected [T]: "
                         "one scalar loss per task")
    return task_losses, vjp_fn, aux


def _vmapped_vjp(vjp_fn: Callable, task_losses: jax.Array) -> PyTree:
    basis = jnp.eye(task_losses.shape[0], dtype=task_losses.dtype)
    (task_grads,) = jax.vmap(vjp_fn)(basis)
    return task_grads


def balanced_grads(balancer: Balancer, loss_fn: Callable[..., Any], params: PyTree,
                   state: PyTree, *, rng: jax.Array | None = None,
                   task_mask: jax.Array | None = None, loss_args: tuple = (),
                   has_aux: bool = False, axis_name: Any = None) -> BalancedGrads:
    """The balanced gradient of a [T]-vector loss: what a jitted train step calls.

    Gradient methods get per-task gradients (``per_task_grads``); loss-weighting
    methods get none: their weights are computed from the forward pass's losses and
    pulled back in a single backward pass (``vjp`` with cotangent ``weights``), which is
    the gradient of ``sum_t weights_t * loss_t``.

    Args:
      balancer: from ``make_balancer``.
      loss_fn: ``loss_fn(params, *loss_args) -> task_losses [T]`` (or
        ``(task_losses, aux)`` with ``has_aux``).
      params: the model parameters.
      state: the balancer state.
      rng: PRNG key for "rlw"/"pcgrad" (identical on all devices under pmap).
      task_mask: [T] bool, False for tasks absent from the batch.
      loss_args: further arguments to ``loss_fn`` (not differentiated).
      has_aux: whether ``loss_fn`` returns ``(task_losses, aux)``.
      axis_name: under ``jax.pmap``, the device axis. ``loss_fn`` then returns this
        device's share of each task loss (local loss sum / global count), losses and
        per-task gradients are summed across devices *before* balancing (the methods
        are nonlinear), and the returned ``grads`` are already summed: do not psum them
        again.

    Returns:
      ``BalancedGrads(grads, weights, state, task_losses, aux)``.
    """
    task_losses, vjp_fn, aux = _vjp(loss_fn, params, loss_args, has_aux)
    global_losses = task_losses if axis_name is None else jax.lax.psum(task_losses, axis_name)
    global_losses = jax.lax.stop_gradient(global_losses)
    if balancer.needs_task_grads:
        task_grads = _vmapped_vjp(vjp_fn, task_losses)
        if axis_name is not None:
            task_grads = jax.lax.psum(task_grads, axis_name)
        grads, weights, state = balancer.update(global_losses, task_grads, state, params,
                                                rng, task_mask)
    else:
        _, weights, state = balancer.update(global_losses, None, state, params, rng,
                                            task_mask)
        (grads,) = vjp_fn(weights.astype(task_losses.dtype))
        if axis_name is not None:
            grads = jax.lax.psum(grads, axis_name)
    return BalancedGrads(grads, weights, state, global_losses, aux)
