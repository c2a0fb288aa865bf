"""Cross-stitch networks: one tower per task, mixed after every layer by a learned T x T unit.

Misra, Shrivastava, Gupta and Hebert, "Cross-stitch Networks for Multi-task Learning",
CVPR 2016 (arXiv:1604.03539).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ._common import StackedDense, check_features, check_rate, check_task_names

__all__ = ["CrossStitch", "cross_stitch_init"]


def cross_stitch_init(self_weight: float) -> Callable:
    """An initialiser of a ``[T, T]`` unit: ``self_weight`` on the diagonal, the rest equal.

    Rows sum to 1 (a convex combination of the towers, as the paper initialises its units;
    e.g. ``self_weight=0.9`` with two tasks is the paper's ``(alpha_S, alpha_D) = (0.9,
    0.1)``). With one task the unit is the identity.
    """

    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        del key  # deterministic
        num = shape[0]
        if num == 1:
            return jnp.ones(shape, dtype)
        other = (1.0 - self_weight) / (num - 1)
        return (jnp.full(shape, other, dtype)
                + (self_weight - other) * jnp.eye(num, dtype=dtype))

    return init


class CrossStitch(nn.Module):
    """A Dense tower per task with a cross-stitch unit after every layer (Misra et al. 2016).

    Layer ``l`` computes ``h_t = activation(W_t^l a_t^{l-1})`` per task and then the
    cross-stitch ``a_t^l = sum_s alpha^l[t, s] h_s`` with a learned ``[T, T]`` matrix
    ``alpha^l`` (parameters ``stitch_<l>``), initialised near the identity
    (``self_weight`` on the diagonal, rows summing to 1). As in the paper, training does
    not constrain ``alpha`` (its rows need not stay convex); the paper also trains the units
    with a 10^2-10^3 x larger learning rate, which a per-module optimiser can give. Towers
    are stacked (one ``[T, in, out]`` kernel per layer, ``tower_<l>``). The units are
    recorded as ``intermediates/stitch`` (one ``[T, T]`` per layer)::

        body = CrossStitch(("a", "b"), features=(32, 32))
        ops_a = [Operation("body", [("_input_", "x")]), Operation("head_a", [("body", "a")])]

    Attributes:
      task_names: the tasks (the keys of the output dict).
      features: the widths of the towers' layers.
      activation: applied after every layer, before the unit.
      dropout_rate: dropout after every activation in training.
      self_weight: the initial diagonal of each unit, in (0, 1].
    """

    task_names: Sequence[str]
    features: Sequence[int] = (64, 64)
    activation: Callable = nn.relu
    dropout_rate: float = 0.0
    self_weight: float = 0.9

    def __post_init__(self):
        object.__setattr__(self, "task_names", check_task_names("CrossStitch", self.task_names))
        object.__setattr__(self, "features", check_features("CrossStitch", "features",
                                                            self.features))
        check_rate("CrossStitch", self.dropout_rate)
        if (isinstance(self.self_weight, bool) or not isinstance(self.self_weight, (int, float))
                or not 0 < self.self_weight <= 1):
            raise ValueError(f"CrossStitch: self_weight is {self.self_weight!r}; expected a "
                             f"float in (0, 1] (the initial diagonal of each unit)")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """``x``: ``[batch, in]`` -> ``{task: [batch, features[-1]]}``."""
        num = len(self.task_names)
        h, per_member, units = x, False, []
        for layer, width in enumerate(self.features):
            h = self.activation(StackedDense(num, width, name=f"tower_{layer}")(
                h, per_member=per_member))                                  # [B, T, H]
            if self.dropout_rate:
                h = nn.Dropout(self.dropout_rate)(h, deterministic=not train)
            alpha = self.param(f"stitch_{layer}", cross_stitch_init(self.self_weight),
                               (num, num))
            units.append(alpha)
            h = jnp.einsum("ts,...sh->...th", alpha, h)
            per_member = True
        self.sow("intermediates", "stitch", tuple(units))
        return {task: h[..., t, :] for t, task in enumerate(self.task_names)}
