"""UPGrad: each task gradient projected onto the dual cone of all of them, averaged."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .base import Balancer, PyTree, SharedSpec, empty_state, weighted_task_sum
from .gradient import check_iters, prepare
from .weighting import check_positive

_HIGHEST = jax.lax.Precision.HIGHEST


def dual_cone_weights(gram: jax.Array, preferences: jax.Array, num_iters: int = 20
                      ) -> jax.Array:
    """Weights of the projections of ``J^T u_i`` onto the dual cone of the rows of ``J``.

    Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization",
    Proposition 1: given ``G = J J^T`` (positive definite), the projection of ``J^T u``
    onto ``{x : J x >= 0}`` is ``J^T w`` with ``w = argmin_{v >= u} v^T G v``. Each of
    these small bound-constrained QPs is solved by a fixed number of projected Newton
    steps (Bertsekas 1982) in place of the reference code's quadprog, which does not
    jit: from the feasible ``v = u``, the indices at their bound whose gradient pushes
    outwards are held, a Newton step is taken on the others, and of the projected
    points ``max(u, v + 2^-k d)`` (k = 0..20) and one projected gradient step the best
    is kept (so the objective never increases). Once the held set is the solution's, one
    step is exact, so few iterations suffice even for nearly dependent gradients, where
    first-order methods crawl.

    Args:
      gram: [T, T] symmetric positive definite matrix G.
      preferences: [P, T] the vectors ``u_i`` to project, one per row.
      num_iters: projected Newton iterations (fixed, so it jits).

    Returns:
      [P, T]: row i is ``w_i`` (``w_i >= u_i``).
    """
    gram = gram.astype(jnp.float32)
    num_tasks = gram.shape[0]
    eye = jnp.eye(num_tasks, dtype=jnp.float32)
    largest = jnp.maximum(jnp.linalg.eigvalsh(gram)[-1], 1e-30)
    step_sizes = 2.0 ** -jnp.arange(21, dtype=jnp.float32)

    def objective(v: jax.Array) -> jax.Array:
        return jnp.dot(v, jnp.matmul(gram, v, precision=_HIGHEST), precision=_HIGHEST)

    def solve(lower: jax.Array) -> jax.Array:
        def step(_: int, v: jax.Array) -> jax.Array:
            gradient = jnp.matmul(gram, v, precision=_HIGHEST)
            held = (v <= lower) & (gradient > 0)
            free_pair = ~held[:, None] & ~held[None, :]
            hessian = jnp.where(free_pair, gram, eye)
            direction = -jnp.linalg.solve(hessian, jnp.where(held, 0.0, gradient))
            candidates = jnp.maximum(lower, v[None, :] + step_sizes[:, None] * direction)
            candidates = jnp.concatenate(
                [candidates, jnp.maximum(lower, v - gradient / largest)[None, :]])
            values = jax.vmap(objective)(candidates)
            values = jnp.where(jnp.isfinite(values), values, jnp.inf)
            best = jnp.argmin(values)
            return jnp.where(values[best] < objective(v), candidates[best], v)

        return jax.lax.fori_loop(0, num_iters, step, lower)

    return jax.vmap(solve)(preferences.astype(jnp.float32))


def upgrad_weights(gram: jax.Array, mask: jax.Array | None = None, num_iters: int = 20,
                   reg_eps: float = 1e-4) -> jax.Array:
    """UPGrad's weights: ``sum_i w_i`` of the dual-cone projections of ``g_i / T``.

    The Gram matrix is normalised by its trace (the squared Frobenius norm of the
    Jacobian) and ``reg_eps * I`` is added, as the reference code does, so that it is
    positive definite; then ``dual_cone_weights`` with ``u_i = e_i / T``.

    Args:
      gram: [T, T] Gram matrix of the task gradients.
      mask: [T] bool of active tasks; inactive ones get weight 0 and are left out (T is
        then the number of active tasks). None = all active.
      num_iters: solver iterations.
      reg_eps: ridge on the trace-normalised Gram matrix.

    Returns:
      [T] weights (0 on inactive tasks).
    """
    num_tasks = gram.shape[0]
    mask = jnp.ones((num_tasks,), bool) if mask is None else mask.astype(bool)
    pair = mask[:, None] & mask[None, :]
    gram = jnp.where(pair, gram.astype(jnp.float32), 0.0)
    trace = jnp.trace(gram)
    eye = jnp.eye(num_tasks, dtype=jnp.float32)
    # Inactive tasks: decoupled rows with reg_eps on the diagonal (the eigenvalue range,
    # hence the solver's steps, stay those of the active tasks), preference and bound 0.
    normalised = jnp.where(pair, gram / jnp.where(trace > 0, trace, 1.0), 0.0) + reg_eps * eye
    num_active = jnp.maximum(jnp.sum(mask), 1)
    preferences = jnp.where(mask[:, None], eye / num_active, 0.0)
    weights = jnp.sum(dual_cone_weights(normalised, preferences, num_iters), axis=0)
    return jnp.where(mask, weights, 0.0)


def upgrad(*, num_iters: int = 20, reg_eps: float = 1e-4,
           shared: SharedSpec = None) -> Balancer:
    """UPGrad: the mean of the task gradients, each projected onto the dual cone.

    Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization" (TorchJD's
    ``UPGrad`` aggregator): with ``J`` the [T, P] Jacobian (task gradients on the
    ``shared`` leaves), the update is ``(1/T) sum_i pi_J(g_i)``, ``pi_J`` the projection
    onto the dual cone ``{x : J x >= 0}``; it conflicts with no task
    (``<g_t, update> >= 0``). Computed in the Gram-matrix space (``upgrad_weights``). Leaves that are
    not shared get the plain sum (TorchJD's ``mtl_backward`` gives each head its own
    task's gradient). The returned weights are the shared leaves' coefficients. Unlike
    the reference (``norm_eps``: a Gram matrix of trace below 1e-4 is treated as 0),
    only an exactly zero Gram matrix is; the solver is a fixed-iteration projected
    Newton method (see ``dual_cone_weights``) instead of quadprog. No
    representation-gradient mode: the aggregator is defined on the parameters'
    Jacobian.

    Masked tasks: weight 0; left out of the projections and the mean.

    Args:
      num_iters: projected Newton iterations of each projection's solver.
      reg_eps: ridge on the trace-normalised Gram matrix (reference default 1e-4).
      shared: which leaves are shared (see ``shared_mask``); None = all leaves.
    """
    check_iters("upgrad", num_iters)
    check_positive("upgrad", "reg_eps", reg_eps)

    def update(task_losses: jax.Array, task_grads: PyTree | None, state: PyTree,
               params: PyTree, rng: jax.Array | None = None,
               task_mask: jax.Array | None = None) -> tuple:
        del params, rng
        prep = prepare("upgrad", task_losses, task_grads, task_mask, shared)
        weights = upgrad_weights(prep.gram, prep.mask, num_iters, reg_eps)
        combined = weighted_task_sum(prep.grads, weights, prep.leaf_mask,
                                     prep.mask.astype(jnp.float32))
        return combined, weights, state

    return Balancer(empty_state, update, needs_task_grads=True)
