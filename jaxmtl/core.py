"""The pure core of jaxmtl: functions of pytrees for a hand-written JAX loop.

jaxmtl's public API has three layers:

1. ``jaxmtl`` (top level): Snorkel's ``snorkel.classification`` surface plus scoring —
   ``DictDataset``, ``DictDataLoader``, ``Operation``, ``Task``, ``MultitaskClassifier``,
   ``Trainer`` and its configs and services, ``Scorer`` and the metric/label utilities.
   A Snorkel script ports by swapping imports. (Names of this module are importable from
   the top level too, for compatibility; this is their documented home.)
2. ``jaxmtl.core`` (this module): the pure functions and the state record those classes
   are thin shells over. Nothing here holds state or does I/O; every function can be
   ``jax.jit``-ed, ``jax.grad``-ed or ``jax.pmap``-ed::

       graph = build_graph(tasks)                          # static: close over it
       variables = init_variables(graph, X_batch, jax.random.PRNGKey(0))
       state = TrainState.create(variables, optax.adam(1e-2), jax.random.PRNGKey(0))
       step = jax.jit(functools.partial(train_step, graph), donate_argnums=0)
       state, metrics = step(state, X_batch, Y_batch, batch.mask)

   The step functions: ``train_step`` (one batch), ``train_step_on`` (several batches,
   optionally combined by a ``Balancer``), ``family_train_step`` (tasks of one input
   signature sharing one program, selected by a task index).
3. ``jaxmtl.balancers``: multi-task gradient balancing as optax-like pure pairs
   (``Balancer``, ``make_balancer``); pass one to ``Trainer(balancer=...)`` or to
   ``TrainState.create(..., balancer=...)``. The services (``jaxmtl.training.*``:
   checkpointing, log writers, schedulers) and ``jaxmtl.registry`` (the named choices of
   every setting) complete the picture.
"""

from __future__ import annotations

from .initialisation import init_variables
from .model import (
    ModelGraph,
    apply_ops,
    build_graph,
    task_loss_terms,
    task_probs,
    total_loss,
)
from .training.balancers import Balancer, balanced_grads, make_balancer
from .training.lr_schedules import make_lr_schedule
from .training.state import TrainState, make_optimizer
from .training.step import family_train_step, train_step, train_step_on

__all__ = [
    "Balancer",
    "ModelGraph",
    "TrainState",
    "apply_ops",
    "balanced_grads",
    "build_graph",
    "family_train_step",
    "init_variables",
    "make_balancer",
    "make_lr_schedule",
    "make_optimizer",
    "task_loss_terms",
    "task_probs",
    "total_loss",
    "train_step",
    "train_step_on",
]
