"""The training state and its optimizer: what a train step reads and writes.

``TrainState`` is one pytree (params, model state, optimizer state, step, PRNG key,
balancer state) that is jitted, pmapped, donated and checkpointed; ``make_optimizer``
builds the optax chain that Snorkel's torch optimizers correspond to.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from .. import registry
from ..initialisation import one_shot_compiler_options
from ..model import PyTree
from .balancers import Balancer
from .config import OptimizerConfig, TrainerConfig
from .lr_schedules import per_update_schedule
from .module_optimizers import (
    module_optimizers_transform,
    optimizer_transforms,
    zero_frozen_gradients,
)

# Precision name -> compute dtype (None: the parameters' float32), from the one registry.
PRECISIONS = {name: registry.PRECISIONS.load(name, "PRECISIONS")
              for name in registry.PRECISIONS.names}


class TrainState(struct.PyTreeNode):
    """Everything a training step reads and writes, as one pytree.

    Attributes:
      step: number of optimizer updates applied (int32 scalar).
      params: ``{module_name: params}`` (the Flax "params" collection).
      model_state: the other collections, e.g. ``{"batch_stats": {...}}``.
      opt_state: the optax state of ``tx``.
      rng: PRNG key (uint32[2]); step ``s`` draws dropout keys from ``fold_in(rng, s)``.
      balancer_state: the state of ``balancer`` (``optax.EmptyState()`` without one).
      tx: the optax transformation (static, not a leaf).
      balancer: the multi-task ``Balancer``, or None for the plain summed loss (static).
      precision: "fp32", or "bf16" to compute the forward and backward pass in bfloat16
        on float32 master parameters (static).
    """

    step: jax.Array
    params: PyTree
    model_state: PyTree
    opt_state: PyTree
    rng: jax.Array
    balancer_state: PyTree
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    balancer: Balancer | None = struct.field(pytree_node=False, default=None)
    precision: str = struct.field(pytree_node=False, default="fp32")

    @classmethod
    def create(cls, variables: PyTree, tx: optax.GradientTransformation, rng: jax.Array,
               balancer: Balancer | None = None, precision: str = "fp32") -> TrainState:
        """A fresh state: optimizer (and balancer) initialised on ``variables["params"]``."""
        # One compiled program instead of an eager op (and its compile) per leaf shape.
        return cls._fresh(variables, tx, rng, balancer, precision, _compiled_init(tx))

    @classmethod
    def abstract(cls, variables: PyTree, tx: optax.GradientTransformation, rng: jax.Array,
                 balancer: Balancer | None = None, precision: str = "fp32") -> TrainState:
        """What ``create`` would return, as ``jax.ShapeDtypeStruct`` leaves, from the
        variables' shapes (arrays or specs): traced, nothing computed or compiled."""
        return jax.eval_shape(
            lambda v, key: cls._fresh(v, tx, key, balancer, precision, tx.init),
            variables, rng)

    @classmethod
    def _fresh(cls, variables: PyTree, tx: optax.GradientTransformation, rng: jax.Array,
               balancer: Balancer | None, precision: str, init_optimizer: Callable
               ) -> TrainState:
        registry.PRECISIONS.check(precision, "TrainState.create(precision)")
        params = variables.get("params", {})
        model_state = {col: tree for col, tree in variables.items() if col != "params"}
        balancer_state = balancer.init(params) if balancer is not None else optax.EmptyState()
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            model_state=model_state,
            opt_state=_unaliased(init_optimizer(params)),
            rng=rng,
            balancer_state=_unaliased(balancer_state),
            tx=tx,
            balancer=balancer,
            precision=precision,
        )

    @property
    def variables(self) -> PyTree:
        """``{"params": params, **model_state}``, the model's variables."""
        return {"params": self.params, **self.model_state}


@functools.lru_cache(maxsize=8)
def _compiled_init(tx: optax.GradientTransformation) -> Any:
    """``tx.init`` as one compiled program, kept per transformation: the Trainer reuses its
    optimizer across fits of one configuration, so a second fit traces nothing. It runs
    once per fit: compiled as such (``one_shot_compiler_options``)."""
    return jax.jit(tx.init, compiler_options=one_shot_compiler_options())


def make_optimizer(config: TrainerConfig, learning_rate: optax.ScalarOrSchedule,
                   schedule_for: Callable[[float], optax.ScalarOrSchedule] | None = None
                   ) -> optax.GradientTransformation:
    """The optax chain Snorkel's torch optimizers correspond to.

    Clipping of the global gradient norm comes first (as ``clip_grad_norm_`` before
    ``optimizer.step()``); then torch-style coupled L2 (``weight_decay``: the decay is
    added to the gradient before the optimizer's moments); then the optimizer scaled by
    ``-learning_rate``. A user-supplied ``optax.GradientTransformation`` replaces the
    last two and is used as given. With ``config.module_optimizers``, the part after the
    clip is one transformation per module group (``optax.partition``; frozen modules'
    gradients are zeroed before the clip): see ``training.module_optimizers``.
    With ``grad_accumulation_steps = k > 1`` the whole chain is wrapped in
    ``optax.MultiSteps``: parameters change every k-th step, on the mean of the k
    gradients, and a schedule (counted in batches, as the Trainer builds it) is read at
    the update's first batch (``lr_schedules.per_update_schedule``), so warm-up and decay
    last as many batches as configured.

    Args:
      config: the trainer settings.
      learning_rate: the base learning rate, a number or an ``optax.Schedule``.
      schedule_for: ``schedule_for(lr)`` -> the learning rate of a module group whose
        overrides set ``lr`` (the Trainer passes ``module_optimizers.lr_schedule_for``);
        without it, ``learning_rate`` scaled by ``lr / config.lr``.
    """
    k = config.grad_accumulation_steps
    if k > 1:  # schedules count batches; the optimizer inside MultiSteps counts updates
        learning_rate = per_update_schedule(learning_rate, k)
        if schedule_for is not None:
            per_batch = schedule_for

            def schedule_for(lr: float) -> optax.ScalarOrSchedule:
                return per_update_schedule(per_batch(lr), k)
    chain: list[optax.GradientTransformation] = []
    if config.module_optimizers and config.grad_clip:
        zero_frozen = zero_frozen_gradients(config.module_optimizers)
        chain.extend([zero_frozen] if zero_frozen is not None else [])
    if config.grad_clip:
        chain.append(optax.clip_by_global_norm(config.grad_clip))
    if config.module_optimizers:
        chain.append(module_optimizers_transform(config, learning_rate, schedule_for))
    else:  # flat, as before per-module optimisers: saved optimizer states still load
        chain.extend(optimizer_transforms(config.optimizer, config.l2,
                                          config.optimizer_config, learning_rate))
    return _accumulate(optax.chain(*chain), config)


# Each optimizer's direction, before the learning rate scales it: a tuple of transforms
# for ``optax.chain`` (empty for plain SGD, so that its optimizer state stays as it was).

def scale_by_sgd(options: OptimizerConfig) -> tuple[optax.GradientTransformation, ...]:
    """torch's SGD direction: momentum without dampening (``sgd_config.momentum``)."""
    momentum = options.sgd_config.momentum
    return (optax.trace(decay=momentum, nesterov=False),) if momentum else ()


def per_module(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` applied to each module (top-level key of a params dict) with its own state.

    torch counts Adam's steps per parameter, and a parameter whose gradient is None (its
    module not run by the batch's task) takes no step, so its bias correction does not
    advance. Here each module keeps its own ``inner`` state (count included) under its
    name; the train step restores the state of the modules a batch did not run
    (``update.keep_modules``), so each module's count is the number of steps that ran
    it, as torch's. A params tree that is not a dict gets ``inner`` as it is; a module
    masked out (``optax.masked``, per-module optimisers) keeps no state, an
    ``optax.MaskedNode``.
    """
    def init(params: PyTree) -> PyTree:
        if not isinstance(params, dict):
            return inner.init(params)
        # A module without leaves here (masked out by optax.masked) keeps no state.
        return {name: inner.init(value) if jax.tree.leaves(value) else optax.MaskedNode()
                for name, value in params.items()}

    def update(updates: PyTree, state: PyTree, params: PyTree | None = None) -> tuple:
        if not isinstance(updates, dict):
            return inner.update(updates, state, params)
        new_updates, new_state = {}, {}
        for name, value in updates.items():
            if isinstance(state[name], optax.MaskedNode):
                new_updates[name], new_state[name] = value, state[name]
                continue
            new_updates[name], new_state[name] = inner.update(
                value, state[name], None if params is None else params[name])
        return new_updates, new_state

    return optax.GradientTransformation(init, update)


def scale_by_torch_adam(options: OptimizerConfig) -> tuple[optax.GradientTransformation, ...]:
    """torch's Adam (or AMSGrad) direction from ``adam_config``, a step count per module
    (``per_module``)."""
    b1, b2 = options.adam_config.betas
    scale = optax.scale_by_amsgrad if options.adam_config.amsgrad else optax.scale_by_adam
    return (per_module(scale(b1=b1, b2=b2, eps=options.adam_config.eps)),)


def scale_by_torch_adamax(options: OptimizerConfig) -> tuple[optax.GradientTransformation, ...]:
    """torch's Adamax direction from ``adamax_config``, a step count per module."""
    b1, b2 = options.adamax_config.betas
    return (per_module(optax.scale_by_adamax(b1=b1, b2=b2, eps=options.adamax_config.eps)),)


def _accumulate(tx: optax.GradientTransformation, config: TrainerConfig
                ) -> optax.GradientTransformation:
    if config.grad_accumulation_steps == 1:
        return tx
    return optax.MultiSteps(tx, every_k_schedule=config.grad_accumulation_steps).gradient_transformation()


def _unaliased(tree: PyTree) -> PyTree:
    """``tree`` with a repeated array object replaced by a host copy.

    An init may put one array in two places; the step donates its inputs, and donating
    one buffer twice is an error.
    """
    seen: set[int] = set()

    def fresh(leaf: Any) -> Any:
        if id(leaf) in seen:
            return np.array(leaf)
        seen.add(id(leaf))
        return leaf

    return jax.tree.map(fresh, tree)


def own_buffers(tree: Any) -> Any:
    """A copy of every array of ``tree``: buffers the step may donate.

    The step donates its state; without the copy it would delete arrays the caller still
    holds (the dict ``model.init`` returned, a ``model.params`` taken before ``fit``).
    """
    leaves, treedef = jax.tree.flatten(tree)
    arrays = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array)]
    # A device-to-device copy: no program to compile (jnp.copy would compile per shape).
    copies = jax.device_put([leaves[i] for i in arrays], may_alias=False)
    for i, copy in zip(arrays, copies, strict=True):
        leaves[i] = copy
    return jax.tree.unflatten(treedef, leaves)
