"""IMTL: impartial multi-task learning (equal projections + learned loss scales)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from .base import Balancer, PyTree, SharedSpec, weighted_task_sum
from .gradient import prepare
from .weighting import check_choice, check_num_tasks, check_positive


def imtl_weights(gram: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """IMTL-G: the combination whose projections on every task's direction are equal.

    Liu et al. 2021, "Towards Impartial Multi-task Learning" (ICLR), Sec. 3.2: find
    ``alpha`` with ``sum_t alpha_t = 1`` such that ``g = sum_t alpha_t g_t`` has the same
    inner product with every unit gradient ``u_t = g_t / ||g_t||``. The paper's closed
    form ``alpha_{2:T} = g_1 U^T (D U^T)^{-1}`` (rows of D: ``g_1 - g_t``, of U:
    ``u_1 - u_t``) is the same as ``alpha = C^+ 1 / (1^T C^+ 1)`` with
    ``C[t, s] = <u_t, g_s> = M[t, s] / ||g_t||``, used here (a pseudo-inverse, so that
    identical gradients, where the paper's inverse is singular, share their weight).

    Args:
      gram: [T, T] Gram matrix of the task gradients.
      mask: [T] bool of active tasks; inactive ones (and zero gradients) get weight 0.
        None = all active.

    Returns:
      alpha [T], summing to 1 over the active tasks (all 0 if none is active).
    """
    num_tasks = gram.shape[0]
    mask = jnp.ones((num_tasks,), bool) if mask is None else mask.astype(bool)
    gram = gram.astype(jnp.float32)
    norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))
    mask = mask & (norms > 0)
    pair = mask[:, None] & mask[None, :]
    # Inactive tasks become identity rows/columns (decoupled), zeroed below.
    coupling = jnp.where(pair, gram / jnp.where(mask, norms, 1.0)[:, None],
                         jnp.eye(num_tasks, dtype=jnp.float32))
    # The solution is invariant to a common scale of C; dividing by its largest entry
    # keeps the pseudo-inverse's cut-off relative.
    top = jnp.max(jnp.abs(jnp.where(pair, coupling, 0.0)))
    coupling = jnp.where(pair, coupling / jnp.where(top > 0, top, 1.0), coupling)
    raw = jnp.where(mask, jnp.linalg.pinv(coupling) @ jnp.ones((num_tasks,), jnp.float32),
                    0.0)
    total = jnp.sum(raw)
    return jnp.where(mask & (total != 0), raw / jnp.where(total != 0, total, 1.0), 0.0)


class IMTLState(NamedTuple):
    """State of IMTL.

    Attributes:
      loss_scales: [T] the learned ``s_t`` (IMTL-L: task t's loss is scaled by
        ``exp(s_t)``).
      opt_state: optax state of the ``s_t`` optimizer (``EmptyState`` without IMTL-L).
    """

    loss_scales: jax.Array
    opt_state: PyTree


def imtl(*, num_tasks: int, learn_loss_scales: bool = True, learning_rate: float = 1e-3,
         optimizer: str = "adam", shared: SharedSpec = None,
         upper_bound: bool = False) -> Balancer:
    """IMTL: impartial gradients (IMTL-G) on learned loss scales (IMTL-L).

    Liu et al. 2021, "Towards Impartial Multi-task Learning" (ICLR), the hybrid "IMTL":

    * IMTL-L: task t's loss is ``exp(s_t) L_t - s_t``; one optimizer step per
      ``update`` on ``sum_t (exp(s_t) L_t - s_t)`` moves ``s`` (minimum at
      ``exp(s_t) L_t = 1``: every scaled loss 1). The paper trains ``s`` with the network;
      here it has its own optimizer (``optimizer``, ``learning_rate``), as "uncertainty".
    * IMTL-G: on the scaled gradients ``exp(s_t) g_t`` of the ``shared`` leaves,
      ``alpha = imtl_weights`` (sum 1, equal projections on every task's direction); the
      shared leaves get ``sum_t alpha_t exp(s_t) g_t`` and the task-specific leaves their
      scaled loss's gradient ``sum_t exp(s_t) g_t``, as in the paper. The returned
      weights are the shared leaves' ``alpha_t exp(s_t)``, before the ``s`` step.

    ``upper_bound=True``: IMTL-G on the gradients with respect to the shared
    representation, as the paper computes it ("the gradient of the shared feature z",
    cheaper than the parameters'); the train step then back-propagates
    ``sum_t weights_t L_t`` through the whole model (heads weighted too, as MGDA-UB).

    Masked tasks: weight 0; left out of the solver; their ``s_t`` is not updated.

    Args:
      num_tasks: T.
      learn_loss_scales: train ``s`` (IMTL-L); False keeps ``s = 0`` (IMTL-G alone).
      learning_rate: step size of the ``s`` optimizer.
      optimizer: "adam" or "sgd", for ``s``.
      shared: which leaves are shared (see ``shared_mask``); None = all leaves.
      upper_bound: solve on the representation gradients (``representation_grads``;
        ``shared`` must then be None).
    """
    check_num_tasks("imtl", num_tasks, required=True)
    check_choice("imtl", "optimizer", optimizer, ("adam", "sgd"))
    check_positive("imtl", "learning_rate", learning_rate)
    if upper_bound and shared is not None:
        raise ValueError("Balancer 'imtl': upper_bound=True solves on the representation "
                         f"gradients, so shared must be None, got {shared!r}")
    scale = [optax.scale_by_adam()] if optimizer == "adam" else []
    tx = optax.chain(*scale, optax.scale(-learning_rate)) if learn_loss_scales else None

    def init(params: PyTree) -> IMTLState:
        del params
        loss_scales = jnp.zeros((num_tasks,), jnp.float32)
        return IMTLState(loss_scales,
                         optax.EmptyState() if tx is None else tx.init(loss_scales))

    def update(task_losses: jax.Array, task_grads: PyTree | None, state: IMTLState,
               params: PyTree, rng: jax.Array | None = None,
               task_mask: jax.Array | None = None) -> tuple:
        del params, rng
        prep = prepare("imtl", task_losses, task_grads, task_mask, shared, num_tasks)
        mask = prep.mask
        factor = jnp.where(mask, jnp.exp(state.loss_scales), 0.0)
        alpha = imtl_weights(prep.gram * jnp.outer(factor, factor), mask)
        weights = alpha * factor
        combined = weighted_task_sum(prep.grads, weights, prep.leaf_mask, factor)
        if tx is None:
            return combined, weights, state

        losses = jnp.where(mask, prep.losses.astype(jnp.float32), 0.0)

        def scaled_loss(loss_scales: jax.Array) -> jax.Array:
            return jnp.sum(jnp.where(mask, jnp.exp(loss_scales) * losses - loss_scales, 0.0))

        updates, opt_state = tx.update(jax.grad(scaled_loss)(state.loss_scales),
                                       state.opt_state, state.loss_scales)
        any_active = jnp.any(mask)
        opt_state = jax.tree.map(lambda new, old: jnp.where(any_active, new, old),
                                 opt_state, state.opt_state)
        loss_scales = jnp.where(mask, state.loss_scales + updates, state.loss_scales)
        return combined, weights, IMTLState(loss_scales, opt_state)

    return Balancer(init, update, needs_task_grads=True, representation_grads=upper_bound)
