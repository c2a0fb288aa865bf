"""Aligned-MTL: align the task gradients' principal components (condition number 1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .base import Balancer, PyTree, SharedSpec, empty_state, weighted_task_sum
from .gradient import prepare

_HIGHEST = jax.lax.Precision.HIGHEST


def aligned_weights(gram: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Aligned-MTL's weights from the eigen-decomposition of the Gram matrix.

    Senushkin et al. 2023, "Independent Component Alignment for Multi-Task Learning"
    (CVPR), Algorithm 1: with ``M = G G^T = V diag(lambda) V^T`` (eigenvalues above
    ``max(lambda) * T * eps_float32`` kept, as the reference code's rank cut-off), the
    aligned gradients are ``G_hat = sqrt(lambda_min) V diag(lambda^-1/2) V^T G`` (all
    singular values equal to the smallest one: condition number 1) and the update is
    their sum, ``sum_t w_t g_t`` with ``w = B 1``, ``B = sqrt(lambda_min) V
    diag(lambda^-1/2) V^T``.

    Args:
      gram: [T, T] Gram matrix of the task gradients.
      mask: [T] bool of active tasks; inactive ones get weight 0. None = all active.

    Returns:
      w [T] (0 on inactive tasks; all 0 if every active gradient is 0).
    """
    num_tasks = gram.shape[0]
    mask = jnp.ones((num_tasks,), bool) if mask is None else mask.astype(bool)
    pair = mask[:, None] & mask[None, :]
    gram = jnp.where(pair, gram.astype(jnp.float32), 0.0)
    # B is unchanged by a common scale of M; normalising keeps eigh's absolute
    # round-off below the relative cut-off whatever the gradient scale.
    scale = jnp.max(jnp.abs(gram))
    gram = gram / jnp.where(scale > 0, scale, 1.0)
    eigenvalues, vectors = jnp.linalg.eigh(gram)
    cutoff = jnp.max(eigenvalues) * num_tasks * jnp.finfo(jnp.float32).eps
    kept = (eigenvalues > cutoff) & (eigenvalues > 0)
    smallest = jnp.min(jnp.where(kept, eigenvalues, jnp.inf))
    inverse_root = jnp.where(kept, 1.0 / jnp.sqrt(jnp.where(kept, eigenvalues, 1.0)), 0.0)
    projection = jnp.matmul(vectors * inverse_root[None, :], vectors.T, precision=_HIGHEST)
    weights = jnp.sqrt(jnp.where(jnp.any(kept), smallest, 0.0)) * jnp.sum(projection, axis=1)
    return jnp.where(mask, weights, 0.0)


def aligned_mtl(*, shared: SharedSpec = None, upper_bound: bool = False) -> Balancer:
    """Aligned-MTL: the sum of the task gradients after aligning their principal components.

    Senushkin et al. 2023, "Independent Component Alignment for Multi-Task Learning"
    (CVPR): the task gradients (rows of G, on the ``shared`` leaves) are replaced by
    ``sqrt(sigma_min) U V^T``-aligned ones with every singular value equal to the
    smallest (``aligned_weights``; the reference code's default ``scale_mode="min"``),
    so no task dominates and no direction conflicts; the update is their sum. Leaves
    that are not shared get the plain sum, as in the reference code (which rewrites the
    shared gradient only). The returned weights are the shared leaves' coefficients
    ``g_hat = sum_t weights_t g_t`` (unchanged by a common scale of the gradients; the
    update has the scale of the smallest singular value).

    ``upper_bound=True`` is the paper's Aligned-MTL-UB: the same on the gradients with
    respect to the shared representation; the train step then back-propagates
    ``sum_t weights_t L_t`` through the whole model.

    Masked tasks: weight 0; left out of the decomposition.

    Args:
      shared: which leaves are shared (see ``shared_mask``); None = all leaves.
      upper_bound: solve on the representation gradients (``representation_grads``;
        ``shared`` must then be None).
    """
    if upper_bound and shared is not None:
        raise ValueError("Balancer 'aligned_mtl': upper_bound=True solves on the "
                         "representation gradients, so shared must be None, got "
                         f"{shared!r}")

    def update(task_losses: jax.Array, task_grads: PyTree | None, state: PyTree,
               params: PyTree, rng: jax.Array | None = None,
               task_mask: jax.Array | None = None) -> tuple:
        del params, rng
        prep = prepare("aligned_mtl", task_losses, task_grads, task_mask, shared)
        weights = aligned_weights(prep.gram, prep.mask)
        combined = weighted_task_sum(prep.grads, weights, prep.leaf_mask,
                                     prep.mask.astype(jnp.float32))
        return combined, weights, state

    return Balancer(empty_state, update, needs_task_grads=True,
                    representation_grads=upper_bound)
