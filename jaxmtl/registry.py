"""The named choices of jaxmtl's settings: one registry per concept.

Each ``Registry`` lists a concept's allowed names and, for each, where its implementation
lives (``"module:attribute"``, imported on first use). Configuration validation
(``jaxmtl.training.config``) reads the names; the factories (``make_optimizer``,
``make_lr_schedule``, ``make_batch_scheduler``, ``make_log_writer``, ``make_balancer``,
``choose_parallel``) read the names and the implementations. Adding a choice is one line
here plus its implementation; validation and error messages follow.

This module imports nothing from jaxmtl and nothing heavy, so that configuration can be
built and checked without loading JAX::

    OPTIMIZERS.names                  # ('sgd', 'adam', 'adamax')
    OPTIMIZERS.check("rmsprop", "TrainerConfig.optimizer")   # ValueError
    OPTIMIZERS.load("adam")           # the function that builds Adam's scaling
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Registry:
    """A concept's allowed names, each with the object that implements it.

    Attributes:
      concept: the concept as the error message names it, e.g. "optimizer option"
        (-> "Unrecognized optimizer option 'x' (...); expected one of [...]").
      entries: name -> ``"module:attribute"`` of the implementation, or None when the
        name is interpreted by its one consumer (e.g. a mode flag); in the order that
        error messages and documentation list them.
    """

    concept: str
    entries: Mapping[str, str | None]

    @property
    def names(self) -> tuple[str, ...]:
        """The allowed names, in order."""
        return tuple(self.entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.entries

    def check(self, value: Any, where: str) -> str:
        """Returns ``value`` if it is an allowed name, else raises.

        Args:
          value: the name to check.
          where: what holds the value, for the message, e.g. "TrainerConfig.optimizer".

        Raises:
          ValueError: "Unrecognized {concept} '{value}' ({where}); expected one of [...]".
        """
        if value not in self:
            raise ValueError(
                f"Unrecognized {self.concept} '{value}' ({where}); expected one of "
                f"{list(self.names)}"
            )
        return value

    def load(self, name: str, where: str) -> Any:
        """The implementation registered for ``name``, imported on first use.

        Args:
          name: an allowed name (checked as by ``check``).
          where: what holds the name, for the error message.

        Returns:
          The registered object, or None for a name without one.
        """
        target = self.entries[self.check(name, where)]
        if target is None:
            return None
        module_name, attribute = target.split(":")
        return getattr(importlib.import_module(module_name), attribute)


_STATE = "jaxmtl.training.state"
_LR = "jaxmtl.training.lr_schedules"
_BATCH = "jaxmtl.training.batch_schedulers"
_WEIGHTING = "jaxmtl.training.balancers.weighting"
_GRADIENT = "jaxmtl.training.balancers.gradient"

OPTIMIZERS = Registry("optimizer option", {
    "sgd": f"{_STATE}:scale_by_sgd",
    "adam": f"{_STATE}:scale_by_torch_adam",
    "adamax": f"{_STATE}:scale_by_torch_adamax",
})
LR_SCHEDULERS = Registry("lr scheduler option", {
    "constant": f"{_LR}:constant_decay",
    "linear": f"{_LR}:linear_decay",
    "exponential": f"{_LR}:exponential_decay",
    "step": f"{_LR}:step_decay",
    "cosine": f"{_LR}:cosine_decay",
})
BATCH_SCHEDULERS = Registry("batch scheduler option", {
    "sequential": f"{_BATCH}:SequentialScheduler",
    "shuffled": f"{_BATCH}:ShuffledScheduler",
    "proportional": f"{_BATCH}:ProportionalScheduler",
    "mixed": f"{_BATCH}:MixedScheduler",
})
LOG_WRITERS = Registry("writer option", {
    "json": "jaxmtl.training.writers.json:LogWriter",
    "tensorboard": "jaxmtl.training.writers.tensorboard:TensorBoardWriter",
})
BALANCERS = Registry("balancer", {
    "equal": f"{_WEIGHTING}:equal",
    "uncertainty": f"{_WEIGHTING}:uncertainty",
    "dwa": f"{_WEIGHTING}:dwa",
    "rlw": f"{_WEIGHTING}:rlw",
    "gradnorm": f"{_GRADIENT}:gradnorm",
    "pcgrad": f"{_GRADIENT}:pcgrad",
    "cagrad": f"{_GRADIENT}:cagrad",
    "mgda": f"{_GRADIENT}:mgda",
    "famo": f"{_WEIGHTING}:famo",
    "nash_mtl": "jaxmtl.training.balancers.nash:nash_mtl",
    "imtl": "jaxmtl.training.balancers.imtl:imtl",
    "aligned_mtl": "jaxmtl.training.balancers.aligned:aligned_mtl",
    "upgrad": "jaxmtl.training.balancers.upgrad:upgrad",
    "db_mtl": "jaxmtl.training.balancers.dbmtl:db_mtl",
})
# The compute dtype of each precision (None: compute in the parameters' float32).
PRECISIONS = Registry("precision", {"fp32": None, "bf16": "jax.numpy:bfloat16"})
PARALLEL_MODES = Registry("parallel mode", dict.fromkeys(("auto", "pmap", "sharded", "single")))
COUNTER_UNITS = Registry("counter_unit", dict.fromkeys(("points", "batches", "epochs")))
WARMUP_UNITS = Registry("warmup_unit", dict.fromkeys(("batches", "epochs")))
ON_NONFINITE = Registry("on_nonfinite option", dict.fromkeys(("raise", "warn")))
METRIC_MODES = Registry("checkpoint metric mode", dict.fromkeys(("min", "max")))

ALL_REGISTRIES: dict[str, Registry] = {
    "OPTIMIZERS": OPTIMIZERS,
    "LR_SCHEDULERS": LR_SCHEDULERS,
    "BATCH_SCHEDULERS": BATCH_SCHEDULERS,
    "LOG_WRITERS": LOG_WRITERS,
    "BALANCERS": BALANCERS,
    "PRECISIONS": PRECISIONS,
    "PARALLEL_MODES": PARALLEL_MODES,
    "COUNTER_UNITS": COUNTER_UNITS,
    "WARMUP_UNITS": WARMUP_UNITS,
    "ON_NONFINITE": ON_NONFINITE,
    "METRIC_MODES": METRIC_MODES,
}
