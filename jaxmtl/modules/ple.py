"""Customized gate control (CGC) and progressive layered extraction (PLE).

Tang, Liu, Zhao and Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task
Learning (MTL) Model for Personalized Recommendations", RecSys 2020
(doi:10.1145/3383313.3412236; no arXiv version).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ._common import (
    Experts,
    StackedDense,
    check_features,
    check_positive,
    check_rate,
    check_task_names,
    mix,
)

__all__ = ["CGC", "PLE"]


def _check(owner: str, module: Any) -> None:
    object.__setattr__(module, "task_names", check_task_names(owner, module.task_names))
    check_positive(owner, "num_shared_experts", module.num_shared_experts)
    check_positive(owner, "num_task_experts", module.num_task_experts)
    object.__setattr__(module, "expert_features", check_features(owner, "expert_features",
                                                                 module.expert_features))
    check_rate(owner, module.dropout_rate)


class CGC(nn.Module):
    """One extraction level: experts per task plus shared experts, a gate per task.

    Task ``t``'s gate mixes its own ``num_task_experts`` experts and the
    ``num_shared_experts`` shared ones (a softmax over ``num_task_experts +
    num_shared_experts`` weights, summing to 1 per row): ``f_t = sum_i g_t,i * e_i`` over
    ``[task t's experts, shared experts]``. Other tasks' experts are invisible to task
    ``t``, which is what separates CGC from MMoE (Tang et al., RecSys 2020, section 4.1).
    Used alone it is the paper's single-level CGC::

        cgc = CGC(("a", "b"), num_shared_experts=2, num_task_experts=1, expert_features=(32,))
        ops_a = [Operation("cgc", [("_input_", "x")]), Operation("head_a", [("cgc", "a")])]

    Parameters: ``task_experts`` (every task's experts stacked, expert ``j`` of task ``t``
    at index ``t * m_t + j`` of each ``[T * m_t, in, out]`` kernel), ``task_gates`` (kernel
    ``[T, in, m_t + m_s]``), ``shared_experts`` and, with ``shared_gate``, ``shared_gate``.
    Gates are recorded as ``intermediates/gates`` (``{task: [B, m_t + m_s]}``) and, with
    ``shared_gate``, ``intermediates/shared_gates`` (``[B, T * m_t + m_s]``).

    Attributes:
      task_names: the tasks (the keys of the output dict).
      num_shared_experts: m_s, experts every task's gate sees.
      num_task_experts: m_t, experts of each task (the same count for every task).
      expert_features: the widths of each expert's layers.
      activation: the experts' activation.
      dropout_rate: dropout inside the experts in training.
      shared_gate: also compute the shared branch's output (a gate over every expert of
        the level), which the next PLE level reads; ``__call__`` then returns
        ``(outputs, shared_output)``. PLE sets it on every level but the last.
    """

    task_names: Sequence[str]
    num_shared_experts: int = 2
    num_task_experts: int = 2
    expert_features: Sequence[int] = (64,)
    activation: Callable = nn.relu
    dropout_rate: float = 0.0
    shared_gate: bool = False

    def __post_init__(self):
        _check("CGC", self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Any, train: bool = False) -> Any:
        """Runs the level.

        Args:
          x: ``[batch, in]`` (the input of every branch), or, inside PLE, a pair
            ``(task_inputs, shared_input)``: a tuple with one ``[batch, in]`` per task (in
            ``task_names`` order) and the shared branch's ``[batch, in]``.
          train: dropout in the experts.

        Returns:
          ``{task: [batch, expert_features[-1]]}``; with ``shared_gate``, the pair
          ``(that dict, shared output [batch, expert_features[-1]])``.
        """
        num_tasks, per_task = len(self.task_names), self.num_task_experts
        if isinstance(x, tuple):
            task_inputs, shared_input = x
            if len(task_inputs) != num_tasks:
                raise ValueError(f"CGC: got {len(task_inputs)} task inputs for task_names "
                                 f"{list(self.task_names)}; expected one per task")
            # Every task's experts run as one stack: expert j of task t reads input t.
            stacked = jnp.stack(task_inputs, axis=-2)                          # [B, T, D]
            own = Experts(num_tasks * per_task, self.expert_features, self.activation,
                          self.dropout_rate, name="task_experts")(
                jnp.repeat(stacked, per_task, axis=-2), train, per_member=True)
            gate_logits = StackedDense(num_tasks, per_task + self.num_shared_experts,
                                       name="task_gates")(stacked, per_member=True)
        else:
            shared_input = x
            own = Experts(num_tasks * per_task, self.expert_features, self.activation,
                          self.dropout_rate, name="task_experts")(x, train)
            gate_logits = StackedDense(num_tasks, per_task + self.num_shared_experts,
                                       name="task_gates")(x)
        shared = Experts(self.num_shared_experts, self.expert_features, self.activation,
                         self.dropout_rate, name="shared_experts")(shared_input, train)
        # [B, T, m_t + m_s, H]: task t's own experts, then the shared ones.
        own = own.reshape(*own.shape[:-2], num_tasks, per_task, own.shape[-1])
        pools = jnp.concatenate(
            [own, jnp.broadcast_to(shared[..., None, :, :], (*own.shape[:-2],
                                                              *shared.shape[-2:]))], axis=-2)
        gates = nn.softmax(gate_logits, axis=-1)                               # [B, T, m_t + m_s]
        self.sow("intermediates", "gates",
                 {task: gates[..., t, :] for t, task in enumerate(self.task_names)})
        mixed = jnp.einsum("...te,...teh->...th", gates, pools)
        outputs = {task: mixed[..., t, :] for t, task in enumerate(self.task_names)}
        if not self.shared_gate:
            return outputs
        every_expert = jnp.concatenate(
            [own.reshape(*own.shape[:-3], num_tasks * per_task, own.shape[-1]), shared],
            axis=-2)
        gate = nn.softmax(nn.Dense(every_expert.shape[-2], name="shared_gate")(shared_input),
                          axis=-1)
        self.sow("intermediates", "shared_gates", gate)
        return outputs, mix(gate, every_expert)


class PLE(nn.Module):
    """Progressive layered extraction: ``num_levels`` CGC levels (Tang et al., RecSys 2020).

    Level ``l`` reads, for each task, that task's output of level ``l - 1`` and, for the
    shared experts, the shared output of level ``l - 1`` (a gate over all of that level's
    experts); the first level reads ``x`` everywhere, the last has no shared gate. With
    ``num_levels=1`` it is a ``CGC``. Gates are recorded per level
    (``intermediates/level_<l>/gates``, ``.../shared_gates``).

    Attributes:
      task_names: the tasks (the keys of the output dict).
      num_levels: the number of extraction levels.
      num_shared_experts, num_task_experts, expert_features, activation, dropout_rate:
        as ``CGC``, the same for every level.
    """

    task_names: Sequence[str]
    num_levels: int = 2
    num_shared_experts: int = 2
    num_task_experts: int = 2
    expert_features: Sequence[int] = (64,)
    activation: Callable = nn.relu
    dropout_rate: float = 0.0

    def __post_init__(self):
        _check("PLE", self)
        check_positive("PLE", "num_levels", self.num_levels)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """``x``: ``[batch, in]`` -> ``{task: [batch, expert_features[-1]]}``."""
        inputs: Any = x
        for level in range(self.num_levels):
            last = level == self.num_levels - 1
            result = CGC(self.task_names, self.num_shared_experts, self.num_task_experts,
                         self.expert_features, self.activation, self.dropout_rate,
                         shared_gate=not last, name=f"level_{level}")(inputs, train)
            if last:
                return result
            outputs, shared = result
            inputs = (tuple(outputs[task] for task in self.task_names), shared)
        raise AssertionError("unreachable: num_levels >= 1")
