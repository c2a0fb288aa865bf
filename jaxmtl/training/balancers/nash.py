"""Nash-MTL: task weights from the Nash bargaining solution over the task gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .base import Balancer, PyTree, SharedSpec, empty_state, weighted_task_sum
from .gradient import check_iters, prepare
from .weighting import check_positive

_HIGHEST = jax.lax.Precision.HIGHEST


def nash_weights(gram: jax.Array, mask: jax.Array | None = None, num_iters: int = 40,
                 eps: float = 1e-6) -> jax.Array:
    """The positive solution of ``M alpha = 1 / alpha`` (Nash bargaining weights).

    Navon et al. 2022, "Multi-Task Learning as a Bargaining Game" (ICML), Eq. (3): the
    Nash bargaining direction ``d = sum_t alpha_t g_t`` has ``alpha_t <g_t, d> = 1``
    for every task. That is the stationarity condition of the strictly convex
    ``f(alpha) = alpha^T M alpha / 2 - sum_t log alpha_t`` over ``alpha > 0``, which is
    solved here by ``num_iters`` damped Newton steps (``alpha += step / (1 + lambda)``,
    ``lambda`` the Newton decrement: ``f`` is self-concordant, so every step stays
    positive and the iteration converges globally, quadratically near the solution)
    instead of the reference code's sequence of convex programs (CCP with cvxpy/ECOS),
    which does not jit. The problem is solved for ``beta_t = alpha_t sqrt(M_tt)``, which
    satisfies the same equation with the unit-diagonal ``M_st / sqrt(M_ss M_tt)`` (the
    reference code divides ``M`` by its Frobenius norm instead; this scaling also
    conditions tasks whose gradient norms differ by orders of magnitude), plus
    ``eps * I``, so that linearly dependent gradients (for which the paper's solution
    does not exist) still give finite weights.

    Args:
      gram: [T, T] Gram matrix of the task gradients.
      mask: [T] bool of active tasks; inactive ones get weight 0 and are left out.
        None = all active.
      num_iters: damped Newton iterations (fixed, so it jits).
      eps: ridge added to the unit-diagonal Gram matrix.

    Returns:
      alpha [T] > 0 on the active tasks (0 elsewhere, all 0 if none is active or every
      active gradient is 0).
    """
    num_tasks = gram.shape[0]
    mask = jnp.ones((num_tasks,), bool) if mask is None else mask.astype(bool)
    diag = jnp.diag(gram).astype(jnp.float32)
    # A zero gradient has no utility to bargain with: it is left out (weight 0).
    mask = mask & (diag > 0)
    pair = mask[:, None] & mask[None, :]
    root = jnp.sqrt(jnp.where(mask, diag, 1.0))
    # Inactive tasks become independent unit problems (alpha_t = 1), removed at the end.
    eye = jnp.eye(num_tasks, dtype=jnp.float32)
    normalised = jnp.where(pair, gram.astype(jnp.float32) / (root[:, None] * root[None, :])
                           + eps * eye, eye)
    alpha = jnp.ones((num_tasks,), jnp.float32)

    def newton_step(_: int, alpha: jax.Array) -> jax.Array:
        gradient = jnp.matmul(normalised, alpha, precision=_HIGHEST) - 1.0 / alpha
        hessian = normalised + jnp.diag(1.0 / alpha ** 2)
        step = -jnp.linalg.solve(hessian, gradient)
        decrement = jnp.sqrt(jnp.maximum(-jnp.dot(step, gradient, precision=_HIGHEST), 0.0))
        new = alpha + step / (1.0 + decrement)
        # Guards float32 round-off only; in exact arithmetic the damped step stays > 0.
        return jnp.where(jnp.all(jnp.isfinite(new)) & jnp.all(new > 0), new, alpha)

    alpha = jax.lax.fori_loop(0, num_iters, newton_step, alpha)
    return jnp.where(mask, alpha / root, 0.0)


def nash_mtl(*, num_iters: int = 40, eps: float = 1e-6, shared: SharedSpec = None) -> Balancer:
    """Nash-MTL: the Nash bargaining solution of the tasks' gradients.

    Navon et al. 2022, "Multi-Task Learning as a Bargaining Game" (ICML): the update
    ``d = sum_t alpha_t g_t`` with ``G^T G alpha = 1 / alpha`` (Gram matrix of the
    ``shared`` leaves; solver: ``nash_weights``), so every task gets the same
    "utility" ``alpha_t <g_t, d> = 1``. As the reference code back-propagates
    ``sum_t alpha_t L_t``, the weights apply to every leaf, heads included. The
    solution is scale-free: ``||d||^2 = T`` on the shared leaves whatever the gradients'
    scale. Deviations from the reference code: the weights are recomputed every step
    (its ``update_weights_every=1`` default), the fixed-iteration Newton solver above
    replaces cvxpy, and its clipping of the shared gradient (``max_norm=1``) is left to
    the Trainer's global ``grad_clip``. No representation-gradient mode: the method is
    defined (and the reference implementations run it) on the parameters.

    Masked tasks (and tasks whose shared gradient is 0): weight 0; left out of the solver.

    Args:
      num_iters: Newton iterations of the solver.
      eps: ridge on the unit-diagonal Gram matrix (keeps dependent gradients finite).
      shared: which leaves are shared (see ``shared_mask``); None = all leaves.
    """
    check_iters("nash_mtl", num_iters)
    check_positive("nash_mtl", "eps", eps)

    def update(task_losses: jax.Array, task_grads: PyTree | None, state: PyTree,
               params: PyTree, rng: jax.Array | None = None,
               task_mask: jax.Array | None = None) -> tuple:
        del params, rng
        prep = prepare("nash_mtl", task_losses, task_grads, task_mask, shared)
        weights = nash_weights(prep.gram, prep.mask, num_iters, eps)
        return weighted_task_sum(prep.grads, weights), weights, state

    return Balancer(empty_state, update, needs_task_grads=True)
