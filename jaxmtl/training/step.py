"""The pure train step: a ``TrainState`` pytree in, a ``TrainState`` and metrics out.

    state = TrainState.create(variables, tx, jax.random.PRNGKey(0))
    step = jax.jit(functools.partial(train_step, graph), donate_argnums=0)
    for X, Y in loader:
        state, metrics = step(state, X, Y, batch.mask)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from ..model import ModelGraph, PyTree, task_loss_terms, total_loss
from .config import TrainerConfig


class TrainState(struct.PyTreeNode):
    """Everything a training step reads and writes, as one pytree.

    Attributes:
      step: number of optimizer updates applied (int32 scalar).
      params: ``{module_name: params}`` (the Flax "params" collection).
      model_state: the other collections, e.g. ``{"batch_stats": {...}}``.
      opt_state: the optax state of ``tx``.
      rng: PRNG key (uint32[2]); step ``s`` draws dropout keys from ``fold_in(rng, s)``.
      tx: the optax transformation (static, not a leaf).
    """

    step: jax.Array
    params: PyTree
    model_state: PyTree
    opt_state: PyTree
    rng: jax.Array
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @classmethod
    def create(cls, variables: PyTree, tx: optax.GradientTransformation,
               rng: jax.Array) -> TrainState:
        """A fresh state: optimizer initialised on ``variables["params"]``."""
        params = variables.get("params", {})
        model_state = {col: tree for col, tree in variables.items() if col != "params"}
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            model_state=model_state,
            opt_state=tx.init(params),
            rng=rng,
            tx=tx,
        )

    @property
    def variables(self) -> PyTree:
        """``{"params": params, **model_state}``, the model's variables."""
        return {"params": self.params, **self.model_state}


def make_optimizer(config: TrainerConfig, learning_rate: optax.ScalarOrSchedule
                   ) -> optax.GradientTransformation:
    """The optax chain Snorkel's torch optimizers correspond to.

    Clipping of the global gradient norm comes first (as ``clip_grad_norm_`` before
    ``optimizer.step()``); then torch-style coupled L2 (``weight_decay``: the decay is
    added to the gradient before the optimizer's moments); then the optimizer scaled by
    ``-learning_rate``. A user-supplied ``optax.GradientTransformation`` replaces the
    last two and is used as given.
    """
    chain: list[optax.GradientTransformation] = []
    if config.grad_clip:
        chain.append(optax.clip_by_global_norm(config.grad_clip))
    if isinstance(config.optimizer, optax.GradientTransformation):
        chain.append(config.optimizer)
        return optax.chain(*chain)
    if config.l2:
        chain.append(optax.add_decayed_weights(config.l2))
    options = config.optimizer_config
    if config.optimizer == "sgd":
        if options.sgd_config.momentum:
            chain.append(optax.trace(decay=options.sgd_config.momentum, nesterov=False))
    elif config.optimizer == "adam":
        b1, b2 = options.adam_config.betas
        scale = optax.scale_by_amsgrad if options.adam_config.amsgrad else optax.scale_by_adam
        chain.append(scale(b1=b1, b2=b2, eps=options.adam_config.eps))
    elif config.optimizer == "adamax":
        b1, b2 = options.adamax_config.betas
        chain.append(optax.scale_by_adamax(b1=b1, b2=b2, eps=options.adamax_config.eps))
    else:
        raise ValueError(f"Unrecognized optimizer option '{config.optimizer}'")
    chain.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*chain)


def train_step(
    graph: ModelGraph,
    state: TrainState,
    X_dict: Mapping[str, jax.Array],
    Y_dict: Mapping[str, jax.Array],
    mask: jax.Array,
    axis_name: Any = None,
) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer update on the batch's tasks.

    The loss is the sum over the batch's tasks of ``loss_weight * masked mean loss``
    (rows with label -1 and padded rows excluded). A batch with no active row leaves the
    state unchanged, as Snorkel skips its backward pass. Modules that none of the batch's
    tasks use keep their parameters and optimizer moments, as torch leaves parameters
    without a gradient alone (optax's update count, used for bias correction, is global).

    Args:
      graph: the task graph (static).
      state: the current TrainState.
      X_dict: input name -> [B, ...].
      Y_dict: label name -> [B] ints or [B, K] probabilities; names that are tasks train.
      mask: [B] bool, False on padded rows.
      axis_name: under ``jax.pmap``, the device axis name: the means then run over the
        rows of all devices and the gradients are summed across them.

    Returns:
      (state, metrics): metrics["terms"] maps task -> (loss sum, active count) of this
      batch (this device's share under pmap); metrics["loss"] is the summed task loss.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:  # each device draws its own dropout masks
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

    def loss_fn(params: PyTree) -> tuple[jax.Array, tuple]:
        variables = {"params": params, **state.model_state}
        terms, new_variables = task_loss_terms(
            graph, variables, X_dict, Y_dict, mask, train=True, rng=rng
        )
        counts = {name: count for name, (_, count) in terms.items()}
        if axis_name is not None:
            counts = jax.lax.psum(counts, axis_name)
        loss = total_loss(graph, terms, counts)
        model_state = {col: tree for col, tree in new_variables.items() if col != "params"}
        return loss, (terms, counts, model_state)

    (loss, (terms, counts, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    if axis_name is not None:
        grads = jax.lax.psum(grads, axis_name)
        loss = jax.lax.psum(loss, axis_name)
        # Running statistics are averaged so replicas stay identical.
        model_state = jax.lax.pmean(model_state, axis_name)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    unused = set(state.params) - _modules_used(graph, Y_dict)
    if unused:
        # As torch skips parameters whose gradient is None, modules outside this batch's
        # tasks keep their weights and optimizer moments (momentum would move them).
        params = {name: state.params[name] if name in unused else tree
                  for name, tree in params.items()}
        opt_state = _keep_modules(opt_state, state.opt_state, unused)
    updated = state.replace(step=state.step + 1, params=params, model_state=model_state,
                            opt_state=opt_state)
    any_active = sum(counts.values(), jnp.zeros((), jnp.float32)) > 0
    new_state = jax.lax.cond(any_active, lambda: updated, lambda: state)
    return new_state, {"terms": terms, "loss": loss}


def _modules_used(graph: ModelGraph, Y_dict: Mapping[str, Any]) -> set[str]:
    tasks = [name for name in Y_dict if name in graph.op_sequences]
    return {op.module_name for op in graph.ops_for(tasks)}


def _keep_modules(new: PyTree, old: PyTree, modules: set[str]) -> PyTree:
    """``new`` with the leaves under a params-mirroring ``[module]`` key taken from ``old``.

    Optimizer states mirror the params tree (Adam's ``mu``/``nu``, momentum traces) below
    NamedTuple fields; the first dict key on a leaf's path is then a module name.
    """
    def pick(path: tuple, new_leaf: Any, old_leaf: Any) -> Any:
        keys = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
        return old_leaf if keys and keys[0] in modules else new_leaf

    return jax.tree_util.tree_map_with_path(pick, new, old)
