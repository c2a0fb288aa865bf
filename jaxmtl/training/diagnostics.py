"""Interference diagnostics: how the tasks' gradients on the shared parameters relate.

Opt-in with ``TrainerConfig(log_task_gradients=True)``. Inside the jitted step the
per-task gradients on the shared parameters (the modules two or more tasks run) are
reduced to a [T, T] Gram matrix, and sums are added to an on-device accumulator, the
``"diagnostics"`` entry of the loss accumulator::

    accumulator = zero_loss_accumulator(n_loaders, n_tasks, diagnostics=True)
    ...  # in the step (accumulate.fit_group_step):
    diagnostics = accumulate_diagnostics(diagnostics, task_grads, weights, task_mask)
    ...  # at an evaluation, on the host:
    metrics.update(diagnostics_metrics(runner.host(accumulator), task_names))

so nothing is read back between evaluations. At each evaluation the Trainer logs the
averages since the previous one:

- ``diagnostics/grad_norm/<task>``: the task's gradient norm on the shared parameters,
  averaged over the steps whose batches hold an active row of the task;
- ``diagnostics/cosine/<task_a>/<task_b>``: the cosine between the two tasks' gradients
  (``task_a`` before ``task_b`` in the model's task order), averaged over the steps that
  hold both tasks;
- ``diagnostics/weight/<task>``: the balancer's weight of the task (1.0 for equal
  weighting), averaged over the steps that hold the task;
- ``diagnostics/conflict_fraction``: the fraction of the steps holding two or more tasks
  in which some pair had a negative cosine.

Only a step whose batches hold two or more tasks (the "mixed" scheduler, or a dataset
labelling several tasks) gives a cosine; with one task per step only the norms and
weights are logged (no cosine, no conflict fraction).

Gradient balancers that differentiate each task (``Balancer.needs_task_grads`` without
``representation_grads``: pcgrad, cagrad, mgda, gradnorm, nash_mtl, imtl, aligned_mtl,
upgrad, db_mtl) already hold the per-task gradients; the diagnostics reuse them and add
only the Gram matrix (O(T^2 P) for P shared parameters). For the others (no balancer /
"equal", uncertainty, dwa, rlw, famo, MGDA-UB) the step computes them for the
diagnostics (``gradients.shared_task_grads``): one more forward and backward pass per
task, about twice the step's cost. The training update itself is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..model import ModelGraph, PyTree
from .balancers import gram_matrix

__all__ = ["DIAGNOSTICS", "accumulate_diagnostics", "diagnostics_metrics",
           "shared_modules", "zero_diagnostics"]

#: The accumulator's entry that holds the diagnostics sums (absent when they are off).
DIAGNOSTICS = "diagnostics"
PREFIX = "diagnostics"


def shared_modules(graph: ModelGraph, params: Mapping[str, Any]) -> tuple[str, ...]:
    """The parameterised modules that two or more tasks run, sorted.

    The same rule as the balancers' ``shared`` (``balancers.balancer_for_tasks``). A
    model in which no module with parameters is shared gets all of its modules (the
    cosines are then 0: the gradients lie on disjoint parameters).

    Args:
      graph: the task graph.
      params: ``{module_name: params}``; only its keys are read.
    """
    uses: dict[str, int] = {}
    for ops in graph.op_sequences.values():
        for module in {op.module_name for op in ops}:
            uses[module] = uses.get(module, 0) + 1
    shared = sorted(m for m, n in uses.items() if n > 1 and m in params)
    return tuple(shared) if shared else tuple(sorted(params))


def zero_diagnostics(n_tasks: int) -> dict[str, np.ndarray]:
    """The diagnostics sums, zero, as host arrays (each its own buffer: the step donates).

    Returns:
      ``task_steps`` [T] (steps holding the task), ``grad_norm_sum`` [T],
      ``weight_sum`` [T], ``cosine_sum`` [T, T] and ``pair_steps`` [T, T] (upper
      triangle: steps holding both tasks), ``conflict_steps`` and ``paired_steps``
      (scalars: steps with a negative cosine, steps holding two or more tasks).
    """
    vector = lambda: np.zeros((n_tasks,), np.float32)  # noqa: E731
    matrix = lambda: np.zeros((n_tasks, n_tasks), np.float32)  # noqa: E731
    return {"task_steps": vector(), "grad_norm_sum": vector(), "weight_sum": vector(),
            "cosine_sum": matrix(), "pair_steps": matrix(),
            "conflict_steps": np.zeros((), np.float32),
            "paired_steps": np.zeros((), np.float32)}


def accumulate_diagnostics(sums: Mapping[str, jax.Array], task_grads: PyTree,
                           weights: jax.Array, task_mask: jax.Array) -> dict[str, jax.Array]:
    """``sums`` plus one step's norms, cosines, weights and conflict (pure, jittable).

    Args:
      sums: as ``zero_diagnostics``.
      task_grads: the step's per-task gradients on the shared parameters, leaves
        [T, ...] (summed across devices under pmap: every replica adds the same).
      weights: [T] the balancer's task weights of the step.
      task_mask: [T] bool, the tasks with an active row in the step.

    Returns:
      The new sums (same structure).
    """
    gram = gram_matrix(task_grads)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    product = norms[:, None] * norms[None, :]
    # A zero gradient has no direction: its cosine counts as 0 (neither side of 0).
    cosine = jnp.where(product > 0, gram / jnp.where(product > 0, product, 1.0), 0.0)
    n_tasks = task_mask.shape[0]
    upper = np.triu(np.ones((n_tasks, n_tasks), bool), k=1)
    pair = upper & task_mask[:, None] & task_mask[None, :]
    present = task_mask.astype(jnp.float32)
    has_pair = jnp.any(pair)
    return {
        "task_steps": sums["task_steps"] + present,
        "grad_norm_sum": sums["grad_norm_sum"] + jnp.where(task_mask, norms, 0.0),
        "weight_sum": sums["weight_sum"] + jnp.where(task_mask, weights, 0.0).astype(
            jnp.float32),
        "cosine_sum": sums["cosine_sum"] + jnp.where(pair, cosine, 0.0),
        "pair_steps": sums["pair_steps"] + pair.astype(jnp.float32),
        "conflict_steps": sums["conflict_steps"] + jnp.any(pair & (cosine < 0)).astype(
            jnp.float32),
        "paired_steps": sums["paired_steps"] + has_pair.astype(jnp.float32),
    }


def diagnostics_metrics(accumulated: Mapping[str, Any], task_names: Sequence[str]
                        ) -> dict[str, float]:
    """The logged averages from an accumulator read back to the host.

    Args:
      accumulated: the loss accumulator (host copy); without a ``"diagnostics"`` entry
        (diagnostics off) the result is empty.
      task_names: the model's tasks, in the accumulator's order.

    Returns:
      ``diagnostics/...`` name -> value, for the tasks and pairs seen since the sums were
      zeroed (see the module docstring).
    """
    if DIAGNOSTICS not in accumulated:
        return {}
    sums = {key: np.asarray(value, np.float64) for key, value in
            accumulated[DIAGNOSTICS].items()}
    metrics: dict[str, float] = {}
    for t, task in enumerate(task_names):
        steps = sums["task_steps"][t]
        if steps > 0:
            metrics[f"{PREFIX}/grad_norm/{task}"] = float(sums["grad_norm_sum"][t] / steps)
            metrics[f"{PREFIX}/weight/{task}"] = float(sums["weight_sum"][t] / steps)
    for a, task_a in enumerate(task_names):
        for b in range(a + 1, len(task_names)):
            steps = sums["pair_steps"][a, b]
            if steps > 0:
                metrics[f"{PREFIX}/cosine/{task_a}/{task_names[b]}"] = float(
                    sums["cosine_sum"][a, b] / steps)
    if sums["paired_steps"] > 0:
        metrics[f"{PREFIX}/conflict_fraction"] = float(
            sums["conflict_steps"] / sums["paired_steps"])
    return metrics
