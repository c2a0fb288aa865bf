"""Snorkel 0.10 ``MultitaskClassifier`` + ``Trainer`` (PyTorch eager) on the reference workload.

The peer the targets are stated against. Configured as jaxmtl's run: default Trainer
config with ``lr=1e-3``, ``progress_bar=False`` (Adam, ``grad_clip=1.0``, shuffled batch
scheduler, no logging, no checkpointing, no valid split). Snorkel's ``DictDataLoader`` is a
torch ``DataLoader`` that collates per example, as Snorkel users run it.

Timing: one warm-up ``fit(n_epochs=1)``, then ``R`` more ``fit(n_epochs=1)`` calls on the
same model and trainer, each timed (eager PyTorch has nothing to recompile; each ``fit``
rebuilds Snorkel's optimizer, which is negligible next to an epoch).
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

from benchmarks.workload import (
    child_main,
    make_data,
    n_batches,
    predict_stats,
    summarize,
    timed,
    train_accuracy,
)


def snorkel_info() -> dict[str, Any]:
    """snorkel and torch versions."""
    import snorkel
    import torch

    return {"snorkel": snorkel.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def build(config: dict[str, Any]) -> tuple[Any, list[Any], Any, Any]:
    """The model, the two train loaders, a predict loader (both labels) and hard labels."""
    import torch
    from snorkel.classification import (
        DictDataLoader,
        DictDataset,
        MultitaskClassifier,
        Operation,
        Task,
        cross_entropy_with_probs,
    )
    from torch import nn

    torch.manual_seed(0)
    width = config["width"]
    X_np, hard_np, soft_np = make_data(config["n"], config["d"])
    X, hard, soft = (torch.from_numpy(a) for a in (X_np, hard_np, soft_np))
    body = nn.Sequential(nn.Linear(config["d"], width), nn.ReLU(), nn.Linear(width, width),
                         nn.ReLU())
    ops = {name: [Operation("body", [("_input_", "x")]), Operation(name, ["body"])]
           for name in ("head_a", "head_b")}
    tasks = [
        Task("task_a", nn.ModuleDict({"body": body, "head_a": nn.Linear(width, 2)}),
             ops["head_a"]),
        Task("task_b", nn.ModuleDict({"body": body, "head_b": nn.Linear(width, 4)}),
             ops["head_b"], loss_func=cross_entropy_with_probs),
    ]
    model = MultitaskClassifier(tasks)
    bs = config["batch_size"]
    train = [
        DictDataLoader(DictDataset("synthetic_a", "train", {"x": X}, {"task_a": hard}),
                       batch_size=bs, shuffle=True),
        DictDataLoader(DictDataset("synthetic_b", "train", {"x": X}, {"task_b": soft}),
                       batch_size=bs, shuffle=True),
    ]
    both = DictDataset("synthetic", "test", {"x": X}, {"task_a": hard, "task_b": soft})
    return model, train, DictDataLoader(both, batch_size=config["predict_batch"]), hard_np


def run_config(config: dict[str, Any], repeats: int, with_predict: bool) -> dict[str, Any]:
    """Warm-up fit, ``repeats`` timed one-epoch fits, then ``model.predict`` throughput."""
    from snorkel.classification import Trainer

    model, train, predict_loader, hard_np = build(config)
    trainer = Trainer(n_epochs=1, lr=config["lr"], grad_clip=config["grad_clip"],
                      progress_bar=False)
    seconds = [timed(lambda: trainer.fit(model, train))[0] for _ in range(1 + repeats)]
    n, bs = config["n"], config["batch_size"]
    result = {"config": config, **summarize(seconds[1:], 2 * n), "warmup_epoch_s": seconds[0],
              "compile_s": seconds[0] - statistics.median(seconds[1:]),
              "steps_per_epoch": 2 * n_batches(n, bs)}
    if with_predict:
        out = model.predict(predict_loader)
        times = [timed(lambda: model.predict(predict_loader))[0] for _ in range(repeats)]
        result.update(predict_stats(times, n))
        result["task_a_train_accuracy"] = train_accuracy(out["probs"]["task_a"].numpy(),
                                                         hard_np)
    return result


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs every config of ``spec``."""
    logging.getLogger().setLevel(logging.WARNING)
    info = snorkel_info()
    results = [run_config(config, spec["repeats"], spec.get("predict", True))
               for config in spec["configs"]]
    return {"info": info, "results": results}


if __name__ == "__main__":
    child_main("snorkel", run)
