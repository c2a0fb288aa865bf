"""Snorkel 0.10 + torch on the multi-task tutorial's data: the accuracies jaxmtl is held to.

The run of ``examples/per_task_inputs.py`` (same data from ``make_datasets(seed)``, same
widths 2 -> 8 -> 4 -> 2, Adam at lr 0.02, 10 epochs, batch size 32, Snorkel's default
Trainer config otherwise) on Snorkel's ``MultitaskClassifier``: fit circle + square, score,
``add_task`` inv_circle, fit all three, score. Snorkel 0.10's ``Trainer(seed=...)`` sets no
seed, so each run seeds ``random``, ``numpy`` and ``torch`` itself, as the tutorial does.

Run (from the repository root, in the bench venv):

    .venv-bench/bin/python -m benchmarks.tutorial_snorkel --seeds 0 1 2 3 4
    .venv-bench/bin/python -m benchmarks.tutorial_snorkel --seeds 0 1 2 3 4 --impls snorkel jaxmtl

Prints per-seed train/valid/test accuracies per task and stage, then mean +- std over seeds.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from per_task_inputs import DATASET_NAMES, TASKS, make_datasets  # noqa: E402

STAGES = ("stage1", "stage2")  # after fit(circle + square); after add_task + fit(all three)


def snorkel_task(task: str, base_mlp: Any) -> Any:
    """Task ``{task}_task``: op ``base_mlp`` on ``{task}_data``, then ``{task}_head``."""
    from snorkel.analysis import Scorer
    from snorkel.classification import Operation, Task
    from torch import nn

    return Task(
        name=f"{task}_task",
        module_pool=nn.ModuleDict({"base_mlp": base_mlp, f"{task}_head": nn.Linear(4, 2)}),
        op_sequence=[
            Operation("base_mlp", [("_input_", f"{task}_data")]),
            Operation(f"{task}_head", ["base_mlp"]),
        ],
        scorer=Scorer(metrics=["accuracy"]),
    )


def snorkel_loaders(data: Mapping[str, Any], task: str, batch_size: int) -> list[Any]:
    """One Snorkel DictDataLoader per split; its dataset carries only ``{task}_data``."""
    import torch
    from snorkel.classification import DictDataLoader, DictDataset

    loaders = []
    for split, (X, Y) in data[task].items():
        dataset = DictDataset(DATASET_NAMES[task], split, {f"{task}_data": torch.FloatTensor(X)},
                              {f"{task}_task": torch.LongTensor(Y)})
        loaders.append(DictDataLoader(dataset, batch_size=batch_size))
    return loaders


def run_snorkel(seed: int, n_epochs: int = 10, lr: float = 0.02, n: int = 1000,
                batch_size: int = 32) -> dict[str, dict[str, float]]:
    """One tutorial run on Snorkel; returns stage -> ``model.score`` dict."""
    import torch
    from snorkel.classification import MultitaskClassifier, Trainer
    from torch import nn

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    data = make_datasets(seed, n)
    loaders = {task: snorkel_loaders(data, task, batch_size) for task in TASKS}
    base_mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU())
    model = MultitaskClassifier([snorkel_task("circle", base_mlp),
                                 snorkel_task("square", base_mlp)])
    trainer = Trainer(progress_bar=False, n_epochs=n_epochs, lr=lr)
    dataloaders = loaders["circle"] + loaders["square"]
    trainer.fit(model, dataloaders)
    stage1 = model.score(dataloaders)
    model.add_task(snorkel_task("inv_circle", base_mlp))
    all_dataloaders = dataloaders + loaders["inv_circle"]
    trainer.fit(model, all_dataloaders)
    return {"stage1": stage1, "stage2": model.score(all_dataloaders)}


def run_jaxmtl(seed: int, n_epochs: int = 10, lr: float = 0.02, n: int = 1000,
               batch_size: int = 32) -> dict[str, dict[str, float]]:
    """The same run on jaxmtl (``examples/per_task_inputs.main``); stage 2 only."""
    from per_task_inputs import main

    return {"stage2": main(n_epochs=n_epochs, seed=seed, lr=lr, n=n, batch_size=batch_size,
                           verbose=False)}


RUNNERS = {"snorkel": run_snorkel, "jaxmtl": run_jaxmtl}


def accuracy_rows(scores: Mapping[str, Mapping[str, float]]) -> dict[tuple[str, str, str], float]:
    """(stage, task, split) -> accuracy for every split."""
    rows = {}
    for stage, stage_scores in scores.items():
        for key, value in stage_scores.items():
            task, _, split, metric = key.split("/")
            if task != "model" and metric == "accuracy":
                rows[(stage, task, split)] = float(value)
    return rows


def summarize(per_seed: Sequence[Mapping[tuple[str, str, str], float]]) -> list[str]:
    """Lines ``stage task split: mean +- std (min .. max)`` over seeds."""
    lines = []
    for key in sorted(per_seed[0]):
        values = [rows[key] for rows in per_seed]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"{' '.join(key):<40} {statistics.mean(values):.3f} +- {std:.3f} "
                     f"(min {min(values):.3f}, max {max(values):.3f})")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--n-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--n", type=int, default=1000, help="points per task")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--impls", nargs="+", choices=list(RUNNERS), default=["snorkel"],
                        help="jaxmtl runs examples/per_task_inputs.main with the same settings")
    args = parser.parse_args(argv)

    if "snorkel" in args.impls:
        import torch

        torch.set_num_threads(1)
    settings = dict(n_epochs=args.n_epochs, lr=args.lr, n=args.n, batch_size=args.batch_size)
    print(f"settings: {settings}, seeds {args.seeds}")
    for name in args.impls:
        run = RUNNERS[name]
        per_seed = []
        for seed in args.seeds:
            rows = accuracy_rows(run(seed, **settings))
            per_seed.append(rows)
            print(f"[{name}] seed {seed}: " + ", ".join(
                f"{stage}/{task}/{split}={value:.3f}"
                for (stage, task, split), value in sorted(rows.items())))
        print(f"[{name}] mean +- std over {len(args.seeds)} seeds:")
        for line in summarize(per_seed):
            print(f"  {line}")


if __name__ == "__main__":
    main()
