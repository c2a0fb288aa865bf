"""Quickstart with Flax NNX modules: examples/quickstart.py's model, written in NNX.

The NNX modules own their initial weights (their ``rngs`` chose them); jaxmtl splits
them into its variables pytree, trains them with the same jitted step as Linen modules,
and leaves the module objects themselves unchanged. (``model.init(X, seed=s)`` before
``fit`` would instead redraw them from ``s`` with their layers' initializers.)

Run: python examples/quickstart_nnx.py   (about 15 s on 2 CPU cores, compile included)
"""

from __future__ import annotations

import numpy as np
from flax import nnx
from quickstart import make_split  # the same data as the Linen quickstart

import jaxmtl


def make_tasks() -> list[jaxmtl.Task]:
    """task_a (2 classes) and task_b (3 classes) over one shared NNX body."""
    rngs = nnx.Rngs(0)
    body = nnx.Sequential(nnx.Linear(8, 32, rngs=rngs), nnx.relu)
    task_a = jaxmtl.Task(
        name="task_a",
        module_pool={"body": body, "head_a": nnx.Linear(32, 2, rngs=rngs)},
        op_sequence=[
            jaxmtl.Operation("body", [("_input_", "x")]),
            jaxmtl.Operation("head_a", ["body"]),
        ],
        scorer=jaxmtl.Scorer(metrics=["accuracy", "f1"]),
    )
    task_b = jaxmtl.Task(
        name="task_b",
        module_pool={"body": body, "head_b": nnx.Linear(32, 3, rngs=rngs)},  # same object
        op_sequence=[
            jaxmtl.Operation("body", [("_input_", "x")]),
            jaxmtl.Operation("head_b", ["body"]),
        ],
        scorer=jaxmtl.Scorer(metrics=["accuracy"]),
    )
    return [task_a, task_b]


def main() -> dict[str, float]:
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(8, 4))
    dataloaders = make_split("train", 4000, rng, weights) + make_split("valid", 1000, rng, weights)

    model = jaxmtl.MultitaskClassifier(make_tasks())
    trainer = jaxmtl.Trainer(n_epochs=5, lr=3e-3, seed=0, progress_bar=False)
    trainer.fit(model, dataloaders)
    scores = model.score(dataloaders[2:])
    for key, value in scores.items():
        print(f"{key}: {value:.4f}")
    return scores


if __name__ == "__main__":
    main()
