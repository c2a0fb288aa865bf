"""Multi-gate mixture of experts (MMoE).

Ma, Zhao, Yi, Chen, Hong and Chi, "Modeling Task Relationships in Multi-task Learning with
Multi-gate Mixture-of-Experts", KDD 2018 (doi:10.1145/3219819.3220007; no arXiv version).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax

from ._common import (
    Experts,
    StackedDense,
    check_features,
    check_positive,
    check_rate,
    check_task_names,
    mix,
)

__all__ = ["MMoE"]


class MMoE(nn.Module):
    """``num_experts`` shared MLP experts and one softmax gate per task (Ma et al., KDD 2018).

    For task ``t``: ``f_t(x) = sum_i g_t(x)_i * expert_i(x)``, ``g_t(x) = softmax(W_t x)``.
    The gates sum to 1 over the experts for every row. Use it as one module-pool entry
    and let each head read its task's representation::

        mmoe = MMoE(("a", "b"), num_experts=4, expert_features=(32,))
        pool = {"mmoe": mmoe, "head_a": nn.Dense(2), "head_b": nn.Dense(2)}
        ops_a = [Operation("mmoe", [("_input_", "x")]), Operation("head_a", [("mmoe", "a")])]

    Parameters: ``experts`` (one ``[E, in, out]`` kernel per layer) and ``gate`` (kernel
    ``[T, in, E]``). The gates are recorded as ``intermediates/gates``
    (``jaxmtl.modules.gate_weights``). The paper's towers are the task heads of the pool.

    Attributes:
      task_names: the tasks, in gate order (the keys of the output dict).
      num_experts: E.
      expert_features: the widths of each expert's layers.
      activation: the experts' activation.
      dropout_rate: dropout inside the experts in training.
    """

    task_names: Sequence[str]
    num_experts: int = 4
    expert_features: Sequence[int] = (64,)
    activation: Callable = nn.relu
    dropout_rate: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "task_names", check_task_names("MMoE", self.task_names))
        check_positive("MMoE", "num_experts", self.num_experts)
        object.__setattr__(self, "expert_features", check_features("MMoE", "expert_features",
                                                                   self.expert_features))
        check_rate("MMoE", self.dropout_rate)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """``x``: ``[batch, in]`` -> ``{task: [batch, expert_features[-1]]}``."""
        experts = Experts(self.num_experts, self.expert_features, self.activation,
                          self.dropout_rate, name="experts")(x, train)       # [B, E, H]
        gates = nn.softmax(StackedDense(len(self.task_names), self.num_experts,
                                        name="gate")(x), axis=-1)           # [B, T, E]
        self.sow("intermediates", "gates",
                 {task: gates[..., t, :] for t, task in enumerate(self.task_names)})
        return {task: mix(gates[..., t, :], experts) for t, task in enumerate(self.task_names)}
