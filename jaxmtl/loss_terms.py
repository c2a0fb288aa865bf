"""Losses from a task graph's outputs: logits, masks, masked per-task loss terms.

Pure functions of already computed outputs (``model.apply_ops`` computes them): the
train step, the balancers and ``calculate_loss`` share them, so a padded row or a row
without a label (-1) is left out of every loss the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from .graph import ModelGraph

LossTerms = dict[str, tuple[jax.Array, jax.Array]]


def describe_value(value: Any) -> str:
    """A short description of an op output for error messages (shape, keys or type)."""
    if hasattr(value, "shape"):
        return f"array {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"dict with keys {sorted(map(str, value))}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def task_logits(graph: ModelGraph, outputs: Mapping[str, Any], task_name: str) -> jax.Array:
    """The output of a task's last op: its logits [B, K].

    Raises:
      ValueError: if that output is not an array of rank 2, naming the task and the op.
    """
    node_id = graph.output_node(task_name)
    logits = outputs[node_id]
    if not hasattr(logits, "shape") or not hasattr(logits, "dtype"):
        raise ValueError(
            f"Task '{task_name}': its last op '{graph.nodes[node_id].op.name}' returned "
            f"{describe_value(logits)}; the last op must return logits [B, K] (pick an element "
            f"of a tuple or dict output with an (op_name, index_or_key) input)")
    if logits.ndim != 2:
        raise ValueError(
            f"Task '{task_name}': its last op '{graph.nodes[node_id].op.name}' returned "
            f"logits of shape {tuple(logits.shape)}; expected [B, K] (rank 2: pool or "
            f"reshape sequence outputs before the head)")
    return logits


def active_mask(labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Rows that count in the loss: labelled (not -1) and, if ``mask`` is given, real. [B]."""
    labelled = labels != -1 if labels.ndim == 1 else jnp.any(labels != -1, axis=1)
    return labelled if mask is None else labelled & mask


def _safe_labels(labels: jax.Array, active: jax.Array) -> jax.Array:
    # Inactive rows get class 0 so a user loss never sees -1 (whose gradient could be NaN
    # even where the row is masked out afterwards).
    if labels.ndim == 1:
        return jnp.where(active, labels, 0)
    one_hot_first = jnp.zeros_like(labels).at[:, 0].set(1.0)
    return jnp.where(active[:, None], labels, one_hot_first)


def per_example_loss(loss_func: Callable, logits: jax.Array, labels: jax.Array,
                     task_name: str = "") -> jax.Array:
    """``loss_func``'s per-example losses [B], whichever of the two forms it has.

    The documented form returns [B] losses. Snorkel's form returns their mean, a scalar
    (``F.cross_entropy``, ``jaxmtl.cross_entropy``): it is then evaluated row by row
    (``jax.vmap`` over one-row batches), which gives each row's loss, so both forms train
    the same. Only the form that is used is compiled.

    Raises:
      ValueError: for any other output shape, or when ``loss_func`` fails on these
        arguments (naming the task and the arguments' shapes).
    """
    try:
        shape = jax.eval_shape(loss_func, logits, labels).shape
    except Exception as error:  # name the task: a raw TypeError from user code says little
        raise ValueError(
            f"Task '{task_name}': loss_func(logits {tuple(logits.shape)} {logits.dtype}, "
            f"labels {tuple(labels.shape)} {labels.dtype}) failed: "
            f"{type(error).__name__}: {error}") from error
    if shape == ():
        return jax.vmap(lambda row, label: loss_func(row[None], label[None]))(logits, labels)
    if shape != logits.shape[:1]:
        raise ValueError(
            f"Task '{task_name}': loss_func returned shape {shape}, expected per-example "
            f"losses of shape {logits.shape[:1]} or a scalar mean over the rows")
    return loss_func(logits, labels)


def losses_from_outputs(
    graph: ModelGraph,
    outputs: Mapping[str, Any],
    Y_dict: Mapping[str, jax.Array],
    mask: jax.Array | None = None,
) -> LossTerms:
    """Masked loss sums and counts per task from already computed outputs.

    Returns:
      task name -> (sum of per-example losses over active rows, number of active rows),
      for each label key of ``Y_dict`` that names a task of the graph.
    """
    terms: LossTerms = {}
    for task_name, labels in Y_dict.items():
        if task_name not in graph.op_sequences:
            continue
        # Losses are float32 even when the forward pass runs in bfloat16.
        logits = task_logits(graph, outputs, task_name).astype(jnp.float32)
        active = active_mask(labels, mask)
        per_example = per_example_loss(graph.loss_funcs[task_name], logits,
                                       _safe_labels(labels, active), task_name)
        loss_sum = jnp.sum(jnp.where(active, per_example, 0.0).astype(jnp.float32))
        terms[task_name] = (loss_sum, jnp.sum(active).astype(jnp.float32))
    return terms


def total_loss(graph: ModelGraph, terms: LossTerms,
               counts: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """Sum over tasks of ``loss_weight * masked mean``; a task with no active row adds 0.

    Args:
      graph: the task graph (for loss weights).
      terms: task -> (loss sum, count), e.g. from ``task_loss_terms``.
      counts: optional task -> count to divide by instead of the terms' own counts (the
        global count across devices, so that the mean is over all devices' rows).
    """
    loss = jnp.zeros((), jnp.float32)
    for task_name, (loss_sum, count) in terms.items():
        divisor = count if counts is None else counts[task_name]
        loss = loss + graph.loss_weights[task_name] * loss_sum / jnp.maximum(divisor, 1.0)
    return loss
