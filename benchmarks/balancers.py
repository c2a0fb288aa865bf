"""Step time of every gradient balancer relative to equal weighting, in jaxmtl.

Run: python -m benchmarks.balancers [--tasks 2 4] [--epochs 2] [--methods upgrad imtl ...]

The reference workload (N = 20,000 points, D = 128, body Dense(256)-ReLU-Dense(256)-ReLU,
batch 64 per task, Adam lr 1e-3, clip 1.0) with 2 or 4 tasks (tasks c and d: the signs of
logits 2 and 3), trained with the "mixed" batch scheduler (one batch of every task per
step, the setting these methods assume). For each method: a warm-up ``fit`` (compiles),
then the median of timed ``fit`` calls on the same model and Trainer (the compiled step is
reused, so they measure steady steps). Writes ``benchmarks/results/balancers.{md,json}``;
with ``--methods`` (rows whose label starts with one of the names, plus "equal"), only
prints the table.

LibMTL (the PyTorch library of these methods) is not in the ``bench`` extra here: its
PyPI release pins an older torch than the 2.13.0 CPU build available on this machine, so
its column is reported as not measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

import jaxmtl
from jaxmtl.training.balancers import BALANCER_NAMES

RESULTS = Path(__file__).resolve().parent / "results"


def make_loaders(n_tasks: int, n: int = 20_000, d: int = 128, batch_size: int = 64):
    """One train loader per task over the reference data (tasks a, b, c, d)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, d)).astype(np.float32)
    logits = X @ rng.standard_normal((d, 4))
    soft = np.exp(logits - logits.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    labels = {"a": (logits[:, 0] > 0).astype(int), "b": soft,
              "c": (logits[:, 2] > 0).astype(int), "d": (logits[:, 3] > 0).astype(int)}
    return [jaxmtl.DictDataLoader(jaxmtl.DictDataset("ref", "train", {"x": X}, {t: labels[t]}),
                                  batch_size=batch_size, shuffle=True, seed=i)
            for i, t in enumerate("abcd"[:n_tasks])]


def make_model(n_tasks: int) -> jaxmtl.MultitaskClassifier:
    body = nn.Sequential([nn.Dense(256), nn.relu, nn.Dense(256), nn.relu])
    tasks = [jaxmtl.Task(t, {"body": body, f"head_{t}": nn.Dense(4 if t == "b" else 2)},
                         [jaxmtl.Operation("body", [("_input_", "x")]),
                          jaxmtl.Operation(f"head_{t}", ["body"])])
             for t in "abcd"[:n_tasks]]
    return jaxmtl.MultitaskClassifier(tasks, seed=0)


# Rows: a balancer name, or (label, name, balancer_config).
METHODS = [*BALANCER_NAMES,
           *((f"{name} (upper_bound)", name, {"upper_bound": True})
             for name in ("mgda", "imtl", "aligned_mtl"))]


def time_method(method: str, n_tasks: int, epochs: int,
                balancer_config: dict | None = None) -> dict[str, float]:
    """Median seconds per step of ``epochs`` timed single-epoch fits after a warm-up."""
    loaders = make_loaders(n_tasks)
    model = make_model(n_tasks)
    trainer = jaxmtl.Trainer(n_epochs=1, lr=1e-3, seed=0, progress_bar=False,
                             batch_scheduler="mixed", balancer=method,
                             balancer_config=balancer_config or {})
    trainer.fit(model, loaders)
    steps = len(loaders[0])
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        trainer.fit(model, loaders)
        jax.block_until_ready(trainer.state.params)
        seconds.append((time.perf_counter() - start) / steps)
    return {"step_ms": 1e3 * statistics.median(seconds), "best_ms": 1e3 * min(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=None,
                        help="only these methods (and equal); the table is printed, not written")
    args = parser.parse_args()
    rows = [(m, m, {}) if isinstance(m, str) else m for m in METHODS]
    if args.methods:
        rows = [row for row in rows
                if row[0] == "equal" or any(row[0].split()[0] == m for m in args.methods)]
    results = {n: {label: time_method(name, n, args.epochs, config)
                   for label, name, config in rows}
               for n in args.tasks}
    lines = [
        "# Gradient balancers: step time relative to equal weighting",
        "",
        f"- machine: {platform.processor() or platform.machine()}, jax.devices() = "
        f"{[str(d) for d in jax.devices()]}, jax {jax.__version__}",
        "- workload: reference body, batch 64 per task, 'mixed' scheduler (one batch of "
        "every task per step); median of "
        f"{args.epochs} timed epochs after a warm-up fit (compile excluded)",
        "",
        "| method | " + " | ".join(f"{n} tasks: ms/step | x equal" for n in args.tasks) +
        " | LibMTL x equal |",
        "|---|" + "---:|---:|" * len(args.tasks) + "---:|",
    ]
    for method, _, _ in rows:
        cells = []
        for n in args.tasks:
            row, base = results[n][method], results[n]["equal"]
            cells.append(f"{row['step_ms']:.2f} | {row['step_ms'] / base['step_ms']:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " | not measured |")
    lines += ["", "Target: per-task-gradient methods (gradnorm, pcgrad, cagrad, mgda, nash_mtl, "
              "imtl, aligned_mtl, upgrad, db_mtl) under 2x equal weighting for 2-4 tasks."]
    if args.methods:
        print("\n".join(lines))
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "balancers.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "balancers.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
