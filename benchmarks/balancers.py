"""Step time and memory of every gradient balancer relative to equal weighting, in jaxmtl.

Run: ``python -m benchmarks.balancers [--tasks 2 4 8] [--epochs 3] [--n 10240]
[--methods upgrad ...]``

Workload: the reference data (D = 128 standard-normal features, seed 0, 20,000 rows of
which the first N are used, logits = X @ W with W ~ N(0, 1) [D, 4]), a shared body
Dense(256)-ReLU-Dense(256)-ReLU, a head per task, batch 64 per task, Adam lr 1e-3, clip 1.0, the "mixed" batch scheduler
(one batch of every task per step, the setting these methods assume). Tasks 1..8:

====  ==============================================  ==========================
task  label                                           kind
====  ==============================================  ==========================
a     ``logits[:, 0] > 0``                            hard, 2 classes
b     ``softmax(logits)``                             soft, 4 classes
c     ``logits[:, 2] > 0``                            hard, 2 classes
d     ``logits[:, 3] > 0``                            hard, 2 classes
e     ``extra[:, 0] > 0``                             hard, 2 classes
f     ``extra[:, 1] > 0``                             hard, 2 classes
g     ``logits[:, 0] + extra[:, 0] > 0``              hard (shares a's and e's)
h     ``logits[:, 2] - extra[:, 1] > 0``              hard (conflicts with f)
====  ==============================================  ==========================

``extra = X @ W2`` with W2 ~ N(0, 1) [D, 2] drawn from the same generator right after W,
so tasks a..d are the reference workload's (the first four columns are unchanged). Every
label is the sign of a linear function of X (or the softmax of four), so every task is
learnable by the body: on the 20,000 rows each binary task's positive rate is 0.494-0.501
(tested within 0.02), and one equal-weighting epoch of the 8 tasks on them reaches training
accuracy 0.955-0.967 on every hard task (b, argmax against the soft label's argmax: 0.918).

Each (method, task count) runs in its own child process (``benchmarks.runner.run_child``:
``python -m benchmarks.balancers --spec JSON --out FILE``), cold
(``JAXMTL_COMPILATION_CACHE=0``), so its peak RSS (``ru_maxrss``) is its own: the JAX
runtime, the data, the compile and the training. The child builds the model and a
Trainer, runs a one-epoch warm-up ``fit`` (it compiles), then ``--epochs`` timed
one-epoch ``fit`` calls on the same loaders (the child counts the programs compiled
meanwhile, ``timed_compiles``: the report names any child where it is not 0); the step
time is the median over those epochs of (epoch wall time / steps), compile excluded. On a GPU or TPU
the child also reports ``memory_stats()["peak_bytes_in_use"]`` of device 0. Equal
weighting runs first and last for every task count (its two runs give the noise of the
machine; the ratios use their mean). The parent records how many cores *other* processes
kept busy during each child (``foreign_load``): the noise indicator.

Run time: 17 rows (the 14 balancers and the ``upper_bound`` variants of mgda, imtl and
aligned_mtl) plus a second equal-weighting run, for each of 3 task counts: 54 children, each
costing its JAX start-up (~4 s), one compile (2-15 s, the most for 8 tasks and the gradient
methods) and ``1 + epochs`` epochs. To keep the whole run near 15 minutes on a 2-core CPU
(the run of 2026-12-01 took 11 minutes) the timed data are N = 10,240 points (160 steps per epoch, the reference workload's 20,000
would be 313) and 3 timed epochs (480 timed steps per child): the steps are those of the
reference workload (same batch shapes and model), there are just fewer of them.

Writes ``benchmarks/results/balancers.{md,json}``; with ``--methods`` (rows whose label
starts with one of the names, plus "equal") only prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
TASK_NAMES = "abcdefgh"
STEP_LIMIT = 2.0  # the target: every method's step time <= 2x equal weighting's
COLD = {"JAXMTL_COMPILATION_CACHE": "0"}


def reference_labels(n: int = 20_000, d: int = 128) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The reference features ``X`` [n, d] float32 and the labels of tasks a..h.

    The reference data's 20,000 rows (or ``n`` if more) are drawn and the first ``n`` kept,
    so W (drawn after X) and every task are the same whatever ``n <= 20,000``.

    Returns:
      ``(X, labels)``: ``labels[t]`` is [n] ints for the hard tasks and [n, 4] float
      probabilities for task b (see the module docstring for each definition).
    """
    rng = np.random.default_rng(0)
    X = rng.standard_normal((max(n, 20_000), d)).astype(np.float32)
    W, W2 = rng.standard_normal((d, 4)), rng.standard_normal((d, 2))
    X = X[:n]
    logits, extra = X @ W, X @ W2
    soft = np.exp(logits - logits.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    signs = {"a": logits[:, 0], "c": logits[:, 2], "d": logits[:, 3], "e": extra[:, 0],
             "f": extra[:, 1], "g": logits[:, 0] + extra[:, 0],
             "h": logits[:, 2] - extra[:, 1]}
    labels = {t: (value > 0).astype(np.int64) for t, value in signs.items()}
    labels["b"] = soft.astype(np.float32)
    return X, {t: labels[t] for t in TASK_NAMES}


def make_loaders(n_tasks: int, X: np.ndarray, labels: dict[str, np.ndarray],
                 batch_size: int = 64, split: str = "train") -> list[Any]:
    """One shuffled train loader per task (tasks ``a``.. in order) over the same ``X``."""
    import jaxmtl

    if not 1 <= n_tasks <= len(TASK_NAMES):
        raise ValueError(f"n_tasks: expected 1..{len(TASK_NAMES)}, got {n_tasks!r}")
    return [jaxmtl.DictDataLoader(jaxmtl.DictDataset("ref", split, {"x": X}, {t: labels[t]}),
                                  batch_size=batch_size, shuffle=True, seed=i)
            for i, t in enumerate(TASK_NAMES[:n_tasks])]


def make_model(n_tasks: int) -> Any:
    """The shared body and a head per task (4 classes for b, 2 for the others)."""
    import flax.linen as nn

    import jaxmtl

    body = nn.Sequential([nn.Dense(256), nn.relu, nn.Dense(256), nn.relu])
    tasks = [jaxmtl.Task(t, {"body": body, f"head_{t}": nn.Dense(4 if t == "b" else 2)},
                         [jaxmtl.Operation("body", [("_input_", "x")]),
                          jaxmtl.Operation(f"head_{t}", ["body"])])
             for t in TASK_NAMES[:n_tasks]]
    return jaxmtl.MultitaskClassifier(tasks, seed=0)


def methods() -> list[tuple[str, str, dict[str, Any]]]:
    """Rows ``(label, balancer name, balancer_config)``: every balancer, then the UB variants."""
    from jaxmtl.training.balancers import BALANCER_NAMES

    return [*((name, name, {}) for name in BALANCER_NAMES),
            *((f"{name} (upper_bound)", name, {"upper_bound": True})
              for name in ("mgda", "imtl", "aligned_mtl"))]


def resolve(label: str) -> tuple[str, dict[str, Any]]:
    """The balancer name and config of a row label (``"mgda (upper_bound)"`` included)."""
    for row_label, name, config in methods():
        if row_label == label:
            return name, config
    raise ValueError(f"method: unknown row {label!r}; expected one of "
                     f"{[row[0] for row in methods()]}")


def device_peak_bytes() -> int | None:
    """``peak_bytes_in_use`` of device 0 on a GPU/TPU; None on the CPU or if not reported."""
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        return None
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return int(peak) if peak is not None else None


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """The child: step time of one (method, task count) after a warm-up fit.

    Args:
      spec: ``method`` (a row label), ``n_tasks``, ``n`` (points), ``epochs`` (timed
        one-epoch fits after a one-epoch warm-up fit), ``batch_size`` (default 64).

    Returns:
      ``step_ms`` (median over the timed epochs of epoch seconds / steps), ``best_ms``,
      ``epoch_ms`` (every timed epoch's ms per step), ``steps`` (per epoch), ``warmup_s``
      (the warm-up fit: compile and one epoch), ``timed_compiles`` (programs compiled
      during the timed fits: 0 when they measure steady steps), ``start_rss_mb``
      (peak RSS before the model is built: interpreter, JAX, data) and
      ``device_peak_bytes`` (None on the CPU). ``child_main`` adds ``peak_rss_mb``.
    """
    import jax

    import jaxmtl
    from benchmarks.workload import peak_rss_mb

    name, config = resolve(spec["method"])
    n_tasks, batch_size = spec["n_tasks"], spec.get("batch_size", 64)
    X, labels = reference_labels(spec["n"])
    loaders = make_loaders(n_tasks, X, labels, batch_size)
    start_rss = peak_rss_mb()
    model = make_model(n_tasks)
    trainer = jaxmtl.Trainer(n_epochs=1, lr=1e-3, seed=0, progress_bar=False,
                             batch_scheduler="mixed", balancer=name, balancer_config=config)
    start = time.perf_counter()
    # The warm-up epoch runs on the timed loaders themselves: a fit on other loaders (even
    # of the same batch shapes but fewer steps) leaves a program to compile in the first
    # timed fit.
    trainer.fit(model, loaders)
    jax.block_until_ready(trainer.state.params)
    warmup_s = time.perf_counter() - start
    steps = len(loaders[0])
    compiles: list[float] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **_: compiles.append(duration)
        if event == "/jax/core/compile/backend_compile_duration" else None)
    seconds = []
    for _ in range(spec["epochs"]):
        start = time.perf_counter()
        trainer.fit(model, loaders)
        jax.block_until_ready(trainer.state.params)
        seconds.append((time.perf_counter() - start) / steps)
    return {"method": spec["method"], "balancer": name, "balancer_config": config,
            "n_tasks": n_tasks, "steps": steps, "step_ms": 1e3 * statistics.median(seconds),
            "best_ms": 1e3 * min(seconds), "epoch_ms": [1e3 * s for s in seconds],
            "warmup_s": warmup_s, "timed_compiles": len(compiles), "start_rss_mb": start_rss,
            "device_peak_bytes": device_peak_bytes(),
            "platform": jax.devices()[0].platform, "devices": [str(d) for d in jax.devices()],
            "jax": jax.__version__}


def run_children(task_counts: list[int], labels: list[str], spec: dict[str, Any],
                 log: Any = print, equal_runs: int = 2) -> dict[str, dict[str, Any]]:
    """Runs every (method, task count) child, one at a time; ``{str(T): {label: record}}``.

    Args:
      task_counts: the task counts T (1..8).
      labels: the rows (``methods()`` labels) besides equal weighting, which always runs.
      spec: the child's spec less ``method`` and ``n_tasks`` (see ``measure``).
      log: called with each progress line.
      equal_runs: 2 runs equal weighting first and last for each task count, 1 first only.

    Returns:
      Per task count, equal weighting's record first: its runs (``runs``) and the means
      of their ``step_ms`` and ``peak_rss_mb`` (the baseline of the ratios), then each
      label's record: the child's JSON plus ``child_wall_s`` and ``foreign_load``.
    """
    from benchmarks.runner import Implementation, run_child

    impl = Implementation("balancers", "jaxmtl Trainer.fit with a balancer",
                          "benchmarks.balancers", env=COLD)
    if equal_runs not in (1, 2):
        raise ValueError(f"equal_runs: expected 1 or 2, got {equal_runs!r}")
    order = ["equal", *(label for label in labels if label != "equal"),
             *(["equal"] if equal_runs == 2 else [])]
    results: dict[str, dict[str, Any]] = {}
    for n_tasks in task_counts:
        block: dict[str, Any] = {}
        equal_runs = []
        for label in order:
            log(f"[balancers] {n_tasks} tasks, {label} ...")
            record = run_child(impl, {**spec, "method": label, "n_tasks": n_tasks},
                               sys.executable)
            row = {**record["result"], "child_wall_s": record["child_wall_s"],
                   "foreign_load": record["foreign_load"]}
            if "step_ms" not in row:  # an error or a skipped child: the report says "failed"
                log(row.get("error") or row.get("skipped") or f"no result: {row}")
            else:
                log(f"[balancers]   {row['step_ms']:.3f} ms/step, peak RSS "
                    f"{row['peak_rss_mb']:.0f} MiB, child {row['child_wall_s']:.1f} s, "
                    f"other load {row['foreign_load'] or 0.0:.2f} cores")
            if label == "equal":
                equal_runs.append(row)
            else:
                block[label] = row
        block = {"equal": combine_equal(equal_runs), **block}
        results[str(n_tasks)] = block
    return results


def combine_equal(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One equal-weighting record from its runs: mean step time and peak RSS, runs kept."""
    good = [run for run in runs if "error" not in run]
    if not good:
        return {"error": "every equal-weighting run failed", "runs": runs}
    return {**good[0], "step_ms": statistics.mean(run["step_ms"] for run in good),
            "best_ms": min(run["best_ms"] for run in good),
            "peak_rss_mb": statistics.mean(run["peak_rss_mb"] for run in good),
            "runs": runs}


def ratio(row: dict[str, Any], base: dict[str, Any], key: str) -> float | None:
    """``row[key] / base[key]``, or None when either is missing (a failed child)."""
    value, reference = row.get(key), base.get(key)
    if value is None or not reference:
        return None
    return value / reference


def verdict(results: dict[str, dict[str, Any]],
            limit: float = STEP_LIMIT) -> tuple[bool, list[str]]:
    """Whether every method's step time is <= ``limit`` x equal's, for every task count.

    Returns:
      ``(passed, failures)``: each failure names the task count, the method and its
      ratio, or that its child failed (a failed child is a failure, never left out).
    """
    failures = []
    for n_tasks, block in results.items():
        base = block["equal"]
        for label, row in block.items():
            step_ratio = ratio(row, base, "step_ms")
            if step_ratio is None:
                failures.append(f"{n_tasks} tasks: {label}: not measured (the child failed)")
            elif step_ratio > limit:
                failures.append(f"{n_tasks} tasks: {label}: {step_ratio:.2f}x equal")
    return not failures, failures


def _cell(value: float | None, fmt: str) -> str:
    return "failed" if value is None else format(value, fmt)


def render(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    """The Markdown report: per task count, ms/step, x equal, peak RSS MiB, x equal; verdict."""
    counts = list(results)
    labels = list(results[counts[0]])
    lines = [
        "# Gradient balancers: step time and memory relative to equal weighting",
        "",
        f"- command: `{meta['command']}` ({meta['date']})",
        f"- machine: {meta['machine']}, jax.devices() = {meta['devices']}, jax {meta['jax']}",
        f"- workload: reference body, batch 64 per task, 'mixed' scheduler (one batch of "
        f"every task per step), N = {meta['n']:,} points ({meta['steps']} steps per epoch); "
        f"median of {meta['epochs']} timed one-epoch fits after a warm-up fit (compile "
        "excluded); each (method, task count) in its own cold child process",
        "- peak RSS: `ru_maxrss` of the child (JAX runtime, data, compile and training); "
        "equal weighting ran first and last for each task count, its figures are the mean "
        "of the two runs",
        "",
        "| method | " + " | ".join(f"{n} tasks: ms/step | x equal | peak RSS MiB | RSS x equal"
                                  for n in counts) + " |",
        "|---|" + "---:|---:|---:|---:|" * len(counts),
    ]
    for label in labels:
        cells = []
        for n in counts:
            row, base = results[n].get(label, {}), results[n]["equal"]
            cells.append(" | ".join([
                _cell(row.get("step_ms"), ".2f"), _cell(ratio(row, base, "step_ms"), ".2f"),
                _cell(row.get("peak_rss_mb"), ".0f"),
                _cell(ratio(row, base, "peak_rss_mb"), ".2f")]))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    device_rows = [(n, label, row["device_peak_bytes"]) for n in counts
                   for label, row in results[n].items() if row.get("device_peak_bytes")]
    if device_rows:
        lines += ["", "Peak device memory (`memory_stats()['peak_bytes_in_use']`, MiB):", ""]
        lines += [f"- {n} tasks, {label}: {value / 2**20:.1f}" for n, label, value in device_rows]
    lines += ["", "Noise: equal weighting's two runs per task count (ms/step): " + "; ".join(
        f"{n} tasks " + " / ".join(_cell(run.get("step_ms"), ".2f")
                                   for run in results[n]["equal"].get("runs", []))
        for n in counts)]
    compiled = [f"{n} tasks {label} ({row['timed_compiles']})" for n in counts
                for label, row in results[n].items() if row.get("timed_compiles")]
    if compiled:
        lines.append("Programs compiled during the timed fits (their step time includes "
                     "a compile): " + ", ".join(compiled) + ".")
    loads = [row["foreign_load"] for n in counts for row in results[n].values()
             if row.get("foreign_load") is not None]
    if loads:
        lines.append(f"Other processes kept {min(loads):.2f}-{max(loads):.2f} cores busy "
                     f"(median {statistics.median(loads):.2f}) during the children.")
    passed, failures = verdict(results)
    lines += ["", f"**{'PASS' if passed else 'FAIL'}**: every method <= {STEP_LIMIT:g}x equal "
              f"weighting's step time for {', '.join(counts)} tasks"
              + ("." if passed else ": " + "; ".join(failures) + ".")]
    return "\n".join(lines) + "\n"


def main() -> None:
    """The parent (writes the report) or, with ``--spec``, one child."""
    if "--spec" in sys.argv:
        from benchmarks.workload import child_main

        child_main("balancers", measure)
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--epochs", type=int, default=3, help="timed one-epoch fits per child")
    parser.add_argument("--n", type=int, default=10_240, help="points (rows of X)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="only these methods (and equal); the table is printed, not written")
    args = parser.parse_args()
    for n_tasks in args.tasks:
        if not 1 <= n_tasks <= len(TASK_NAMES):
            parser.error(f"--tasks: expected counts in 1..{len(TASK_NAMES)}, got {n_tasks}")
    labels = [row[0] for row in methods()]
    if args.methods:
        labels = [label for label in labels
                  if label == "equal" or label.split()[0] in args.methods]
    from benchmarks.workload import cpu_model

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    spec = {"n": args.n, "epochs": args.epochs, "batch_size": 64}
    results = run_children(args.tasks, labels, spec)
    first = next(row for block in results.values() for row in block.values()
                 if "devices" in row)
    meta = {"command": " ".join(["python -m benchmarks.balancers", *sys.argv[1:]]),
            "date": started, "machine": f"{cpu_model()} ({os.cpu_count()} cores)",
            "devices": first["devices"], "jax": first["jax"], "n": args.n,
            "epochs": args.epochs, "steps": first["steps"]}
    report = render(results, meta)
    print(report)
    if args.methods:
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "balancers.md").write_text(report)
    passed, failures = verdict(results)
    (RESULTS / "balancers.json").write_text(json.dumps(
        {"meta": meta, "passed": passed, "failures": failures, "results": results},
        indent=1, default=str))


if __name__ == "__main__":
    main()
