"""Loss-weighting balancers: per-task weights from the losses alone, no task gradients.

The caller differentiates ``sum_t weights_t * loss_t`` (``balanced_grads`` does this in
one backward pass). If per-task gradients are passed anyway, ``update`` also returns
their weighted sum, which is the same gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from .base import (
    Balancer,
    PyTree,
    check_task_losses,
    empty_state,
    mask_task_grads,
    resolve_task_mask,
    weighted_task_sum,
)

# Guards log(loss) and 1/loss for losses that reach 0 (FAMO's reference value).
_LOSS_EPS = 1e-8


def check_num_tasks(method: str, num_tasks: int | None, required: bool) -> None:
    """Raise ``ValueError`` unless ``num_tasks`` is a positive int (or None if optional)."""
    if num_tasks is None and not required:
        return
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"Balancer {method!r}: num_tasks={num_tasks!r}, expected a positive "
                         "int (the number of tasks T; this method keeps [T] state)")


def check_positive(method: str, field: str, value: float, allow_zero: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a number > 0 (>= 0 with ``allow_zero``)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and (
        value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"Balancer {method!r}: {field}={value!r}, expected a number {bound}")


def check_choice(method: str, field: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"Balancer {method!r}: {field}={value!r}, expected one of {allowed}")


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the active entries of ``logits`` [T]; inactive (or all-inactive) -> 0."""
    top = jax.lax.stop_gradient(jnp.max(jnp.where(mask, logits, -jnp.inf)))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    exp = jnp.where(mask, jnp.exp(jnp.where(mask, logits - top, 0.0)), 0.0)
    total = jnp.sum(exp)
    return exp / jnp.where(total > 0, total, 1.0)


def _maybe_combine(task_grads: PyTree | None, weights: jax.Array,
                   mask: jax.Array) -> PyTree | None:
    if task_grads is None:
        return None
    return weighted_task_sum(mask_task_grads(task_grads, mask), weights)


def _logit_optimizer(method: str, optimizer: str, learning_rate: float,
                     weight_decay: float) -> optax.GradientTransformation:
    check_choice(method, "optimizer", optimizer, ("adam", "sgd"))
    check_positive(method, "learning_rate", learning_rate)
    check_positive(method, "weight_decay", weight_decay, allow_zero=True)
    # L2 added to the gradient before the moments, as torch.optim.Adam(weight_decay=...).
    scale = [optax.scale_by_adam()] if optimizer == "adam" else []
    return optax.chain(optax.add_decayed_weights(weight_decay), *scale,
                       optax.scale(-learning_rate))


def equal(*, num_tasks: int | None = None) -> Balancer:
    """Equal weighting, the default: every present task has weight 1.

    ``sum_t loss_t`` and, given task gradients, ``jnp.sum(task_grads, axis=0)``: the same
    numbers as no balancer. Absent tasks get weight 0.

    Args:
      num_tasks: optional T, checked against ``task_losses`` when given.
    """
    check_num_tasks("equal", num_tasks, required=False)

    def update(task_losses: jax.Array, task_grads: PyTree | None, state: PyTree,
               params: PyTree, rng: jax.Array | None = None,
               task_mask: jax.Array | None = None) -> tuple:
        del params, rng
        losses = check_task_losses(task_losses, num_tasks)
        mask = resolve_task_mask(task_mask, losses.shape[0])
        weights = mask.astype(jnp.float32)
        return _maybe_combine(task_grads, weights, mask), weights, state

    return Balancer(empty_state, update, needs_task_grads=False)


class UncertaintyState(NamedTuple):
    """State of uncertainty weighting.

    Attributes:
      log_vars: [T] learnable ``s_t = log sigma_t^2``.
      opt_state: optax state of the internal Adam on ``log_vars`` (``EmptyState`` when
        ``learning_rate=None``: the caller trains ``log_vars``).
    """

    log_vars: jax.Array
    opt_state: PyTree


# variant -> (a, b) in  loss = sum_t a exp(-s_t) L_t + b s_t,  s_t = log sigma_t^2.
_UNCERTAINTY_VARIANTS = {
    "standard": (1.0, 1.0),
    "classification": (1.0, 0.5),
    "regression": (0.5, 0.5),
}


def uncertainty(*, num_tasks: int, variant: str = "standard",
                learning_rate: float | None = 1e-3, init_log_var: float = 0.0) -> Balancer:
    """Uncertainty weighting with learnable log-variances.

    Kendall, Gal & Cipolla 2018, "Multi-Task Learning Using Uncertainty to Weigh Losses
    for Scene Geometry and Semantics". With ``s_t = log sigma_t^2`` the objective is
    ``sum_t a exp(-s_t) L_t + b s_t`` where ``variant`` picks (a, b):

    * "standard" (default): ``exp(-s_t) L_t + s_t``, the form most re-implementations
      use (twice the paper's regression term);
    * "classification": ``exp(-s_t) L_t + s_t / 2``, the paper's Eq. (10) term
      ``L_t / sigma_t^2 + log sigma_t`` for a softmax likelihood;
    * "regression": ``exp(-s_t) L_t / 2 + s_t / 2``, the paper's Eq. (7) term.

    The model's gradient of that objective is the gradient of ``sum_t w_t L_t`` with
    ``w_t = a exp(-s_t)``, the weights ``update`` returns. The ``s_t`` are trained one
    of two ways:

    * ``learning_rate`` a float (default): ``update`` also takes one Adam step on
      ``state.log_vars`` along the gradient of ``weighted_loss`` (the paper trains them
      jointly with the network, i.e. at the same point), so no caller changes are needed;
    * ``learning_rate=None``: ``update`` leaves ``log_vars`` alone and the caller trains
      them alongside the model: differentiate
      ``balancer.weighted_loss(task_losses, log_vars, task_mask)`` w.r.t. the model
      parameters *and* ``state.log_vars``, apply its optimizer to both, and write them
      back with ``state._replace(log_vars=...)``.

    Masked tasks: weight 0, no term in ``weighted_loss``, their ``s_t`` is not updated.

    Args:
      num_tasks: T.
      variant: "standard", "classification" or "regression".
      learning_rate: Adam learning rate for ``log_vars`` inside ``update``, or None.
      init_log_var: initial ``s_t`` (0: weights start at ``a``).
    """
    check_num_tasks("uncertainty", num_tasks, required=True)
    check_choice("uncertainty", "variant", variant, tuple(_UNCERTAINTY_VARIANTS))
    if learning_rate is not None:
        check_positive("uncertainty", "learning_rate", learning_rate)
    loss_scale, log_var_scale = _UNCERTAINTY_VARIANTS[variant]
    tx = None if learning_rate is None else optax.adam(learning_rate)

    def weighted_loss(task_losses: jax.Array, log_vars: jax.Array,
                      task_mask: jax.Array | None = None) -> jax.Array:
        """``sum_t a exp(-s_t) L_t + b s_t`` over present tasks (scalar).

        Args:
          task_losses: [T] per-task losses (differentiable w.r.t. the model).
          log_vars: [T] the ``s_t`` (``state.log_vars``).
          task_mask: [T] bool, False for absent tasks.
        """
        mask = resolve_task_mask(task_mask, num_tasks)
        # where before the product: an absent task's NaN loss must not give NaN gradients.
        task_losses = jnp.where(mask, task_losses, 0.0)
        terms = loss_scale * jnp.exp(-log_vars) * task_losses + log_var_scale * log_vars
        return jnp.sum(jnp.where(mask, terms, 0.0))

    def init(params: PyTree) -> UncertaintyState:
        del params
        log_vars = jnp.full((num_tasks,), init_log_var, jnp.float32)
        opt_state = optax.EmptyState() if tx is None else tx.init(log_vars)
        return UncertaintyState(log_vars, opt_state)

    def update(task_losses: jax.Array, task_grads: PyTree | None, state: UncertaintyState,
               params: PyTree, rng: jax.Array | None = None,
               task_mask: jax.Array | None = None) -> tuple:
        del params, rng
        losses = check_task_losses(task_losses, num_tasks)
        mask = resolve_task_mask(task_mask, num_tasks)
        weights = jnp.where(mask, loss_scale * jnp.exp(-state.log_vars), 0.0)
        if tx is not None:
            grad = jax.grad(weighted_loss, argnums=1)(losses, state.log_vars, mask)
            updates, opt_state = tx.update(grad, state.opt_state, state.log_vars)
            log_vars = jnp.where(mask, optax.apply_updates(state.log_vars, updates),
                                 state.log_vars)
            state = UncertaintyState(log_vars, opt_state)
        return _maybe_combine(task_grads, weights, mask), weights, state

    return Balancer(init, update, needs_task_grads=False, weighted_loss=weighted_loss)


class DWAState(NamedTuple):
    """State of dynamic weight average.

    Attributes:
      history: [2, T] the last two window-mean losses, ``history[0]`` the newest.
      num_history: [T] int32, how many of the two rows hold a value for the task.
      window_sum: [T] sum of the current window's losses (present steps only).
      window_count: [T] int32, present steps in the current window.
      step: int32 scalar, calls to ``update`` so far.
    """

    history: jax.Array
    num_history: jax.Array
    window_sum: jax.Array
    window_count: jax.Array
    step: jax.Array


def dwa(*, num_tasks: int, temperature: float = 2.0, period: int = 1) -> Balancer:
    """Dynamic Weight Average.

    Liu, Johns & Davison 2019, "End-to-End Multi-Task Learning with Attention", Eq. (7):
    ``w_t = L_t(k-1) / L_t(k-2)`` and ``lambda_t = T exp(w_t / temp) /
    sum_i exp(w_i / temp)``, with ``w_t = 1`` until two past values exist. ``L_t(k)`` is
    the mean loss of window ``k``: the paper uses epochs; here a window is ``period``
    calls to ``update`` (1: every step).

    Masked tasks: weight 0; the softmax runs over the present tasks and is scaled by
    their number (so present weights sum to the number of present tasks); an absent
    task's loss is not added to its window mean.

    Args:
      num_tasks: T.
      temperature: the softmax temperature (paper: 2).
      period: window length in steps.
    """
    check_num_tasks("dwa", num_tasks, required=True)
    check_positive("dwa", "temperature", temperature)
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"Balancer 'dwa': period={period!r}, expected a positive int (steps)")

    def init(params: PyTree) -> DWAState:
        del params
        zeros = jnp.zeros((num_tasks,), jnp.float32)
        counts = jnp.zeros((num_tasks,), jnp.int32)
        return DWAState(jnp.zeros((2, num_tasks), jnp.float32), counts, zeros, counts,
                        jnp.zeros((), jnp.int32))

    def update(task_losses: jax.Array, task_grads: PyTree | None, state: DWAState,
               params: PyTree, rng: jax.Array | None = None,
               task_mask: jax.Array | None = None) -> tuple:
        del params, rng
        losses = check_task_losses(task_losses, num_tasks)
        mask = resolve_task_mask(task_mask, num_tasks)
        newest, older = state.history[0], state.history[1]
        ratio = jnp.where(state.num_history >= 2,
                          newest / jnp.where(older != 0, older, _LOSS_EPS), 1.0)
        weights = jnp.sum(mask) * masked_softmax(ratio / temperature, mask)

        window_sum = state.window_sum + jnp.where(mask, losses, 0.0)
        window_count = state.window_count + mask.astype(jnp.int32)
        step = state.step + 1
        window_closed = step % period == 0
        push = window_closed & (window_count > 0)
        window_mean = window_sum / jnp.maximum(window_count, 1)
        history = jnp.stack([jnp.where(push, window_mean, newest),
                             jnp.where(push, newest, older)])
        num_history = jnp.where(push, jnp.minimum(state.num_history + 1, 2),
                                state.num_history)
        state = DWAState(history, num_history,
                         jnp.where(window_closed, 0.0, window_sum),
                         jnp.where(window_closed, 0, window_count), step)
        return _maybe_combine(task_grads, weights, mask), weights, state

    return Balancer(init, update, needs_task_grads=False)


def rlw(*, num_tasks: int | None = None) -> Balancer:
    """Random Loss Weighting.

    Lin et al. 2021, "Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning" (TMLR 2022): ``weights = softmax(z)``, ``z ~ N(0, I_T)`` drawn
    afresh each step from ``rng``. As in the paper the weights sum to 1 (not T), so
    the combined loss is on the scale of a mean over tasks. Same ``rng``, same weights.

    Masked tasks: weight 0; the softmax runs over the present tasks' draws only.

    Args:
      num_tasks: optional T, checked against ``task_losses`` when given.
    """
    check_num_tasks("rlw", num_tasks, required=False)

    def update(task_losses: jax.Array, task_grads: PyTree | None, state: PyTree,
               params: PyTree, rng: jax.Array | None = None,
               task_mask: jax.Array | None = None) -> tuple:
        del params
        if rng is None:
            raise ValueError("Balancer 'rlw': rng=None, expected a PRNG key (weights are "
                             "random draws)")
        losses = check_task_losses(task_losses, num_tasks)
        mask = resolve_task_mask(task_mask, losses.shape[0])
        draws = jax.random.normal(rng, losses.shape, jnp.float32)
        weights = masked_softmax(draws, mask)
        return _maybe_combine(task_grads, weights, mask), weights, state

    return Balancer(empty_state, update, needs_task_grads=False)


class FAMOState(NamedTuple):
    """State of FAMO.

    Attributes:
      logits: [T] the task logits xi (weights ``z = softmax(xi)``).
      opt_state: optax state of the logits' optimizer.
      prev_losses: [T] each task's loss at its last present step.
      prev_active: [T] bool, which tasks were present at the previous call.
    """

    logits: jax.Array
    opt_state: PyTree
    prev_losses: jax.Array
    prev_active: jax.Array


def famo(*, num_tasks: int, learning_rate: float = 0.025, weight_decay: float = 0.01,
         optimizer: str = "adam") -> Balancer:
    """Fast Adaptive Multitask Optimization.

    Liu et al. 2023, "FAMO: Fast Adaptive Multitask Optimization" (NeurIPS), Algorithm 1.
    With ``z = softmax(xi)`` the model descends ``sum_t z_t log L_t / c``,
    ``c = sum_t z_t / L_t``, i.e. the weights ``w_t = z_t / (c L_t)`` (summing to 1).
    The logits follow ``xi <- xi - beta (J_z(xi)^T delta + gamma xi)`` with
    ``delta_t = log L_t(prev) - log L_t(now)``, the observed log-loss decrease.

    The paper measures ``delta`` with a second forward pass on the same batch after the
    step; a single-pass train step instead compares the previous call's losses (the
    previous batch) with the current ones, so at call k the logits are first updated
    with ``delta = log L(k-1) - log L(k)`` and then give this step's weights. Losses get
    ``+1e-8`` before ``log`` and ``1/L`` as in the reference code.

    ``optimizer="adam"`` (default) follows the reference code
    (``torch.optim.Adam(lr=beta, weight_decay=gamma)``: the decay is added to the
    gradient before Adam's moments); ``"sgd"`` is the paper's plain step above.

    Masked tasks: weight 0 and out of the softmax; ``delta`` is only formed for tasks
    present at both calls and only their logits move.

    Args:
      num_tasks: T.
      learning_rate: beta, the logits' step size (reference default 0.025).
      weight_decay: gamma, the logits' L2 regularisation (reference default 0.01).
      optimizer: "adam" or "sgd".
    """
    check_num_tasks("famo", num_tasks, required=True)
    tx = _logit_optimizer("famo", optimizer, learning_rate, weight_decay)

    def init(params: PyTree) -> FAMOState:
        del params
        logits = jnp.zeros((num_tasks,), jnp.float32)
        return FAMOState(logits, tx.init(logits), jnp.zeros((num_tasks,), jnp.float32),
                         jnp.zeros((num_tasks,), bool))

    def update(task_losses: jax.Array, task_grads: PyTree | None, state: FAMOState,
               params: PyTree, rng: jax.Array | None = None,
               task_mask: jax.Array | None = None) -> tuple:
        del params, rng
        losses = check_task_losses(task_losses, num_tasks)
        mask = resolve_task_mask(task_mask, num_tasks)
        valid = mask & state.prev_active
        delta = jnp.where(valid, jnp.log(jnp.where(valid, state.prev_losses, 1.0) + _LOSS_EPS)
                          - jnp.log(jnp.where(valid, losses, 1.0) + _LOSS_EPS), 0.0)
        logit_grad = jax.grad(lambda xi: jnp.sum(masked_softmax(xi, valid) * delta))(
            state.logits)
        updates, opt_state = tx.update(logit_grad, state.opt_state, state.logits)
        # Without any valid delta (first call) the logits' optimizer does not step.
        any_valid = jnp.any(valid)
        opt_state = jax.tree.map(lambda new, old: jnp.where(any_valid, new, old),
                                 opt_state, state.opt_state)
        logits = jnp.where(valid, state.logits + updates, state.logits)

        z = masked_softmax(logits, mask)
        inverse = jnp.where(mask, z / (jnp.where(mask, losses, 1.0) + _LOSS_EPS), 0.0)
        total = jnp.sum(inverse)
        weights = inverse / jnp.where(total > 0, total, 1.0)
        state = FAMOState(logits, opt_state, jnp.where(mask, losses, state.prev_losses), mask)
        return _maybe_combine(task_grads, weights, mask), weights, state

    return Balancer(init, update, needs_task_grads=False)
