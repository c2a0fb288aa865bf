"""Multi-task gradient balancing: loss weighting and gradient combination methods.

A balancer is an optax-like ``Balancer(init, update, needs_task_grads, weighted_loss)``
of pure functions whose state is a pytree of arrays (see ``base.py``). Build one by
name with ``make_balancer``; in a jitted train step, ``balanced_grads`` computes the
per-task losses and, only for gradient methods, the per-task gradients, and returns
the gradient to hand to the optimizer:

    balancer = make_balancer("pcgrad", shared=["linear1A"])
    balancer_state = balancer.init(params)
    out = balanced_grads(balancer, task_loss_vector, params, balancer_state,
                         rng=rng, task_mask=task_mask, loss_args=(batch,))
    updates, opt_state = tx.update(out.grads, opt_state, params)

Methods: "equal" (default), "uncertainty", "dwa", "rlw", "famo" (loss weighting, in
``weighting.py``) and "gradnorm", "pcgrad", "cagrad", "mgda" (gradient methods, in
``gradient.py``), "nash_mtl" (``nash.py``), "imtl" (``imtl.py``), "aligned_mtl"
(``aligned.py``), "upgrad" (``upgrad.py``), "db_mtl" (``dbmtl.py``); solvers in
``solvers.py`` and beside each method.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from ... import registry
from .aligned import aligned_mtl, aligned_weights
from .base import (
    BalancedGrads,
    Balancer,
    InitFn,
    PyTree,
    SharedSpec,
    UpdateFn,
    balanced_grads,
    gram_matrix,
    merge_shared,
    per_task_grads,
    shared_mask,
    split_shared,
    weighted_task_sum,
)
from .dbmtl import DBMTLState, db_mtl
from .gradient import GradNormState, cagrad, gradnorm, mgda, pcgrad
from .imtl import IMTLState, imtl, imtl_weights
from .nash import nash_mtl, nash_weights
from .solvers import (
    cagrad_dual_weights,
    min_norm_weights,
    pcgrad_coefficients,
    project_to_simplex,
)
from .upgrad import dual_cone_weights, upgrad, upgrad_weights
from .weighting import DWAState, FAMOState, UncertaintyState, dwa, equal, famo, rlw, uncertainty

# The names and their factories come from one registry (``jaxmtl.registry.BALANCERS``),
# which configuration validation reads too; a new method is one line there.
BALANCER_NAMES: tuple[str, ...] = registry.BALANCERS.names
# Name -> factory, for callers that fill in settings the factory accepts (num_tasks, shared).
BALANCER_FACTORIES: dict[str, Callable[..., Balancer]] = {
    name: registry.BALANCERS.load(name, "BALANCER_FACTORIES") for name in BALANCER_NAMES}


def make_balancer(name: str = "equal", **config: Any) -> Balancer:
    """Build a balancer by name.

    Args:
      name: one of ``BALANCER_NAMES``: "equal", "uncertainty", "dwa", "rlw", "gradnorm",
        "pcgrad", "cagrad", "mgda", "famo", "nash_mtl", "imtl", "aligned_mtl",
        "upgrad", "db_mtl".
      **config: the keyword arguments of the method's factory (e.g. ``num_tasks=3``,
        ``temperature=2.0``, ``shared=["encoder"]``); see each factory's docstring.
        "uncertainty", "dwa", "gradnorm", "famo", "imtl" and "db_mtl" keep [T] state
        and need ``num_tasks``. "mgda", "imtl" and "aligned_mtl" accept
        ``upper_bound=True`` (weights from the gradients w.r.t. the shared
        representation, ``Balancer.representation_grads``; one device or
        ``parallel="sharded"`` only).

    Returns:
      The ``Balancer``.

    Raises:
      ValueError: for an unknown name, unknown or missing config keys, or bad values.
    """
    if name not in BALANCER_FACTORIES:
        raise ValueError(f"Unknown balancer {name!r}; valid names: {', '.join(BALANCER_NAMES)}")
    factory = BALANCER_FACTORIES[name]
    parameters = inspect.signature(factory).parameters
    unknown = sorted(set(config) - set(parameters))
    if unknown:
        raise ValueError(f"Balancer {name!r}: unknown config key(s) {unknown}; "
                         f"allowed: {sorted(parameters)}")
    missing = sorted(key for key, parameter in parameters.items()
                     if parameter.default is inspect.Parameter.empty and key not in config)
    if missing:
        raise ValueError(f"Balancer {name!r}: missing required config key(s) {missing}")
    return factory(**config)


def balancer_for_tasks(name: str, config: dict[str, Any],
                       task_modules: dict[str, set[str]]) -> Balancer:
    """``make_balancer(name, **config)`` with ``num_tasks`` and ``shared`` filled in.

    Args:
      name: a balancer name (``BALANCER_NAMES``).
      config: the method's settings; given keys are kept.
      task_modules: task name -> the module names its ops use (in task order); a module
        used by two or more tasks is shared.
    """
    settings = dict(config)
    parameters = inspect.signature(BALANCER_FACTORIES[name]).parameters if \
        name in BALANCER_FACTORIES else {}
    if "num_tasks" in parameters:
        settings.setdefault("num_tasks", len(task_modules))
    if "shared" in parameters and not settings.get("upper_bound"):
        uses: dict[str, int] = {}
        for modules in task_modules.values():
            for module in modules:
                uses[module] = uses.get(module, 0) + 1
        settings.setdefault("shared", sorted(m for m, n in uses.items() if n > 1))
    return make_balancer(name, **settings)


__all__ = [
    "BALANCER_FACTORIES",
    "BALANCER_NAMES",
    "BalancedGrads",
    "Balancer",
    "DBMTLState",
    "DWAState",
    "FAMOState",
    "GradNormState",
    "IMTLState",
    "InitFn",
    "PyTree",
    "SharedSpec",
    "UncertaintyState",
    "UpdateFn",
    "aligned_mtl",
    "aligned_weights",
    "balanced_grads",
    "balancer_for_tasks",
    "cagrad",
    "cagrad_dual_weights",
    "db_mtl",
    "dual_cone_weights",
    "dwa",
    "equal",
    "famo",
    "gradnorm",
    "gram_matrix",
    "imtl",
    "imtl_weights",
    "make_balancer",
    "merge_shared",
    "mgda",
    "min_norm_weights",
    "nash_mtl",
    "nash_weights",
    "pcgrad",
    "pcgrad_coefficients",
    "per_task_grads",
    "project_to_simplex",
    "rlw",
    "shared_mask",
    "split_shared",
    "uncertainty",
    "upgrad",
    "upgrad_weights",
    "weighted_task_sum",
]
