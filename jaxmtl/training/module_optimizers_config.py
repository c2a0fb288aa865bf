"""Validation of ``TrainerConfig.module_optimizers`` (see ``module_optimizers``).

A config module: it imports no implementation module (nor JAX), so that
``TrainerConfig`` checks its per-module optimisers at construction; the optax
transformations they build live in ``module_optimizers``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import registry
from .config_base import (
    check_finite_non_negative,
    from_dict,
    is_gradient_transformation,
    merge_config,
)
from .optimizer_config import OptimizerConfig

FROZEN = "frozen"
OVERRIDE_KEYS = ("optimizer", "lr", "l2", "optimizer_config")


def _where(name: str) -> str:
    return f"TrainerConfig.module_optimizers[{name!r}]"


def check_module_optimizers(module_optimizers: Any, optimizer: Any,
                            optimizer_config: OptimizerConfig) -> dict[str, Any]:
    """Validates ``TrainerConfig.module_optimizers`` and returns it as a new dict.

    Args:
      module_optimizers: module name -> a dict of overrides (keys ``OVERRIDE_KEYS``), an
        ``optax.GradientTransformation`` or ``"frozen"``; None means none.
      optimizer: ``TrainerConfig.optimizer`` (a name or a GradientTransformation).
      optimizer_config: ``TrainerConfig.optimizer_config``, under which an override's
        ``optimizer_config`` merges.

    Returns:
      ``{name: value}``, override dicts copied. They stay overrides, resolved when the
      optimizer is built (so that a later change of the global settings, e.g. by
      ``Trainer(config, lr=...)``, reaches them): an ``optimizer_config`` dict merges
      over the global ``optimizer_config``, an ``OptimizerConfig`` replaces it.

    Raises:
      ValueError: naming the module and the value, for a value of another type, an
        unknown override key (with the allowed keys), an unknown optimizer name, a
        negative or non-finite ``lr``/``l2``, an invalid ``optimizer_config``, or
        ``lr``/``l2``/``optimizer_config`` without an ``optimizer`` name while the global
        optimizer is a GradientTransformation (which they do not apply to).
    """
    if module_optimizers is None:
        return {}
    if not isinstance(module_optimizers, Mapping) or not all(
            isinstance(name, str) for name in module_optimizers):
        raise ValueError(
            f"TrainerConfig.module_optimizers must be a dict of module name -> settings, "
            f"got {module_optimizers!r}")
    checked: dict[str, Any] = {}
    for name, value in module_optimizers.items():
        if is_frozen(value) or is_gradient_transformation(value):
            checked[name] = value
        elif isinstance(value, Mapping):
            checked[name] = _check_overrides(name, dict(value), optimizer, optimizer_config)
        else:
            raise ValueError(
                f"{_where(name)}: expected a dict of overrides (keys {list(OVERRIDE_KEYS)}), "
                f"an optax.GradientTransformation or {FROZEN!r}, got {value!r} "
                f"({type(value).__name__})")
    return checked


def _check_overrides(name: str, overrides: dict[str, Any], optimizer: Any,
                     optimizer_config: OptimizerConfig) -> dict[str, Any]:
    where = _where(name)
    unknown = sorted(set(overrides) - set(OVERRIDE_KEYS), key=str)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed keys are "
                         f"{sorted(OVERRIDE_KEYS)}")
    if "optimizer" in overrides:
        if is_gradient_transformation(overrides["optimizer"]):
            raise ValueError(f"{where}['optimizer']: give a GradientTransformation as the "
                             f"module's value ({{{name!r}: tx}}), not inside its overrides")
        registry.OPTIMIZERS.check(overrides["optimizer"], f"{where}['optimizer']")
    elif is_gradient_transformation(optimizer) and overrides:
        raise ValueError(
            f"{where}: {sorted(overrides)} do not apply to TrainerConfig.optimizer, a "
            f"GradientTransformation; add an optimizer name, e.g. {{'optimizer': 'adam', "
            f"...}}, or give the module its own GradientTransformation")
    for key in ("lr", "l2"):
        if key in overrides:
            check_finite_non_negative(where, key, overrides[key])
    if "optimizer_config" in overrides:
        value = overrides["optimizer_config"]
        try:
            if isinstance(value, OptimizerConfig):
                pass
            elif isinstance(value, Mapping):
                merge_config(optimizer_config, dict(value))
            else:
                from_dict(OptimizerConfig, value)
        except ValueError as error:
            raise ValueError(f"{where}['optimizer_config']: {error}") from None
    return overrides


def is_frozen(value: Any) -> bool:
    """Whether a ``module_optimizers`` value freezes its module (``"frozen"``)."""
    return isinstance(value, str) and value == FROZEN
