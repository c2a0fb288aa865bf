"""Applying a step's gradient: the optimizer update, and the modules it must not move.

Shared by every step in ``step.py``: ``finish_step`` turns a ``StepGrads`` into the next
``TrainState`` (running statistics averaged across devices, the optimizer update), and
``apply_update`` keeps the parameters and optimizer moments of modules no task of the
batch ran (as torch skips parameters whose gradient is None).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ..model import ModelGraph, PyTree
from .gradients import Batch, StepContext, StepGrads
from .state import TrainState


def modules_used(graph: ModelGraph, batches: Sequence[Batch]) -> set[str]:
    """The modules the batches' tasks run."""
    tasks = [name for _, Y_dict, _ in batches for name in Y_dict if name in graph.op_sequences]
    return {op.module_name for op in graph.ops_for(list(dict.fromkeys(tasks)))}


def keep_modules(new: PyTree, old: PyTree, modules: set[str]) -> PyTree:
    """``new`` with the leaves under a params-mirroring ``[module]`` key taken from ``old``.

    Optimizer states mirror the params tree (Adam's ``mu``/``nu``, momentum traces) below
    NamedTuple fields; the first dict key on a leaf's path is then a module name.
    """
    def pick(path: tuple, new_leaf: Any, old_leaf: Any) -> Any:
        keys = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
        return old_leaf if keys and keys[0] in modules else new_leaf

    return jax.tree_util.tree_map_with_path(pick, new, old)


def keep_members(new: PyTree, old: PyTree, unused: set[str], owner: Mapping[str, int],
                 member: jax.Array) -> PyTree:
    """``keep_modules`` for a family step: ``unused`` modules and the slot modules of the
    members other than ``member`` (``owner``: slot module -> its member) keep ``old``."""
    def pick(path: tuple, new_leaf: Any, old_leaf: Any) -> Any:
        keys = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
        if not keys:
            return new_leaf
        if keys[0] in unused:
            return old_leaf
        if keys[0] in owner:
            return jnp.where(member == owner[keys[0]], new_leaf, old_leaf)
        return new_leaf

    return jax.tree_util.tree_map_with_path(pick, new, old)


def apply_update(state: TrainState, grads: PyTree,
                 keep: Callable[[PyTree, PyTree], PyTree] | None = None,
                 **fields: Any) -> TrainState:
    """The optimizer's update of ``state`` by ``grads``; the step count advances.

    Args:
      state: the state before the step.
      grads: the gradient (summed across devices).
      keep: ``keep(new, old) -> tree``, applied to the params and to the optimizer state:
        takes the leaves that must not move (modules no task of the batch ran: as torch
        skips parameters whose gradient is None, momentum would move them) from ``old``.
      **fields: further TrainState fields to replace (model_state, balancer_state).
    """
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if keep is not None:
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, **fields)


def finish_step(graph: ModelGraph, state: TrainState, batches: Sequence[Batch],
                ctx: StepContext, out: StepGrads, skip_inactive: bool = True
                ) -> tuple[TrainState, dict[str, Any]]:
    """Applies a ``StepGrads``: running statistics averaged across devices, the optimizer
    update with unused modules kept; with ``skip_inactive``, no update without an
    active row."""
    model_state = out.model_state
    if ctx.axis_name is not None:  # running statistics averaged: replicas stay identical
        model_state = jax.lax.pmean(model_state, ctx.axis_name)
    unused = set(state.params) - modules_used(graph, batches)
    keep = (lambda new, old: keep_modules(new, old, unused)) if unused else None
    updated = apply_update(state, out.grads, keep, model_state=model_state,
                           balancer_state=out.balancer_state)
    metrics = {"batch_terms": out.batch_terms, "loss": out.loss, "weights": out.weights}
    if not skip_inactive:
        return updated, metrics
    return jax.lax.cond(jnp.any(ctx.task_mask), lambda: updated, lambda: state), metrics


def without_optimizer_state(state: TrainState) -> TrainState:
    """``state`` for a ``lax.switch`` operand: the passes do not read the optimizer state,
    and a switch's operands may be copied into it (measured: +15 % steady step time)."""
    return state.replace(opt_state=())
