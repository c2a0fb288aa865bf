"""Child of ``python -m benchmarks.mtl``: one (data set, method) over every seed.

Run by the parent as ``python -m benchmarks.mtl_train --spec JSON --out PATH``; the spec
holds ``dataset``, ``method`` ("single" or a balancer name), ``seeds``, ``epochs``,
``quick``, ``hidden``, ``batch_size`` and ``lr``.

The protocol, the same for every method:

- One train loader holding every task's labels (so every step sees every task, as the
  balancers assume), batch ``batch_size``, Adam at ``lr``, no gradient clipping, the same
  ``epochs`` for every method; the model is scored on the valid and the test split after
  every epoch (the test loader is given to the Trainer under the valid split with its own
  dataset name, so the Trainer's per-epoch evaluation scores it; the selection reads only
  the valid scores).
- The best epoch is the one with the highest valid macro-average (the mean over tasks and
  the data set's metrics); the reported scores are the test scores of that epoch.
- "single": T single-task models, each the same body and head as the multi-task model,
  trained side by side in one program: every task has its own body, there is no shared
  parameter, no clipping, and Adam updates each parameter from its own gradient, so the
  summed loss trains T independent models at the cost of one compile. Each single-task
  model takes its own best epoch by its own valid scores.
- Step time: after seed 0's run, one more epoch on the same Trainer (compiled step
  reused, no evaluation), milliseconds per step.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks.data_splits import MTLData
from benchmarks.workload import child_main

DATASETS = ("digits", "yeast", "yeast_partial", "synthetic")


def load_dataset(name: str, quick: bool) -> MTLData:
    """The named data set, smaller under ``quick``."""
    if name == "digits":
        from benchmarks import data_digits

        return data_digits.load(n_train=1000, n_eval=300) if quick else data_digits.load(
            n_train=4000, n_eval=1000)
    if name in ("yeast", "yeast_partial"):
        from benchmarks import data_yeast

        return data_yeast.load() if name == "yeast" else data_yeast.load_partial()
    if name == "synthetic":
        from benchmarks import data_synthetic

        return data_synthetic.load(n_train=1000, n_eval=300) if quick else data_synthetic.load(
            n_train=2000, n_eval=1000)
    raise ValueError(f"Unknown data set {name!r}; expected one of {list(DATASETS)}")


def scaled_loss(outputs: Any, labels: Any, scale: float) -> Any:
    """Per-example cross entropy ``[B]`` times ``scale`` (the synthetic's loss scales)."""
    from jaxmtl.losses import default_loss

    return scale * default_loss(outputs, labels)


def build_model(data: MTLData, single: bool, hidden: int, seed: int):
    """The multi-task model (one shared body), or the side-by-side single-task models."""
    import flax.linen as nn

    import jaxmtl

    tasks = []
    for task in data.task_names:
        body = f"body_{task}" if single else "body"
        pool = {body: nn.Sequential([nn.Dense(hidden), nn.relu, nn.Dense(hidden), nn.relu]),
                f"head_{task}": nn.Dense(data.num_classes[task])}
        scale = data.loss_scale.get(task, 1.0)
        tasks.append(jaxmtl.Task(
            task, pool,
            [jaxmtl.Operation(body, [("_input_", "x")]),
             jaxmtl.Operation(f"head_{task}", [body])],
            scorer=jaxmtl.Scorer(metrics=list(data.metrics)),
            loss_func=None if scale == 1.0 else functools.partial(scaled_loss, scale=scale)))
    return jaxmtl.MultitaskClassifier(tasks, seed=seed)


def epoch_scores(log: dict[str, list], name: str) -> list[dict[str, float]]:
    """Per evaluation (epoch), the scores as ``task/{name}/{valid|test}/metric``.

    ``log`` is the JSON writer's ``{scalar: [[step, value], ...]}``; the test loader's
    scores (dataset ``{name}_test``, split valid) are renamed to the test split.
    """
    by_step: dict[float, dict[str, float]] = {}
    valid_part, test_part = f"/{name}/valid/", f"/{name}_test/valid/"
    for key, points in log.items():
        if test_part in key:
            renamed = key.replace(test_part, f"/{name}/test/")
        elif valid_part in key:
            renamed = key
        else:
            continue
        for step, value in points:
            by_step.setdefault(step, {})[renamed] = float(value)
    return [by_step[step] for step in sorted(by_step)]


def train_losses_finite(log: dict[str, list]) -> bool:
    """Whether every logged train loss is finite."""
    return all(np.isfinite(value) for key, points in log.items() if key.endswith("/loss")
               for _, value in points)


def run_seed(data: MTLData, method: str, seed: int, spec: dict[str, Any],
             log_dir: str) -> tuple[dict[str, Any], Any, Any, Any]:
    """Trains one seed; returns (record, trainer, model, train loader)."""
    import jax

    import jaxmtl

    single = method == "single"
    loaders = []
    for split, dataset_name, split_name in (("train", data.name, "train"),
                                            ("valid", data.name, "valid"),
                                            ("test", f"{data.name}_test", "valid")):
        X, labels = data.splits[split]
        loaders.append(jaxmtl.DictDataLoader(
            jaxmtl.DictDataset(dataset_name, split_name, {"x": X}, labels),
            batch_size=spec["batch_size"] if split == "train" else 512,
            shuffle=split == "train"))
    trainer = jaxmtl.Trainer(
        n_epochs=spec["epochs"], lr=spec["lr"], seed=seed, grad_clip=None,
        progress_bar=False, balancer="equal" if single else method,
        on_nonfinite="warn", logging=True, log_writer="json",
        log_writer_config={"log_dir": log_dir, "run_name": f"seed{seed}"})
    model = build_model(data, single, spec["hidden"], seed)
    start = time.perf_counter()
    trainer.fit(model, loaders)
    fit_s = time.perf_counter() - start
    with open(os.path.join(log_dir, f"seed{seed}", "log.json")) as f:
        log = json.load(f)
    params_finite = all(bool(np.isfinite(np.asarray(leaf)).all())
                        for leaf in jax.tree.leaves(model.params))
    record = {"seed": seed, "fit_s": fit_s, "epochs": epoch_scores(log, data.name),
              "finite": params_finite and train_losses_finite(log)}
    return record, trainer, model, loaders[0]


def step_ms(trainer: Any, model: Any, train_loader: Any) -> float:
    """Milliseconds per step of one more epoch on a fitted Trainer (no evaluation)."""
    import jax

    start = time.perf_counter()
    trainer.fit(model, [train_loader])
    jax.block_until_ready(model.params)
    return 1e3 * (time.perf_counter() - start) / len(train_loader)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Every seed of one (data set, method); the JSON the parent reads."""
    data = load_dataset(spec["dataset"], spec.get("quick", False))
    records, timing = [], None
    with tempfile.TemporaryDirectory(prefix="jaxmtl-mtlbench-") as log_dir:
        for seed in spec["seeds"]:
            record, trainer, model, train_loader = run_seed(data, spec["method"], seed, spec,
                                                            log_dir)
            if timing is None:
                timing = step_ms(trainer, model, train_loader)
            records.append(record)
    return {"dataset": data.name, "method": spec["method"], "tasks": data.task_names,
            "metrics": list(data.metrics), "note": data.note, "step_ms": timing,
            "steps_per_epoch": -(-len(data.splits["train"][0]) // spec["batch_size"]),
            "seeds": records}


if __name__ == "__main__":
    child_main("mtl_train", run)
