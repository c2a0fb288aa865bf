"""Quickstart: two tasks share a body; task_b trains on soft labels (as from a label model).

Run: python examples/quickstart.py   (about 20 s on 2 CPU cores, compile included)
"""

from __future__ import annotations

import flax.linen as nn
import numpy as np

import jaxmtl


def make_split(split: str, n: int, rng: np.random.Generator, weights: np.ndarray):
    """Synthetic data: 8 Gaussian features; task_a hard 2-class, task_b soft 3-class."""
    X = rng.normal(size=(n, 8)).astype(np.float32)
    logits = X @ weights
    y_a = (logits[:, 0] > 0).astype(int)
    z = logits[:, 1:] * 2.0
    soft_b = np.exp(z - z.max(1, keepdims=True))
    soft_b /= soft_b.sum(1, keepdims=True)
    ds_a = jaxmtl.DictDataset("synthetic_a", split, {"x": X}, {"task_a": y_a})
    if split == "train":
        ds_b = jaxmtl.DictDataset("synthetic_b", split, {"x": X}, {"task_b": soft_b})
    else:  # evaluate task_b against hard gold labels
        ds_b = jaxmtl.DictDataset("synthetic_b", split, {"x": X}, {"task_b": soft_b.argmax(1)})
    return [
        jaxmtl.DictDataLoader(ds_a, batch_size=64, shuffle=split == "train", seed=0),
        jaxmtl.DictDataLoader(ds_b, batch_size=64, shuffle=split == "train", seed=1),
    ]


def make_tasks() -> list[jaxmtl.Task]:
    """task_a (2 classes) and task_b (3 classes) over one shared body."""
    body = nn.Sequential([nn.Dense(32), nn.relu])
    task_a = jaxmtl.Task(
        name="task_a",
        module_pool={"body": body, "head_a": nn.Dense(2)},
        op_sequence=[
            jaxmtl.Operation("body", [("_input_", "x")]),
            jaxmtl.Operation("head_a", ["body"]),
        ],
        scorer=jaxmtl.Scorer(metrics=["accuracy", "f1"]),
    )
    task_b = jaxmtl.Task(
        name="task_b",
        module_pool={"body": body, "head_b": nn.Dense(3)},  # same "body": shared weights
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
