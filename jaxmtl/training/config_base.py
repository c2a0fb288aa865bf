"""What every config shares: dict conversion and the checks of numeric fields.

``from_dict``/``merge_config`` turn Snorkel-style dicts into the frozen config dataclasses
(unknown keys raise, naming the valid ones); ``NestedConfig`` converts a config's nested
dict fields once, at construction. Like every config module, this one imports no
implementation module (not even JAX).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")


def is_gradient_transformation(value: Any) -> bool:
    """Whether ``value`` is an ``optax.GradientTransformation``, without importing optax.

    A value can only be one if the caller has imported optax already, so configuration
    never loads it (nor JAX) itself.
    """
    optax = sys.modules.get("optax")
    return optax is not None and isinstance(value, optax.GradientTransformation)


def check_non_negative(owner: str, field_name: str, value: float) -> None:
    """Raises ValueError naming ``owner.field_name`` if ``value`` is None or negative."""
    if value is None or value < 0:
        raise ValueError(f"{owner}.{field_name} must be >= 0, got {value!r}")


def check_finite(owner: str, field_name: str, value: Any) -> None:
    """A real, finite number (numpy scalars included); strings and bools are not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"{owner}.{field_name} must be a number, got {value!r} ({type(value).__name__})"
        )
    if not math.isfinite(value):
        raise ValueError(f"{owner}.{field_name} must be a finite number, got {value!r}")


def check_finite_non_negative(owner: str, field_name: str, value: Any) -> None:
    """Raises ValueError naming ``owner.field_name`` unless ``value`` is a finite number >= 0."""
    check_finite(owner, field_name, value)
    check_non_negative(owner, field_name, value)


def from_dict(cls: type[ConfigT], value: Any) -> ConfigT:
    """Builds the config dataclass ``cls`` from ``value`` (an instance, a dict or None).

    Nested dataclass fields given as dicts are converted recursively; a key that is not a
    field of ``cls`` raises ``ValueError`` listing the valid fields.
    """
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{cls.__name__}: expected a dict or {cls.__name__}, got {type(value).__name__}")
    return merge_config(cls(), value)


def merge_config(config: ConfigT, updates: dict[str, Any]) -> ConfigT:
    """Returns a copy of ``config`` with ``updates`` applied; nested dicts merge recursively."""
    fields = {f.name: f for f in dataclasses.fields(config)}  # type: ignore[arg-type]
    unknown = sorted(set(updates) - set(fields))
    if unknown:
        raise ValueError(
            f"{type(config).__name__}: unknown config key(s) {unknown}; "
            f"valid keys are {sorted(fields)}"
        )
    changes = {}
    for key, new_value in updates.items():
        current = getattr(config, key)
        if dataclasses.is_dataclass(current) and isinstance(new_value, dict):
            changes[key] = merge_config(current, new_value)
        else:
            changes[key] = new_value
    return dataclasses.replace(config, **changes)  # type: ignore[type-var]


class NestedConfig:
    """Converts dict-valued nested config fields to their dataclasses after init."""

    def _convert_nested(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(default) and not dataclasses.is_dataclass(value):
                object.__setattr__(self, f.name, from_dict(type(default), value))
