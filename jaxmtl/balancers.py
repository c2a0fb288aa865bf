"""Multi-task gradient balancing, the public entry points (layer 3 of ``jaxmtl.core``'s list).

A ``Balancer`` is an optax-like pair of pure functions (``init``, ``update``); build one by
name with ``make_balancer`` and hand it to the Trainer or to ``TrainState.create``::

    balancer = jaxmtl.balancers.make_balancer("pcgrad", shared=["body"])
    jaxmtl.Trainer(balancer=balancer, batch_scheduler="mixed").fit(model, loaders)
    # or by name, settings in balancer_config (num_tasks and shared filled in):
    jaxmtl.Trainer(balancer="pcgrad", batch_scheduler="mixed")

``BALANCER_NAMES`` lists the methods (``jaxmtl.registry.BALANCERS``); the methods, their
states and solvers live in ``jaxmtl.training.balancers``.
"""

from __future__ import annotations

from .training.balancers import (
    BALANCER_NAMES,
    BalancedGrads,
    Balancer,
    balanced_grads,
    make_balancer,
    per_task_grads,
)

__all__ = [
    "BALANCER_NAMES",
    "BalancedGrads",
    "Balancer",
    "balanced_grads",
    "make_balancer",
    "per_task_grads",
]
