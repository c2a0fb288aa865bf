"""Scale-imbalanced synthetic tasks in the manner of GradNorm's toy problem (Chen et al. 2018).

GradNorm regresses ``σ_t tanh((B + ε_t) x)``: a shared random map ``B`` with a per-task
perturbation ``ε_t`` (std 0.35 of B's), and scales ``σ_t`` that make the task losses
differ by orders of magnitude. Here each task's target ``mean_h tanh(((B + ε_t) x)_h)``
plus a little noise is cut into ``K`` classes at the train split's quantiles, and the
scale is kept on the loss: task t's cross entropy is multiplied by ``loss_scale[t]``
(1, 10, 100, 1000 for four tasks), the σ_t² of a squared error. A method that balances
loss scales should recover what equal weighting loses to the dominant task.
"""

from __future__ import annotations

import numpy as np

from benchmarks.data_splits import MTLData


def load(n_tasks: int = 4, n_train: int = 4000, n_eval: int = 1000, dim: int = 32,
         hidden: int = 16, n_classes: int = 4, noise: float = 0.1, seed: int = 0) -> MTLData:
    """The synthetic data set (all draws from ``seed``, fixed across training seeds)."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((hidden, dim))
    per_task = 0.35 * rng.standard_normal((n_tasks, hidden, dim))
    n = n_train + 2 * n_eval
    X = rng.standard_normal((n, dim)).astype(np.float32)
    targets = np.tanh(np.einsum("thd,nd->tnh", shared + per_task, X) / np.sqrt(dim)).mean(-1)
    targets += noise * targets.std(1, keepdims=True) * rng.standard_normal(targets.shape)
    edges = np.quantile(targets[:, :n_train], np.linspace(0, 1, n_classes + 1)[1:-1], axis=1)
    labels = {f"t{t + 1}": np.searchsorted(edges[:, t], targets[t]).astype(np.int64)
              for t in range(n_tasks)}
    bounds = {"train": (0, n_train), "valid": (n_train, n_train + n_eval),
              "test": (n_train + n_eval, n)}
    splits = {split: (X[a:b], {task: y[a:b] for task, y in labels.items()})
              for split, (a, b) in bounds.items()}
    return MTLData("synthetic", splits, {task: n_classes for task in labels}, ("accuracy",),
                   loss_scale={f"t{t + 1}": 10.0 ** t for t in range(n_tasks)},
                   note=f"{n_tasks} tasks, {n_train}/{n_eval}/{n_eval} points, {dim} features, "
                        f"{n_classes} quantile classes, loss scales 1..10^{n_tasks - 1}")
