"""Hard parameter sharing: one body for every task (what a plain jaxmtl module pool does).

A module used by several tasks under one name in the pool *is* hard parameter sharing
(Caruana, "Multitask Learning", Machine Learning 28, 1997): one set of weights, trained by
every task's loss, feeding a head per task. ``SharedBottom`` is that body with the output
convention of the other architectures here (a dict ``{task_name: representation}``), so
an architecture can be swapped for another without changing the heads' ops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax

from ._common import check_features, check_rate, check_task_names

__all__ = ["SharedBottom"]


class SharedBottom(nn.Module):
    """An MLP body shared by every task, returning its output under every task's name.

    Equivalent to putting ``nn.Sequential([nn.Dense(w), relu, ...])`` in the module pool
    under one name and having every head read it; the dict output lets heads read
    ``("body", task_name)`` as with ``MMoE``, ``PLE``, ``CrossStitch`` and ``DSelectK``::

        body = SharedBottom(("a", "b"), features=(64,))
        ops_a = [Operation("body", [("_input_", "x")]), Operation("head_a", [("body", "a")])]

    Attributes:
      task_names: the tasks whose representations to return (the keys of the output).
      features: layer widths.
      activation: applied after every layer.
      dropout_rate: dropout after every activation in training.
    """

    task_names: Sequence[str]
    features: Sequence[int] = (64,)
    activation: Callable = nn.relu
    dropout_rate: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "task_names", check_task_names("SharedBottom", self.task_names))
        object.__setattr__(self, "features", check_features("SharedBottom", "features",
                                                            self.features))
        check_rate("SharedBottom", self.dropout_rate)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """``x``: ``[batch, in]`` -> ``{task: [batch, features[-1]]}`` (one array, shared)."""
        h = x
        for i, width in enumerate(self.features):
            h = self.activation(nn.Dense(width, name=f"layer_{i}")(h))
            if self.dropout_rate:
                h = nn.Dropout(self.dropout_rate)(h, deterministic=not train)
        return {task: h for task in self.task_names}
