"""DB-MTL: dual balancing of loss scales (log losses) and gradient magnitudes."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .base import Balancer, PyTree, SharedSpec, shared_mask, weighted_task_sum
from .gradient import prepare
from .weighting import check_num_tasks, check_positive

# Added to the losses before log, as the reference code.
_LOSS_EPS = 1e-8


class DBMTLState(NamedTuple):
    """State of DB-MTL.

    Attributes:
      grad_buffer: a tuple with one [T, ...] array per shared parameter leaf (in
        ``jax.tree.leaves`` order): the exponential moving average of each task's
        log-loss gradient. (A tuple, not a parameter-shaped tree with empty leaves:
        Orbax cannot save zero-size arrays.)
      steps: [T] int32, present steps per task (the EMA's ``k``).
    """

    grad_buffer: PyTree
    steps: jax.Array


def db_mtl(*, num_tasks: int, beta: float = 0.9, beta_sigma: float = 0.0,
           shared: SharedSpec = None) -> Balancer:
    """DB-MTL: log-loss gradients, averaged over steps, scaled to the largest norm.

    Lin et al. 2023, "Dual-Balancing for Multi-Task Learning", as the LibMTL reference
    code: loss-scale balancing differentiates ``log(L_t + 1e-8)``, i.e. uses
    ``g_t / (L_t + 1e-8)``; its exponential moving average
    ``h_t <- h_t + (1 - beta_k) (g_t / L_t - h_t)`` with ``beta_k = beta / k^beta_sigma``
    (k: the task's present steps; the buffer starts at 0, without bias correction) is
    kept on the ``shared`` leaves, and gradient-magnitude balancing rescales every
    task to the largest norm: the shared leaves get ``sum_t (max_s ||h_s|| / ||h_t||)
    h_t`` (``1e-8`` added to the norms), the other leaves the plain sum of the log-loss
    gradients ``sum_t g_t / L_t``. The returned weights are this step's coefficients on
    the raw gradients, ``(max_s ||h_s|| / ||h_t||) / L_t`` (the shared update equals
    ``sum_t weights_t g_t`` only when ``beta = 0``). The state holds one
    gradient-sized buffer per task on the shared leaves. No representation-gradient
    mode (the reference code refuses it: the buffer lives on the parameters).

    Masked tasks: weight 0; their buffer and step count are frozen and they are left out
    of the combination and of the largest norm.

    Under Adam, the reference default (constant ``beta = 0.9``) averages the mini-batch
    noise out of the shared gradient before Adam's second moment sees it, so Adam's steps
    on the shared parameters grow: on the digits benchmark 3.3x equal weighting's, and
    Δm -18.9 % against -1.4 % (``beta_sigma=0.5``: -1.7 %; README, "Comparing
    multi-task methods fairly"). On short schedules use ``beta_sigma=0.5`` or ``beta=0``.

    Args:
      num_tasks: T.
      beta: the EMA's decay (reference default 0.9); 0 uses the current gradients.
      beta_sigma: the decay's step exponent (reference default 0: constant beta; 0.5
        makes the average fade out, ``beta_k = beta / sqrt(k)``).
      shared: which leaves are shared (see ``shared_mask``); None = all leaves.
    """
    check_num_tasks("db_mtl", num_tasks, required=True)
    check_positive("db_mtl", "beta_sigma", beta_sigma, allow_zero=True)
    if not (isinstance(beta, int | float) and not isinstance(beta, bool) and 0 <= beta < 1):
        raise ValueError(f"Balancer 'db_mtl': beta={beta!r}, expected a number in [0, 1)")

    def init(params: PyTree) -> DBMTLState:
        if params is None:
            raise ValueError("Balancer 'db_mtl': init(params=None); the gradient buffer "
                             "needs the parameter pytree")
        keep = jax.tree.leaves(shared_mask(params, shared))
        buffer = tuple(jnp.zeros((num_tasks, *jnp.shape(leaf)), jnp.float32)
                       for leaf, shared_leaf in zip(jax.tree.leaves(params), keep, strict=True)
                       if shared_leaf)
        return DBMTLState(buffer, jnp.zeros((num_tasks,), jnp.int32))

    def update(task_losses: jax.Array, task_grads: PyTree | None, state: DBMTLState,
               params: PyTree, rng: jax.Array | None = None,
               task_mask: jax.Array | None = None) -> tuple:
        del params, rng
        prep = prepare("db_mtl", task_losses, task_grads, task_mask, shared, num_tasks)
        mask = prep.mask
        inverse_loss = jnp.where(mask, 1.0 / (jnp.where(mask, prep.losses, 1.0) + _LOSS_EPS),
                                 0.0).astype(jnp.float32)
        steps = state.steps + mask.astype(jnp.int32)
        decay = beta / jnp.maximum(steps, 1).astype(jnp.float32) ** beta_sigma
        decay = jnp.where(mask, decay, 1.0)  # absent tasks: buffer unchanged

        grad_leaves, treedef = jax.tree.flatten(prep.grads)
        keep = jax.tree.leaves(prep.leaf_mask)
        shared_grads = [grad for grad, shared_leaf in zip(grad_leaves, keep, strict=True)
                        if shared_leaf]
        if len(shared_grads) != len(state.grad_buffer):
            raise ValueError(f"Balancer 'db_mtl': {len(shared_grads)} shared gradient leaves, "
                             f"but the state's buffer has {len(state.grad_buffer)}: init "
                             "it with the parameters these gradients belong to")

        def average(grad: jax.Array, buffer: jax.Array) -> jax.Array:
            shape = (-1,) + (1,) * (grad.ndim - 1)
            log_grad = grad.astype(jnp.float32) * inverse_loss.reshape(shape)
            return log_grad + decay.reshape(shape) * (buffer - log_grad)

        buffer = tuple(map(average, shared_grads, state.grad_buffer))
        squares = sum((jnp.sum(leaf.reshape(num_tasks, -1) ** 2, axis=1) for leaf in buffer),
                      jnp.zeros((num_tasks,), jnp.float32))
        norms = jnp.sqrt(squares)
        largest = jnp.max(jnp.where(mask, norms, 0.0))
        scale = jnp.where(mask, largest / (norms + 1e-8), 0.0)

        averaged = iter(buffer)
        combined = jax.tree.unflatten(treedef, [
            weighted_task_sum(next(averaged), scale).astype(grad.dtype) if shared_leaf
            else weighted_task_sum(grad, inverse_loss)
            for grad, shared_leaf in zip(grad_leaves, keep, strict=True)])
        return combined, scale * inverse_loss, DBMTLState(buffer, steps)

    return Balancer(init, update, needs_task_grads=True)
