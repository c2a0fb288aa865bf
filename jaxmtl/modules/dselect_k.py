"""DSelect-k: differentiable top-k selection of experts, one gate per task.

Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong and Chi, "DSelect-k:
Differentiable Selection in the Mixture of Experts with Applications to Multi-Task
Learning", NeurIPS 2021 (arXiv:2106.03760).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ._common import (
    Experts,
    StackedDense,
    check_features,
    check_positive,
    check_rate,
    check_task_names,
    mix,
)

__all__ = ["DSelectK", "smooth_step"]


def smooth_step(t: jax.Array, gamma: float = 1.0) -> jax.Array:
    """The cubic smooth-step: 0 below ``-gamma/2``, 1 above ``gamma/2``, C^1 in between.

    ``S(t) = -2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2`` on ``[-gamma/2, gamma/2]``
    (Hazimeh et al. 2021, eq. 2); it reaches exactly 0 and 1, so a selector can become
    exactly binary (sparse) while staying differentiable.
    """
    cubic = -2.0 / gamma**3 * t**3 + 1.5 / gamma * t + 0.5
    return jnp.where(t <= -gamma / 2, 0.0, jnp.where(t >= gamma / 2, 1.0, cubic))


def _symmetric_uniform(scale: float) -> Callable:
    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -scale, scale)
    return init


def _code_matrices(num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Binary codes ``[2^m, m]`` (bit j of code c) and the code -> expert map ``[2^m, E]``."""
    bits = max(1, math.ceil(math.log2(num_experts)))
    codes = np.arange(2**bits)
    binary = ((codes[:, None] >> np.arange(bits)[None, :]) & 1).astype(bool)
    # With E not a power of two, code c >= E selects expert c mod E (see the class docstring).
    to_expert = np.zeros((2**bits, num_experts), np.float32)
    to_expert[codes, codes % num_experts] = 1.0
    return binary, to_expert


class DSelectK(nn.Module):
    """Experts mixed per task by DSelect-k gates (Hazimeh et al., NeurIPS 2021).

    Each task's gate has ``k`` single-expert selectors. Selector ``i`` maps the input to
    ``m = ceil(log2 E)`` numbers ``z`` and, through the smooth-step ``S``, to a
    distribution over the 2^m binary codes, ``r_c = prod_j (S(z_j) if bit j of c else 1 -
    S(z_j))``; the gate is ``sum_i softmax(w)_i r^(i)``, so at most ``k`` experts get a
    non-zero weight once the selectors are binary, and the weights sum to 1 per row.
    Routing is per example (the paper's example-conditioned gate): ``z`` and ``w`` are
    linear in ``x``, ``z`` initialised in ``[-gamma/100, gamma/100]`` as the authors' code
    does. The gates are recorded as ``intermediates/gates`` (``{task: [B, E]}``)::

        moe = DSelectK(("a", "b"), num_experts=4, k=2, expert_features=(32,))
        ops_a = [Operation("moe", [("_input_", "x")]), Operation("head_a", [("moe", "a")])]

    Deviations from the paper: no entropy regulariser (jaxmtl's task losses have no slot
    for module losses; the smooth-step still reaches exact 0/1); with ``E`` not a power of
    two the unused codes ``c >= E`` are folded onto expert ``c mod E`` instead of being
    penalised, so the weights always sum to exactly 1.

    Attributes:
      task_names: the tasks (the keys of the output dict).
      num_experts: E >= 2.
      k: selectors per task (the most experts a task uses), 1 <= k <= E.
      expert_features: the widths of each expert's layers.
      activation: the experts' activation.
      dropout_rate: dropout inside the experts in training.
      gamma: the width of the smooth-step's cubic region.
    """

    task_names: Sequence[str]
    num_experts: int = 4
    k: int = 2
    expert_features: Sequence[int] = (64,)
    activation: Callable = nn.relu
    dropout_rate: float = 0.0
    gamma: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "task_names", check_task_names("DSelectK", self.task_names))
        check_positive("DSelectK", "num_experts", self.num_experts, minimum=2)
        check_positive("DSelectK", "k", self.k)
        if self.k > self.num_experts:
            raise ValueError(f"DSelectK: k is {self.k}; expected at most num_experts "
                             f"({self.num_experts})")
        object.__setattr__(self, "expert_features", check_features(
            "DSelectK", "expert_features", self.expert_features))
        check_rate("DSelectK", self.dropout_rate)
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not (
                self.gamma > 0 and math.isfinite(self.gamma)):
            raise ValueError(f"DSelectK: gamma is {self.gamma!r}; expected a finite float > 0")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """``x``: ``[batch, in]`` -> ``{task: [batch, expert_features[-1]]}``."""
        num_tasks = len(self.task_names)
        binary, to_expert = _code_matrices(self.num_experts)
        bits = binary.shape[1]
        experts = Experts(self.num_experts, self.expert_features, self.activation,
                          self.dropout_rate, name="experts")(x, train)      # [B, E, H]
        init = _symmetric_uniform(self.gamma / 100)
        z = StackedDense(num_tasks, self.k * bits, kernel_init=init, bias_init=init,
                         name="selectors")(x)                                # [B, T, k*m]
        step = smooth_step(z.reshape(*z.shape[:-1], self.k, 1, bits), self.gamma)
        # r[..., i, c] = prod_j (S_j if bit j of code c else 1 - S_j)      [B, T, k, 2^m]
        selectors = jnp.prod(jnp.where(binary, step, 1.0 - step), axis=-1)
        selector_weights = nn.softmax(StackedDense(num_tasks, self.k, name="selector_weights")(
            x), axis=-1)                                                     # [B, T, k]
        codes = jnp.einsum("...k,...kc->...c", selector_weights, selectors)
        gates = codes @ to_expert                                            # [B, T, E]
        self.sow("intermediates", "gates",
                 {task: gates[..., t, :] for t, task in enumerate(self.task_names)})
        return {task: mix(gates[..., t, :], experts) for t, task in enumerate(self.task_names)}
