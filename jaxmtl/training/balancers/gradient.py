"""Gradient balancers: they combine per-task gradients ``task_grads`` (leaves [T, ...]).

Each method reads the task gradients only through their [T, T] Gram matrix over the
*shared* leaves (``shared`` config, see ``shared_mask``) and returns a per-leaf weighted
sum of the task gradients. Leaves that are not shared (task heads) get the weighted
sum the authors' code produces: the method's weights for GradNorm and MGDA (whose
reference code back-propagates ``sum_t w_t L_t``), the plain sum for PCGrad and CAGrad
(which rewrite the shared gradient only).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from .base import (
    Balancer,
    PyTree,
    SharedSpec,
    check_task_losses,
    empty_state,
    gram_matrix,
    mask_task_grads,
    num_tasks_of,
    resolve_task_mask,
    shared_mask,
    weighted_task_sum,
)
from .solvers import cagrad_dual_weights, min_norm_weights, pcgrad_coefficients
from .weighting import check_choice, check_num_tasks, check_positive


class _Prepared(NamedTuple):
    losses: jax.Array
    mask: jax.Array
    grads: PyTree
    leaf_mask: PyTree
    gram: jax.Array


def check_iters(method: str, num_iters: int) -> None:
    """Raises ValueError unless ``num_iters`` (a solver's iteration count) is an int >= 1."""
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"Balancer {method!r}: num_iters={num_iters!r}, expected a positive int")


def prepare(method: str, task_losses: jax.Array, task_grads: PyTree | None,
            task_mask: jax.Array | None, shared: SharedSpec,
            num_tasks: int | None = None) -> _Prepared:
    """The checks and the common inputs of a gradient method's update: the task losses,
    the mask of tasks present, the per-task gradients (absent tasks zeroed), the mask of
    shared leaves and the tasks' Gram matrix on them.

    Raises:
      ValueError: without per-task gradients or with a task count other than
        ``num_tasks``, naming ``method``.
    """
    if task_grads is None:
        raise ValueError(f"Balancer {method!r}: task_grads=None, but this method needs "
                         "per-task gradients (needs_task_grads=True): pass a pytree with "
                         "leaves [T, ...], e.g. from per_task_grads")
    grad_tasks = num_tasks_of(task_grads)
    if num_tasks is not None and grad_tasks != num_tasks:
        raise ValueError(f"Balancer {method!r}: task_grads have {grad_tasks} tasks on their "
                         f"leading axis, expected num_tasks={num_tasks}")
    losses = check_task_losses(task_losses, grad_tasks)
    mask = resolve_task_mask(task_mask, grad_tasks)
    # Absent tasks are zeroed first so that NaN/garbage there cannot reach the others.
    grads = mask_task_grads(task_grads, mask)
    leaf_mask = shared_mask(grads, shared)
    return _Prepared(losses, mask, grads, leaf_mask, gram_matrix(grads, leaf_mask))


class GradNormState(NamedTuple):
    """State of GradNorm.

    Attributes:
      weights: [T] the loss weights w_t (sum T while every task is present).
      initial_losses: [T] L_t(0), each task's loss at its first present step.
      has_initial: [T] bool, whether ``initial_losses`` is set.
      opt_state: optax state of the weights' optimizer.
    """

    weights: jax.Array
    initial_losses: jax.Array
    has_initial: jax.Array
    opt_state: PyTree


def gradnorm(*, num_tasks: int, alpha: float = 1.5, learning_rate: float = 0.025,
             optimizer: str = "adam", shared: SharedSpec = None) -> Balancer:
    """GradNorm: weights that equalise the tasks' gradient norms on the shared parameters.

    Chen et al. 2018, "GradNorm: Gradient Normalization for Adaptive Loss Balancing in
    Deep Multitask Networks", Algorithm 1. With ``G_t = w_t ||grad_W L_t||`` (W: the
    ``shared`` leaves), ``r_t = (L_t / L_t(0)) / mean_i (L_i / L_i(0))`` and the
    constant target ``mean_i G_i * r_t^alpha``, the weights take one optimizer step on
    ``L_grad = sum_t |G_t - target_t|`` and are renormalised to keep their sum. The
    combined gradient is that of ``sum_t w_t L_t`` with the weights *before* the step,
    on all leaves.

    Masked tasks: weight 0; left out of the means, of ``L_grad`` and of the
    renormalisation (present weights keep their sum); their weight, ``L_t(0)`` (set at a
    task's first present step) are unchanged.

    Args:
      num_tasks: T.
      alpha: the restoring-force strength (paper: 1.5 on NYUv2; 0 equalises norms).
      learning_rate: step size of the weights' optimizer.
      optimizer: "adam" (the paper trains w with the network's optimizer) or "sgd".
      shared: which leaves are W (see ``shared_mask``); None = all leaves. The paper
        uses the last shared layer.
    """
    check_num_tasks("gradnorm", num_tasks, required=True)
    check_positive("gradnorm", "alpha", alpha, allow_zero=True)
    check_choice("gradnorm", "optimizer", optimizer, ("adam", "sgd"))
    check_positive("gradnorm", "learning_rate", learning_rate)
    scale = [optax.scale_by_adam()] if optimizer == "adam" else []
    tx = optax.chain(*scale, optax.scale(-learning_rate))

    def init(params: PyTree) -> GradNormState:
        del params
        weights = jnp.ones((num_tasks,), jnp.float32)
        return GradNormState(weights, jnp.zeros((num_tasks,), jnp.float32),
                             jnp.zeros((num_tasks,), bool), tx.init(weights))

    def update(task_losses: jax.Array, task_grads: PyTree | None, state: GradNormState,
               params: PyTree, rng: jax.Array | None = None,
               task_mask: jax.Array | None = None) -> tuple:
        del params, rng
        prep = prepare("gradnorm", task_losses, task_grads, task_mask, shared, num_tasks)
        mask, losses = prep.mask, prep.losses
        num_active = jnp.maximum(jnp.sum(mask), 1)
        norms = jnp.sqrt(jnp.maximum(jnp.diag(prep.gram), 0.0))

        first_seen = mask & ~state.has_initial
        initial_losses = jnp.where(first_seen, losses, state.initial_losses)
        ratio = jnp.where(mask, losses / jnp.where(initial_losses > 0, initial_losses, 1e-12),
                          0.0)
        mean_ratio = jnp.sum(ratio) / num_active
        relative = ratio / jnp.where(mean_ratio > 0, mean_ratio, 1.0)

        def gradnorm_loss(weights: jax.Array) -> jax.Array:
            scaled = weights * norms
            mean_norm = jnp.sum(jnp.where(mask, scaled, 0.0)) / num_active
            # The target is a constant (paper, Sec. 3.2), else weights drift to zero.
            target = jax.lax.stop_gradient(mean_norm * relative ** alpha)
            return jnp.sum(jnp.where(mask, jnp.abs(scaled - target), 0.0))

        weights = state.weights
        updates, opt_state = tx.update(jax.grad(gradnorm_loss)(weights), state.opt_state,
                                       weights)
        stepped = jnp.where(mask, weights + updates, weights)
        old_sum = jnp.sum(jnp.where(mask, weights, 0.0))
        new_sum = jnp.sum(jnp.where(mask, stepped, 0.0))
        stepped = jnp.where(mask, stepped * old_sum / jnp.where(new_sum != 0, new_sum, 1.0),
                            weights)
        any_active = jnp.any(mask)
        opt_state = jax.tree.map(lambda new, old: jnp.where(any_active, new, old),
                                 opt_state, state.opt_state)

        used = jnp.where(mask, weights, 0.0)
        new_state = GradNormState(stepped, initial_losses, state.has_initial | mask, opt_state)
        return weighted_task_sum(prep.grads, used), used, new_state

    return Balancer(init, update, needs_task_grads=True)


def pcgrad(*, shared: SharedSpec = None) -> Balancer:
    """PCGrad: project away the conflicting components of the task gradients.

    Yu et al. 2020, "Gradient Surgery for Multi-Task Learning" (NeurIPS), Algorithm 1:
    each ``g_i`` is projected onto the normal plane of every other ``g_j`` it conflicts
    with (``<g_i, g_j> < 0``), in a random order per task drawn from ``rng``
    (``orders[i] = permutation(split(rng, T)[i], T)``); the shared gradient is
    ``sum_i g_i^PC``. Non-shared leaves get the plain sum. The returned weights are the
    effective coefficients ``g^PC = sum_k weights_k g_k`` on the shared leaves.

    Masked tasks: weight 0; neither projected nor projected against.

    Args:
      shared: which leaves are shared (see ``shared_mask``); None = all leaves.
    """
    def update(task_losses: jax.Array, task_grads: PyTree | None, state: PyTree,
               params: PyTree, rng: jax.Array | None = None,
               task_mask: jax.Array | None = None) -> tuple:
        del params
        if rng is None:
            raise ValueError("Balancer 'pcgrad': rng=None, expected a PRNG key (the "
                             "projection order is random)")
        prep = prepare("pcgrad", task_losses, task_grads, task_mask, shared)
        num_tasks = prep.mask.shape[0]
        keys = jax.random.split(rng, num_tasks)
        orders = jax.vmap(lambda key: jax.random.permutation(key, num_tasks))(keys)
        weights = jnp.sum(pcgrad_coefficients(prep.gram, orders, prep.mask), axis=0)
        combined = weighted_task_sum(prep.grads, weights, prep.leaf_mask,
                                     prep.mask.astype(jnp.float32))
        return combined, weights, state

    return Balancer(empty_state, update, needs_task_grads=True)


def cagrad(*, c: float = 0.5, rescale: int = 1, num_iters: int = 500,
           shared: SharedSpec = None) -> Balancer:
    """CAGrad: the update that maximises the worst task's improvement near the average.

    Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning"
    (NeurIPS), as in the reference code: solve the dual
    ``w = argmin_{w in simplex} <g_w, g_0> + c ||g_0|| ||g_w||`` (``g_0``: the mean task
    gradient, ``g_w = sum_t w_t g_t``; see ``cagrad_dual_weights``), then
    ``d = g_0 + (c ||g_0|| / ||g_w||) g_w``, divided by ``1 + c^2`` (``rescale=1``, the
    reference default), by ``1 + c`` (``rescale=2``) or not at all (``rescale=0``).
    ``d`` is on the scale of the *mean* gradient (1/T of "equal"'s sum). Non-shared
    leaves get the plain sum. The returned weights are d's coefficients on the shared
    leaves.

    Masked tasks: weight 0; ``g_0`` and the simplex run over the present tasks.

    Args:
      c: the radius (paper's c, reference code's alpha), in [0, 1) for the paper's
        convergence guarantee; 0 gives the mean gradient.
      rescale: 0, 1 or 2, as above.
      num_iters: iterations of the dual solver.
      shared: which leaves are shared (see ``shared_mask``); None = all leaves.
    """
    check_positive("cagrad", "c", c, allow_zero=True)
    if rescale not in (0, 1, 2) or isinstance(rescale, bool):
        raise ValueError(f"Balancer 'cagrad': rescale={rescale!r}, expected one of (0, 1, 2)")
    check_iters("cagrad", num_iters)
    divisor = {0: 1.0, 1: 1.0 + c ** 2, 2: 1.0 + c}[rescale]

    def update(task_losses: jax.Array, task_grads: PyTree | None, state: PyTree,
               params: PyTree, rng: jax.Array | None = None,
               task_mask: jax.Array | None = None) -> tuple:
        del params, rng
        prep = prepare("cagrad", task_losses, task_grads, task_mask, shared)
        # Absent tasks' gradients are already zero, so are their Gram rows.
        mask, gram = prep.mask, prep.gram
        dual = cagrad_dual_weights(gram, c, mask, num_iters)
        mean_coef = mask / jnp.maximum(jnp.sum(mask), 1)
        # Elementwise sums, not matmuls: no TF32 rounding on GPUs.
        mean_norm = jnp.sqrt(jnp.maximum(jnp.sum(gram * jnp.outer(mean_coef, mean_coef)), 0.0))
        dual_norm = jnp.sqrt(jnp.maximum(jnp.sum(gram * jnp.outer(dual, dual)), 0.0))
        # 1e-8 as the reference code: keeps lambda finite when g_w vanishes.
        lam = c * mean_norm / (dual_norm + 1e-8)
        weights = (mean_coef + lam * dual) / divisor
        combined = weighted_task_sum(prep.grads, weights, prep.leaf_mask,
                                     mask.astype(jnp.float32))
        return combined, weights, state

    return Balancer(empty_state, update, needs_task_grads=True)


_MGDA_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def mgda(*, normalization: str = "none", num_iters: int = 250,
         shared: SharedSpec = None, upper_bound: bool = False) -> Balancer:
    """MGDA: the min-norm convex combination of the task gradients (and MGDA-UB).

    Sener & Koltun 2018, "Multi-Task Learning as Multi-Objective Optimization"
    (NeurIPS): ``alpha = argmin_{alpha in simplex} ||sum_t alpha_t g_t||^2`` by their
    Frank-Wolfe solver (``min_norm_weights``, fixed iteration count), on the gradients
    of the ``shared`` leaves, each first divided by its normaliser (reference code
    options: "none", "l2": ``||g_t||``, "loss": ``L_t``, "loss+": ``L_t ||g_t||``). The
    combined gradient is that of ``sum_t alpha_t L_t`` on all leaves, as the reference
    code back-propagates it; it is on the scale of a convex combination (1/T of
    "equal"'s sum for identical tasks).

    The paper's "UB" variant (``upper_bound=True``) uses gradients w.r.t. the shared
    *representation*: pass those as ``task_grads`` (leaves [T, B, D]), keep the returned
    ``weights`` and differentiate ``sum_t weights_t L_t`` yourself, ignoring
    ``combined``; the jaxmtl train step does so when ``representation_grads`` is set.

    Masked tasks: weight 0; left out of the solver.

    Args:
      normalization: "none", "l2", "loss" or "loss+".
      num_iters: Frank-Wolfe iterations (reference: at most 250).
      shared: which leaves are shared (see ``shared_mask``); None = all leaves.
      upper_bound: MGDA-UB: solve on the representation gradients (the returned
        balancer has ``representation_grads=True``; ``shared`` must then be None).
    """
    check_choice("mgda", "normalization", normalization, _MGDA_NORMALIZATIONS)
    if upper_bound and shared is not None:
        raise ValueError("Balancer 'mgda': upper_bound=True solves on the representation "
                         f"gradients, so shared must be None, got {shared!r}")
    check_iters("mgda", num_iters)

    def update(task_losses: jax.Array, task_grads: PyTree | None, state: PyTree,
               params: PyTree, rng: jax.Array | None = None,
               task_mask: jax.Array | None = None) -> tuple:
        del params, rng
        prep = prepare("mgda", task_losses, task_grads, task_mask, shared)
        norms = jnp.sqrt(jnp.maximum(jnp.diag(prep.gram), 0.0))
        losses = prep.losses.astype(jnp.float32)
        normalizer = {"none": jnp.ones_like(norms), "l2": norms, "loss": losses,
                      "loss+": losses * norms}[normalization]
        normalizer = jnp.where(prep.mask & (normalizer > 0), normalizer, 1.0)
        gram = prep.gram / (normalizer[:, None] * normalizer[None, :])
        weights = min_norm_weights(gram, prep.mask, num_iters)
        return weighted_task_sum(prep.grads, weights), weights, state

    return Balancer(empty_state, update, needs_task_grads=True,
                    representation_grads=upper_bound)
