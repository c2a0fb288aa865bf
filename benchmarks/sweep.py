"""A sweep in one process: a new model per learning rate over the same tasks.

``python -m benchmarks.sweep`` prints the wall seconds of each iteration (build the model,
fit one epoch, score) of a sweep over seeds, then over learning rates: the first iteration
pays every trace and compile; later ones reuse what equal graphs and equal fits share
(README "Sweeps in one process"); the learning rates' steps are new programs. Two tasks x 2,048 rows of 64 features,
Dense(128)-ReLU x2 body, batch 64. Run it twice to see the persistent cache warm.
"""

from __future__ import annotations

import time

import flax.linen as nn
import numpy as np

import jaxmtl

TASKS = ("a", "b")


def make_loaders() -> tuple[list, list]:
    rng = np.random.default_rng(0)
    train, valid = [], []
    for i, task in enumerate(TASKS):
        X = rng.normal(size=(2048, 64)).astype(np.float32)
        Y = (X[:, i] > 0).astype(np.int64)
        for split, out in (("train", train), ("valid", valid)):
            ds = jaxmtl.DictDataset(task, split, {"x": X}, {task: Y})
            out.append(jaxmtl.DictDataLoader(ds, batch_size=64, shuffle=split == "train",
                                             seed=0))
    return train, valid


def make_tasks() -> list[jaxmtl.Task]:
    body = nn.Sequential([nn.Dense(128), nn.relu, nn.Dense(128), nn.relu])
    return [jaxmtl.Task(task, {"body": body, "head_" + task: nn.Dense(2)},
                        [jaxmtl.Operation("body", [("_input_", "x")]),
                         jaxmtl.Operation("head_" + task, ["body"])]) for task in TASKS]


def sweep(settings: list[dict], train: list, valid: list) -> list[float]:
    """Wall seconds of each (new model, new Trainer(**setting), fit, score)."""
    seconds = []
    for setting in settings:
        start = time.perf_counter()
        model = jaxmtl.MultitaskClassifier(make_tasks())
        jaxmtl.Trainer(n_epochs=1, progress_bar=False, **setting).fit(model, train)
        model.score(valid)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    train, valid = make_loaders()
    for name, settings in (
            ("seeds", [{"lr": 1e-3, "seed": seed} for seed in range(4)]),
            ("learning rates", [{"lr": lr, "seed": 0} for lr in (3e-3, 1e-2, 3e-2, 1e-1)])):
        seconds = sweep(settings, train, valid)
        print(f"{name}: seconds per iteration:", " ".join(f"{s:.2f}" for s in seconds))


if __name__ == "__main__":
    main()
