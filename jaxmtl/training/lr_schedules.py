"""Learning-rate schedules with Snorkel's per-update values, as jittable optax schedules.

Snorkel drives torch ``LambdaLR``/``ExponentialLR``/``StepLR`` schedulers that share one
optimizer and are stepped once per batch *after* ``optimizer.step()``. Written as a
function of the optimizer's update count ``t`` (0-based), with ``W`` warm-up steps and
``T = n_epochs * n_batches_per_epoch`` updates in all, the learning rate it uses is::

    t < W (warm-up):   lr * t / W                  (so update 0 runs with lr = 0)
    t >= W:            post(t - W), floored at min_lr for t > W

    post(s) = lr                                   constant
              lr * (T - W - s) / (T - W)           linear
              lr * gamma ** s                      exponential
              lr * gamma ** (s // step_size)       step
              min_lr + (lr - min_lr) * (1 + cos(pi * s / (T - W))) / 2    cosine

Defaults, as Snorkel 0.10's: exponential ``gamma = 0.9``; step ``step_size = 5``,
``gamma = 0.9``.

The schedule is indexed by the optimizer's update count, i.e. the optimizer state's
``count`` before the update, which is what optax passes to a schedule given as the
learning rate. Snorkel logs ``model/all/train/lr`` after the scheduler stepped, so the
value it logs after update ``t`` is ``schedule(t + 1)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxmtl import registry
from jaxmtl.training.config import LRSchedulerConfig


def resolve_warmup_steps(config: LRSchedulerConfig, n_batches_per_epoch: int,
                         n_epochs: int) -> int:
    """Returns the number of warm-up updates, as Snorkel's ``Trainer.warmup_steps``.

    Args:
      config: the schedule settings; ``warmup_steps`` (in ``warmup_unit``s) takes
        precedence over ``warmup_percentage`` (a fraction of all updates).
      n_batches_per_epoch: train batches in one epoch (all train loaders together).
      n_epochs: number of epochs.

    Returns:
      ``int(warmup_steps)`` for unit "batches", ``int(warmup_steps * n_batches_per_epoch)``
      for unit "epochs", else ``int(warmup_percentage * n_epochs * n_batches_per_epoch)``;
      0 when neither is set.
    """
    if config.warmup_steps:
        if config.warmup_unit == "epochs":
            return int(config.warmup_steps * n_batches_per_epoch)
        return int(config.warmup_steps)
    if config.warmup_percentage:
        return int(config.warmup_percentage * n_epochs * n_batches_per_epoch)
    return 0


def constant_decay(lr: float, config: LRSchedulerConfig, decay_steps: int) -> optax.Schedule:
    """"constant" after warm-up: ``lr``."""
    del config, decay_steps
    return optax.constant_schedule(lr)


def linear_decay(lr: float, config: LRSchedulerConfig, decay_steps: int) -> optax.Schedule:
    """"linear" after warm-up: ``lr * (T - W - s) / (T - W)``."""
    del config
    # Snorkel's lambda reaches 0 exactly at the last update + 1 and would go negative
    # beyond; optax clamps at 0 there, which training never reaches.
    return optax.linear_schedule(lr, 0.0, decay_steps)


def exponential_decay(lr: float, config: LRSchedulerConfig, decay_steps: int) -> optax.Schedule:
    """"exponential" after warm-up: ``lr * gamma ** s`` (``config.exponential_config``)."""
    del decay_steps
    return optax.exponential_decay(lr, transition_steps=1,
                                   decay_rate=config.exponential_config.gamma)


def step_decay(lr: float, config: LRSchedulerConfig, decay_steps: int) -> optax.Schedule:
    """"step" after warm-up: ``lr * gamma ** (s // step_size)`` (``config.step_config``)."""
    del decay_steps
    return optax.exponential_decay(lr, transition_steps=config.step_config.step_size,
                                   decay_rate=config.step_config.gamma, staircase=True)


def cosine_decay(lr: float, config: LRSchedulerConfig, decay_steps: int) -> optax.Schedule:
    """"cosine" after warm-up: from ``lr`` down to ``config.min_lr`` over ``T - W`` updates."""
    # alpha is the final fraction of lr, chosen so the schedule ends at min_lr.
    alpha = min(config.min_lr / lr, 1.0) if lr > 0 else 0.0
    return optax.cosine_decay_schedule(lr, decay_steps=decay_steps, alpha=alpha)


def make_lr_schedule(lr: float, lr_scheduler: str, config: LRSchedulerConfig,
                     n_batches_per_epoch: int, n_epochs: int
                     ) -> tuple[optax.Schedule, int]:
    """Builds the learning-rate schedule Snorkel's Trainer applies, update by update.

    ``schedule(count)`` is the learning rate of optimizer update number ``count``
    (0-based; the optimizer state's count before the update). See the module docstring
    for the formulas.

    Snorkel quirks kept on purpose, so that a jaxmtl run reproduces a Snorkel run's
    parameters (Adam's moments and bias correction see every update, even one at lr 0):

    * with warm-up, update 0 uses lr = 0 (torch's ``LambdaLR`` sets ``lr * 0 / W`` at
      construction and is only stepped after the first update), then ``lr * t / W``;
    * with warm-up and the "linear" scheduler, update 0 uses the full ``lr``: the linear
      ``LambdaLR`` is built after the warm-up one on the same optimizer and its
      constructor overwrites the learning rate with ``lr * 1``;
    * ``min_lr`` floors the decayed rate only once the decay scheduler has stepped
      (updates ``t > W``); "constant" is never floored. These differ from a floor on
      every post-warm-up update only when ``min_lr > lr``.

    Degenerate cases Snorkel crashes on (division by zero) are made well defined: a
    warm-up that rounds down to 0 steps means no warm-up, and a decay over
    ``T - W <= 0`` updates is taken to last one update.

    Args:
      lr: base learning rate.
      lr_scheduler: "constant", "linear", "exponential", "step" or "cosine".
      config: warm-up, ``min_lr`` and decay settings.
      n_batches_per_epoch: train batches in one epoch (all train loaders together).
      n_epochs: number of epochs.

    Returns:
      ``(schedule, warmup_steps)``: a jittable ``optax.Schedule`` mapping an int update
      count to a float32 learning rate, and the number of warm-up updates.

    Raises:
      ValueError: if ``lr_scheduler`` is not one of the options above.
    """
    post_warmup = registry.LR_SCHEDULERS.load(lr_scheduler, "make_lr_schedule(lr_scheduler)")
    warmup_steps = resolve_warmup_steps(config, n_batches_per_epoch, n_epochs)
    total_steps = n_epochs * n_batches_per_epoch
    decay_steps = max(total_steps - warmup_steps, 1)
    post = post_warmup(lr, config, decay_steps)
    min_lr = config.min_lr
    floor = lr_scheduler != "constant" and min_lr > 0

    def post_floored(steps_after_warmup: jax.Array) -> jax.Array:
        value = post(steps_after_warmup)
        if not floor:
            return value
        # Snorkel clamps only after the decay scheduler's step; its first post-warm-up
        # update still runs with the unclamped lr.
        return jnp.where(steps_after_warmup > 0, jnp.maximum(value, min_lr), value)

    if warmup_steps > 0:
        warmup = optax.linear_schedule(0.0, lr, warmup_steps)
        joined = optax.join_schedules([warmup, post_floored], [warmup_steps])
    else:
        joined = post_floored
    linear_restarts = warmup_steps > 0 and lr_scheduler == "linear"

    def schedule(count: jax.typing.ArrayLike) -> jax.Array:
        value = jnp.asarray(joined(count), dtype=jnp.float32)
        if linear_restarts:
            value = jnp.where(jnp.asarray(count) == 0, jnp.float32(lr), value)
        return value

    return schedule, warmup_steps


def per_update_schedule(schedule: optax.ScalarOrSchedule, accumulation_steps: int
                        ) -> optax.ScalarOrSchedule:
    """``schedule`` (counted in batches) as the optimizer inside ``optax.MultiSteps`` sees
    it: its count ``c`` counts updates, update ``c`` is made of batches ``c*k .. c*k+k-1``
    (``k = accumulation_steps``) and applies the learning rate of its first batch,
    ``schedule(c * k)``. Warm-up and decay are thus as long in batches as configured,
    whatever ``k``. A number, or ``k == 1``, is returned as it is."""
    if accumulation_steps == 1 or not callable(schedule):
        return schedule

    def per_update(count: jax.typing.ArrayLike) -> jax.Array:
        return schedule(jnp.asarray(count) * accumulation_steps)

    return per_update


def applied_schedule(schedule: optax.Schedule, accumulation_steps: int) -> optax.Schedule:
    """The learning rate applied to batch ``step`` (0-based): that of the update the batch
    goes into, ``schedule((step // k) * k)`` (``per_update_schedule``); ``schedule``
    itself when ``k == 1``. What the Trainer logs as ``model/all/train/lr``."""
    if accumulation_steps == 1:
        return schedule

    def applied(step: jax.typing.ArrayLike) -> jax.Array:
        return schedule((jnp.asarray(step) // accumulation_steps) * accumulation_steps)

    return applied


__all__ = ["applied_schedule", "constant_decay", "cosine_decay", "exponential_decay", "linear_decay",
           "make_lr_schedule", "per_update_schedule", "resolve_warmup_steps", "step_decay"]
