"""Building blocks shared by the architectures: argument checks, stacked experts, gate read-out.

Experts of one group are one ``StackedDense`` per layer (kernel ``[num, in, out]``): the
group runs as a few batched matmuls instead of ``num`` small ones, and its parameters are
one array per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["Experts", "StackedDense", "check_features", "check_positive", "check_rate",
           "check_task_names", "gate_weights", "mix"]

PyTree = Any


def check_task_names(owner: str, task_names: Any) -> tuple[str, ...]:
    """``task_names`` as a tuple of distinct non-empty strings.

    Raises:
      ValueError: naming ``owner``, the value and what is expected.
    """
    if isinstance(task_names, str) or not isinstance(task_names, Sequence):
        raise ValueError(f"{owner}: task_names is {task_names!r}; expected a sequence of "
                         f"task names, e.g. ('task_a', 'task_b')")
    names = tuple(task_names)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"{owner}: task_names is {task_names!r}; expected a non-empty "
                         f"sequence of non-empty strings")
    if len(set(names)) != len(names):
        duplicates = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"{owner}: task_names {list(names)} repeats {duplicates}; each task "
                         f"needs its own name")
    return names


def check_positive(owner: str, field: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``; otherwise a ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {field} is {value!r}; expected an int >= {minimum}")
    return value


def check_features(owner: str, field: str, features: Any) -> tuple[int, ...]:
    """Layer widths as a non-empty tuple of positive ints."""
    if isinstance(features, int) and not isinstance(features, bool):
        features = (features,)
    if not isinstance(features, Sequence) or not features or not all(
            isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in features):
        raise ValueError(f"{owner}: {field} is {features!r}; expected a non-empty sequence of "
                         f"positive layer widths, e.g. (64,) or (64, 32)")
    return tuple(features)


def check_rate(owner: str, value: Any) -> float:
    """A dropout rate in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{owner}: dropout_rate is {value!r}; expected a float in [0, 1)")
    return float(value)


class StackedDense(nn.Module):
    """``num`` independent Dense layers run as one batched matmul.

    Attributes:
      num: how many layers (experts, task towers).
      features: output width of each.
      kernel_init, bias_init: initialisers of the ``[num, in, features]`` kernel and the
        ``[num, features]`` bias; the default kernel init is Flax Dense's (LeCun normal),
        with fan-in taken per layer.
    """

    num: int
    features: int
    kernel_init: Callable = nn.initializers.lecun_normal(batch_axis=(0,))
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array, per_member: bool = False) -> jax.Array:
        """Applies every layer.

        Args:
          x: ``[..., in]`` (the same input for every layer) or, with ``per_member``,
            ``[..., num, in]`` (layer ``i`` reads ``x[..., i, :]``).
          per_member: whether ``x`` holds one input per layer.

        Returns:
          ``[..., num, features]``.
        """
        kernel = self.param("kernel", self.kernel_init, (self.num, x.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.num, self.features))
        pattern = "...ni,nio->...no" if per_member else "...i,nio->...no"
        return jnp.einsum(pattern, x, kernel) + bias


class Experts(nn.Module):
    """``num_experts`` MLP experts on one input, stacked: ``[..., D] -> [..., E, H]``.

    Each expert is ``Dense -> activation (-> Dropout)`` per width in ``features``.

    Attributes:
      num_experts: E.
      features: the widths of each expert's layers; H is the last.
      activation: applied after every layer (the experts of MMoE/PLE are ReLU MLPs).
      dropout_rate: dropout after every activation when ``train`` is True.
    """

    num_experts: int
    features: Sequence[int]
    activation: Callable = nn.relu
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, per_member: bool = False
                 ) -> jax.Array:
        """Returns every expert's output, ``[..., num_experts, features[-1]]``.

        Args:
          x: ``[..., D]``, read by every expert, or with ``per_member`` ``[..., E, D]``
            (expert ``i`` reads ``x[..., i, :]``).
          train: dropout on.
          per_member: whether ``x`` holds one input per expert.
        """
        h = x
        for i, width in enumerate(self.features):
            h = self.activation(StackedDense(self.num_experts, width, name=f"layer_{i}")(
                h, per_member=per_member))
            if self.dropout_rate:
                h = nn.Dropout(self.dropout_rate)(h, deterministic=not train)
            per_member = True
        return h


def mix(weights: jax.Array, experts: jax.Array) -> jax.Array:
    """The gate-weighted sum of expert outputs: ``[..., E]`` x ``[..., E, H] -> [..., H]``."""
    return jnp.einsum("...e,...eh->...h", weights, experts)


def _unwrap(tree: Any) -> Any:
    # ``sow`` stores each value in a tuple (one entry per call); one call gives one entry.
    if isinstance(tree, tuple) and len(tree) == 1:
        return tree[0]
    if isinstance(tree, Mapping):
        return {key: _unwrap(value) for key, value in tree.items()}
    return tree


def gate_weights(module: nn.Module, variables: PyTree, x: Any, **kwargs: Any) -> dict:
    """Runs ``module`` on ``x`` and returns the gate weights it records.

    Every architecture here records its gates with ``self.sow("intermediates", ...)``;
    the Trainer never makes ``intermediates`` mutable, so recording costs nothing in
    training. Use it on a trained model as
    ``gate_weights(module, {"params": model.params["mmoe"]}, X)``.

    Args:
      module: an architecture of ``jaxmtl.modules``.
      variables: its variables, ``{"params": ...}``.
      x: its input.
      **kwargs: passed to ``__call__`` (e.g. ``train=False``).

    Returns:
      The recorded tree: e.g. ``{"gates": {task: [B, num_experts]}}`` for ``MMoE``,
      one such dict per level (``{"level_0": {...}, ...}``) for ``PLE``.
    """
    _, state = module.apply(variables, x, mutable=["intermediates"], **kwargs)
    return _unwrap(dict(state.get("intermediates", {})))
