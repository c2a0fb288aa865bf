"""Small solvers on the task simplex, all in the [T, T] Gram-matrix space.

Every gradient method combines task gradients linearly, so it only needs the Gram
matrix ``M[s, t] = <g_s, g_t>`` to find its coefficients; the model-sized work is one
Gram matrix and one weighted sum. Iteration counts are fixed so everything jits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _matvec(matrix: jax.Array, vector: jax.Array) -> jax.Array:
    return jnp.matmul(matrix, vector, precision=_HIGHEST)


def _active_gram(gram: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    num_tasks = gram.shape[0]
    mask = jnp.ones((num_tasks,), bool) if mask is None else mask.astype(bool)
    pair = mask[:, None] & mask[None, :]
    return jnp.where(pair, gram.astype(jnp.float32), 0.0), mask


def project_to_simplex(v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Euclidean projection onto the probability simplex of the active entries.

    The sort-based algorithm of Duchi et al. 2008, "Efficient Projections onto the
    l1-Ball for Learning in High Dimensions".

    Args:
      v: [T] point to project.
      mask: [T] bool; inactive entries are fixed at 0 and excluded. None = all active.

    Returns:
      [T] weights >= 0 summing to 1 over the active entries (all 0 if none is active).
    """
    num_tasks = v.shape[0]
    mask = jnp.ones((num_tasks,), bool) if mask is None else mask.astype(bool)
    num_active = jnp.sum(mask)
    u = jnp.sort(jnp.where(mask, v, -jnp.inf))[::-1]
    k = jnp.arange(1, num_tasks + 1)
    valid = k <= num_active
    u = jnp.where(valid, u, 0.0)
    cumsum = jnp.cumsum(u)
    rho = jnp.max(jnp.where(valid & (u * k > cumsum - 1.0), k, 0))
    theta = (cumsum[jnp.maximum(rho, 1) - 1] - 1.0) / jnp.maximum(rho, 1)
    return jnp.where(mask, jnp.maximum(v - theta, 0.0), 0.0)


def _two_point_step(v1v1: jax.Array, v1v2: jax.Array, v2v2: jax.Array) -> jax.Array:
    """gamma in [0, 1] minimising ||(1 - gamma) v1 + gamma v2||^2 (exact line search)."""
    denom = v1v1 + v2v2 - 2.0 * v1v2
    safe = jnp.where(denom > 0, denom, 1.0)
    return jnp.where(denom > 0, jnp.clip((v1v1 - v1v2) / safe, 0.0, 1.0), 0.0)


def min_norm_weights(gram: jax.Array, mask: jax.Array | None = None,
                     num_iters: int = 250) -> jax.Array:
    """The min-norm point of the convex hull of the task gradients (MGDA).

    Sener & Koltun 2018, "Multi-Task Learning as Multi-Objective Optimization",
    Algorithm 2: start from the best pair of tasks (closed-form two-point solution),
    then Frank-Wolfe steps with exact line search. The reference code clips the
    two-point step to [0.001, 0.999]; here it is clipped to [0, 1], which keeps the
    exact solution (e.g. a gradient inside the hull of the others gets weight 0).

    Args:
      gram: [T, T] Gram matrix of the (normalised) task gradients.
      mask: [T] bool of active tasks; inactive ones get weight 0. None = all active.
      num_iters: Frank-Wolfe iterations (fixed, so it jits; 250 as the reference code).

    Returns:
      alpha [T] >= 0, summing to 1 over the active tasks (all 0 if none is active),
      minimising ``||sum_t alpha_t g_t||^2``.
    """
    gram, mask = _active_gram(gram, mask)
    num_tasks = gram.shape[0]
    diag = jnp.diag(gram)
    # Best pair (i, j), i == j included so that a single active task works too.
    gamma = _two_point_step(diag[:, None], gram, diag[None, :])  # weight on task j
    cost = ((1 - gamma) ** 2 * diag[:, None] + 2 * gamma * (1 - gamma) * gram
            + gamma ** 2 * diag[None, :])
    cost = jnp.where(mask[:, None] & mask[None, :], cost, jnp.inf)
    best = jnp.argmin(cost.ravel())
    i, j = best // num_tasks, best % num_tasks
    alpha = jnp.zeros((num_tasks,), jnp.float32)
    alpha = alpha.at[i].add(1 - gamma[i, j]).at[j].add(gamma[i, j])

    def frank_wolfe_step(_: int, alpha: jax.Array) -> jax.Array:
        grad = _matvec(gram, alpha)  # half the gradient of ||G alpha||^2
        t = jnp.argmin(jnp.where(mask, grad, jnp.inf))
        step = _two_point_step(jnp.dot(alpha, grad, precision=_HIGHEST), grad[t], gram[t, t])
        return (1 - step) * alpha + step * jax.nn.one_hot(t, num_tasks, dtype=alpha.dtype)

    alpha = jax.lax.fori_loop(0, num_iters, frank_wolfe_step, alpha)
    return jnp.where(mask & jnp.any(mask), alpha, 0.0)


def cagrad_dual_weights(gram: jax.Array, c: float, mask: jax.Array | None = None,
                        num_iters: int = 500, initial_step: float = 0.5,
                        final_step: float = 1e-5) -> jax.Array:
    """Solve CAGrad's dual problem on the simplex.

    Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning", Eq. (4)
    as in the reference code: ``min_w  w^T M b + c ||g_0|| sqrt(w^T M w)`` over the
    simplex, with ``b = 1/T`` (so ``M b`` are the inner products with the average
    gradient ``g_0``). The reference code calls scipy's SLSQP; here a fixed number of
    projected steps along the *normalised* gradient with a geometrically decaying
    length (``initial_step`` to ``final_step``), keeping the best iterate. Normalised
    steps matter: when the task gradients nearly cancel the objective is very flat and
    plain gradient steps barely move.

    Args:
      gram: [T, T] Gram matrix of the task gradients.
      c: the conflict-aversion radius (paper's c, reference code's alpha), >= 0.
      mask: [T] bool of active tasks; inactive ones get weight 0 and are left out of
        ``g_0``. None = all active.
      num_iters: projected-gradient iterations (fixed, so it jits).
      initial_step: first step length on the simplex (its diameter is sqrt(2)).
      final_step: last step length, about the accuracy of the returned weights.

    Returns:
      w [T] on the simplex of the active tasks (all 0 if none is active).
    """
    gram, mask = _active_gram(gram, mask)
    num_active = jnp.maximum(jnp.sum(mask), 1)
    # The minimiser is unchanged by scaling M; normalising keeps the 1e-12 guards
    # below negligible whatever the gradient scale.
    scale = jnp.sum(jnp.diag(gram)) / num_active
    gram = gram / jnp.where(scale > 0, scale, 1.0)
    b = (mask / num_active).astype(jnp.float32)
    gram_b = _matvec(gram, b)
    radius = c * jnp.sqrt(jnp.dot(b, gram_b, precision=_HIGHEST) + 1e-12)
    decay = (final_step / initial_step) ** (1.0 / max(num_iters - 1, 1))

    def objective(w: jax.Array) -> jax.Array:
        quad = jnp.dot(w, _matvec(gram, w), precision=_HIGHEST)
        return jnp.dot(w, gram_b, precision=_HIGHEST) + radius * jnp.sqrt(quad + 1e-12)

    def step(k: int, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple:
        w, best_w, best_value = carry
        grad = jnp.where(mask, jax.grad(objective)(w), 0.0)
        # Only the component within the simplex's plane moves w.
        grad = jnp.where(mask, grad - jnp.sum(grad) / num_active, 0.0)
        norm = jnp.sqrt(jnp.sum(grad * grad))
        direction = grad / jnp.where(norm > 0, norm, 1.0)
        w = project_to_simplex(w - initial_step * decay ** k * direction, mask)
        value = objective(w)
        better = value < best_value
        return w, jnp.where(better, w, best_w), jnp.where(better, value, best_value)

    _, best_w, _ = jax.lax.fori_loop(0, num_iters, step, (b, b, objective(b)))
    return best_w


def pcgrad_coefficients(gram: jax.Array, orders: jax.Array,
                        mask: jax.Array | None = None) -> jax.Array:
    """PCGrad's projected gradients as combinations of the original ones.

    Yu et al. 2020, "Gradient Surgery for Multi-Task Learning", Algorithm 1: for each
    task i, for each other task j in ``orders[i]``: if ``<g_i^PC, g_j> < 0`` then
    ``g_i^PC -= <g_i^PC, g_j> / ||g_j||^2 g_j`` (projecting against the *original*
    ``g_j``). Since ``g_i^PC = sum_k C[i, k] g_k`` stays a combination of the original
    gradients, the inner products come from the Gram matrix alone.

    Args:
      gram: [T, T] Gram matrix of the task gradients.
      orders: [T, T] int; row i is the order (a permutation of 0..T-1) in which task i
        is projected against the others (its own index is skipped).
      mask: [T] bool of active tasks; inactive tasks are neither projected nor
        projected against (their rows are 0). None = all active.

    Returns:
      C [T, T]: ``g_i^PC = sum_k C[i, k] g_k``.
    """
    gram, mask = _active_gram(gram, mask)
    num_tasks = gram.shape[0]

    def project_task(i: jax.Array, order: jax.Array) -> jax.Array:
        def project_against(coef: jax.Array, j: jax.Array) -> tuple[jax.Array, None]:
            dot = jnp.sum(coef * gram[:, j])
            norm_sq = gram[j, j]
            conflict = (dot < 0) & (j != i) & mask[j] & (norm_sq > 0)
            shift = jnp.where(conflict, dot / jnp.where(norm_sq > 0, norm_sq, 1.0), 0.0)
            return coef - shift * jax.nn.one_hot(j, num_tasks, dtype=coef.dtype), None

        coef, _ = jax.lax.scan(project_against, jax.nn.one_hot(i, num_tasks), order)
        return coef

    coefficients = jax.vmap(project_task)(jnp.arange(num_tasks), orders)
    return jnp.where(mask[:, None], coefficients, 0.0)
