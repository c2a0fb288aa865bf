"""Three toy tasks, each with its own dataset and input key, sharing one body.

The shape of Snorkel's multi-task tutorial (snorkel-tutorials, multitask/): 2-D points in
the square [-1, 1]^2, labelled by whether they lie inside the unit circle (``circle``),
inside the square of side R centred on the origin (``square``) and outside the unit
circle (``inv_circle``). Each task has its own dataset whose ``X_dict`` carries only that
task's input key (``circle_data``, ...); all tasks run the op ``base_mlp`` (one module,
one set of weights) on their own input, then a head of their own. The model is trained
on circle and square first; ``inv_circle`` is then added with ``model.add_task`` and the
model trained again on all three (its shared body keeps the weights it has learned).

Run: python examples/per_task_inputs.py   (prints per-task accuracies)
Import: ``main(n_epochs=..., seed=...)`` returns the final score dict;
``make_datasets(seed)`` gives the data (also used by benchmarks/tutorial_snorkel.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

import flax.linen as nn
import numpy as np

import jaxmtl

N = 1000  # data points per dataset, as the tutorial
R = 1.0  # unit distance, as the tutorial
TASKS = ("circle", "square", "inv_circle")  # in the order the tutorial creates their data
SPLITS = ("train", "valid", "test")
DATASET_NAMES = {"circle": "circleDataset", "square": "squareDataset",
                 "inv_circle": "InvCircleDataset"}

Split = tuple[np.ndarray, np.ndarray]  # (X [n, 2] float32, Y [n] int64)


def split_data(X: np.ndarray, Y: np.ndarray, rng: np.random.Generator,
               fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> tuple[Split, Split, Split]:
    """Shuffles and cuts ``(X, Y)`` into train, valid and test parts.

    The tutorial's ``split_data`` (two scikit-learn ``train_test_split`` calls), in numpy:
    test takes ``ceil(fractions[2] * n)`` points, valid ``ceil`` of its share of the rest.

    Args:
      X: [n, d] points.
      Y: [n] labels.
      rng: draws the permutation.
      fractions: train, valid, test fractions (summing to 1).

    Returns:
      ``((X_train, Y_train), (X_valid, Y_valid), (X_test, Y_test))``.
    """
    if len(fractions) != 3:
        raise ValueError(f"split_data: fractions must be (train, valid, test), got {fractions!r}")
    n = len(X)
    n_test = int(np.ceil(fractions[2] * n))
    n_valid = int(np.ceil(fractions[1] / (fractions[0] + fractions[1]) * (n - n_test)))
    order = rng.permutation(n)
    test, valid, train = np.split(order, [n_test, n_test + n_valid])
    return (X[train], Y[train]), (X[valid], Y[valid]), (X[test], Y[test])


def _points(n: int, rng: np.random.Generator) -> np.ndarray:
    return (rng.uniform(0, 1, size=(n, 2)) * 2 - 1).astype(np.float32)


def make_circle_dataset(n: int, r: float, rng: np.random.Generator) -> tuple[Split, Split, Split]:
    """Points labelled 1 inside the circle ``x^2 + y^2 < r`` (the tutorial's test), else 0."""
    X = _points(n, rng)
    return split_data(X, (X[:, 0] ** 2 + X[:, 1] ** 2 < r).astype(np.int64), rng)


def make_inv_circle_dataset(n: int, r: float,
                            rng: np.random.Generator) -> tuple[Split, Split, Split]:
    """Points labelled 1 outside the circle ``x^2 + y^2 > r``, else 0."""
    X = _points(n, rng)
    return split_data(X, (X[:, 0] ** 2 + X[:, 1] ** 2 > r).astype(np.int64), rng)


def make_square_dataset(n: int, r: float, rng: np.random.Generator) -> tuple[Split, Split, Split]:
    """Points labelled 1 inside the square ``|x| < r/2, |y| < r/2``, else 0."""
    X = _points(n, rng)
    inside = (np.abs(X[:, 0]) < r / 2) & (np.abs(X[:, 1]) < r / 2)
    return split_data(X, inside.astype(np.int64), rng)


MAKERS = {"circle": make_circle_dataset, "square": make_square_dataset,
          "inv_circle": make_inv_circle_dataset}


def make_datasets(seed: int = 123, n: int = N, r: float = R) -> dict[str, dict[str, Split]]:
    """The three tasks' data, drawn in the tutorial's order from one generator.

    Args:
      seed: seeds ``np.random.default_rng``; the same seed gives the same arrays.
      n: points per task (before splitting 80/10/10).
      r: the unit distance R.

    Returns:
      task ("circle", "square", "inv_circle") -> split ("train", "valid", "test") ->
      ``(X [m, 2] float32, Y [m] int64)``.
    """
    rng = np.random.default_rng(seed)
    return {task: dict(zip(SPLITS, MAKERS[task](n, r, rng), strict=True)) for task in TASKS}


def make_dataloaders(data: Mapping[str, Mapping[str, Split]], task: str,
                     batch_size: int = 32) -> list[jaxmtl.DictDataLoader]:
    """One loader per split for ``task``; its dataset carries only ``{task}_data``."""
    loaders = []
    for split, (X, Y) in data[task].items():
        dataset = jaxmtl.DictDataset(DATASET_NAMES[task], split, {f"{task}_data": X},
                                     {f"{task}_task": Y})
        loaders.append(jaxmtl.DictDataLoader(dataset, batch_size=batch_size))
    return loaders


def base_mlp() -> nn.Module:
    """The shared body: 2 -> 8 -> 4 with ReLUs (the tutorial's widths)."""
    return nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(4), nn.relu])


def make_task(task: str) -> jaxmtl.Task:
    """Task ``{task}_task``: op ``base_mlp`` on input ``{task}_data``, then ``{task}_head``.

    Every task builds an equal ``base_mlp``; equal modules under one name are one module
    with one set of weights.
    """
    return jaxmtl.Task(
        name=f"{task}_task",
        module_pool={"base_mlp": base_mlp(), f"{task}_head": nn.Dense(2)},
        op_sequence=[
            jaxmtl.Operation("base_mlp", [("_input_", f"{task}_data")]),
            jaxmtl.Operation(f"{task}_head", ["base_mlp"]),
        ],
        scorer=jaxmtl.Scorer(metrics=["accuracy"]),
    )


def main(n_epochs: int = 10, seed: int = 123, lr: float = 0.02, n: int = N,
         batch_size: int = 32, verbose: bool = True) -> dict[str, float]:
    """Trains circle + square, adds inv_circle, trains all three; returns the final scores.

    Args:
      n_epochs: epochs of each of the two ``fit`` calls.
      seed: seeds the data and the Trainer (hence the parameter initialisation).
      lr: Adam learning rate (the tutorial's 0.02).
      n: points per task.
      batch_size: batch size of every loader.
      verbose: print the accuracies of both stages.

    Returns:
      ``model.score`` over every task's train, valid and test loaders after the second
      fit: ``{"{task}_task/{dataset}/{split}/accuracy": ..., "model/all/{split}/accuracy":
      ...}``.
    """
    data = make_datasets(seed, n)
    loaders = {task: make_dataloaders(data, task, batch_size) for task in TASKS}

    model = jaxmtl.MultitaskClassifier([make_task("circle"), make_task("square")])
    trainer = jaxmtl.Trainer(n_epochs=n_epochs, lr=lr, seed=seed, progress_bar=False)
    dataloaders = loaders["circle"] + loaders["square"]
    trainer.fit(model, dataloaders)
    if verbose:
        _print_accuracies("circle + square", model.score(dataloaders))

    model.add_task(make_task("inv_circle"))
    all_dataloaders = dataloaders + loaders["inv_circle"]
    trainer.fit(model, all_dataloaders)
    scores = model.score(all_dataloaders)
    if verbose:
        _print_accuracies("after add_task(inv_circle)", scores)
    return scores


def _print_accuracies(stage: str, scores: Mapping[str, float]) -> None:
    print(f"{stage}:")
    for key, value in scores.items():
        if not key.startswith("model/"):
            print(f"  {key}: {value:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args()
    main(n_epochs=args.n_epochs, seed=args.seed)
