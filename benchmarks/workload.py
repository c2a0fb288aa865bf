"""The reference workload and the helpers every implementation's child process shares.

Workload (the reference workload defined in ``benchmarks/README.md``): N points per task, D = 128 float32
standard-normal features (seed 0), W ~ N(0, 1) [D, 4], logits = X @ W; task ``task_a`` is
the hard label ``logits[:, 0] > 0`` and task ``task_b`` the soft label ``softmax(logits)``.
Both tasks train on the same X through one loader each. Model: a shared body
Dense(width)-ReLU-Dense(width)-ReLU with heads Dense(2) and Dense(4); Adam lr 1e-3,
gradient clipping 1.0, a shuffled batch scheduler over the two loaders.

This module imports only numpy and the standard library, so every implementation (JAX or
PyTorch) can use it. A child is run as ``python -m benchmarks.impl_<name> --spec JSON
--out FILE`` and writes one JSON document to ``FILE`` (see ``child_main``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

N_PER_TASK = 20_000
N_FEATURES = 128
WIDTH = 256
BATCH_SIZE = 64
PREDICT_BATCH = 1024
LR = 1e-3
GRAD_CLIP = 1.0
N_CLASSES = {"task_a": 2, "task_b": 4}
TASKS = ("task_a", "task_b")


def default_config() -> dict[str, Any]:
    """The reference configuration: one dict, passed to every implementation."""
    return {"n": N_PER_TASK, "d": N_FEATURES, "width": WIDTH, "batch_size": BATCH_SIZE,
            "predict_batch": PREDICT_BATCH, "lr": LR, "grad_clip": GRAD_CLIP}


def make_data(n: int = N_PER_TASK, d: int = N_FEATURES, seed: int = 0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The workload's data: X float32 [n, d], hard labels int64 [n], soft labels float32 [n, 4].

    The first ``n`` rows are the same for every ``n`` <= N_PER_TASK (the full set is drawn,
    then cut), so a smaller scaling run trains on a prefix of the reference data.
    """
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((max(n, N_PER_TASK), d), dtype=np.float32)[:n]
    W = rng.standard_normal((d, 4)).astype(np.float32)
    logits = X @ W
    hard = (logits[:, 0] > 0).astype(np.int64)
    z = logits - logits.max(axis=1, keepdims=True)
    soft = np.exp(z)
    soft /= soft.sum(axis=1, keepdims=True)
    return X, hard, soft.astype(np.float32)


def flops_per_point(width: int, d: int = N_FEATURES) -> float:
    """Training FLOPs per point (forward + backward = 3 x 2 x multiply-adds), mean head."""
    mean_head = sum(N_CLASSES.values()) / len(N_CLASSES)
    return 6.0 * (d * width + width * width + width * mean_head)


def n_batches(n: int, batch_size: int) -> int:
    """Batches per loader and epoch, the last one partial (padded or short)."""
    return -(-n // batch_size)


def epoch_plan(n: int, batch_size: int, epoch: int, seed: int = 0
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One epoch of the shuffled scheduler for a hand-written loop.

    Returns:
      (tasks [S] int: 0 = task_a, 1 = task_b; rows [S, batch_size] int32 row indices,
      the last batch of each task padded by repeating its own rows; mask [S, batch_size]
      bool, False on padding). S = 2 * n_batches(n, batch_size).
    """
    rng = np.random.default_rng((seed, epoch))
    nb = n_batches(n, batch_size)
    per_task_rows, per_task_mask = [], []
    for _ in TASKS:
        order = rng.permutation(n)
        padded = np.resize(order, nb * batch_size).astype(np.int32)
        per_task_rows.append(padded.reshape(nb, batch_size))
        per_task_mask.append((np.arange(nb * batch_size) < n).reshape(nb, batch_size))
    tasks = rng.permutation(np.repeat(np.arange(len(TASKS)), nb))
    cursor = [0] * len(TASKS)
    rows = np.empty((len(tasks), batch_size), np.int32)
    mask = np.empty((len(tasks), batch_size), bool)
    for step, task in enumerate(tasks):
        rows[step], mask[step] = per_task_rows[task][cursor[task]], per_task_mask[task][cursor[task]]
        cursor[task] += 1
    return tasks, rows, mask


def summarize(epoch_seconds: Sequence[float], points: int) -> dict[str, Any]:
    """Throughput statistics of measured epochs: median, best and worst points/s."""
    rates = [points / s for s in epoch_seconds]
    return {
        "epoch_seconds": [round(s, 4) for s in epoch_seconds],
        "points_per_epoch": points,
        "train_points_per_s": statistics.median(rates),
        "train_points_per_s_best": max(rates),
        "train_points_per_s_worst": min(rates),
    }


def timed(func: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of ``func()`` and its result."""
    start = time.perf_counter()
    result = func()
    return time.perf_counter() - start, result


def predict_stats(seconds: Sequence[float], points: int) -> dict[str, Any]:
    """Prediction throughput statistics (median and best of the timed calls)."""
    rates = [points / s for s in seconds]
    return {"predict_points_per_s": statistics.median(rates),
            "predict_points_per_s_best": max(rates), "predict_seconds": list(seconds)}


def train_accuracy(probs_a: np.ndarray, hard: np.ndarray) -> float:
    """Accuracy of task_a's argmax predictions on the training data (a sanity check)."""
    return float(np.mean(np.asarray(probs_a).argmax(axis=1) == np.asarray(hard)))


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB (``ru_maxrss`` is KiB on Linux)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / (1024.0 * 1024.0) if sys.platform == "darwin" else kib / 1024.0


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """Host facts recorded with every run: CPU, cores, load, Python."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "usable_cores": usable,
            "load_average": list(os.getloadavg()), "python": platform.python_version(),
            "platform": platform.platform()}


def child_main(name: str, run: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Entry point of an implementation's child process.

    Parses ``--spec`` (JSON: ``{"configs": [config, ...], "repeats": R, ...}``) and
    ``--out``; calls ``run(spec)`` and writes ``{"name", "peak_rss_mb", "wall_s", ...}``
    merged with its result to ``--out``. A missing dependency or a failure is written as
    ``{"skipped": reason}`` / ``{"error": traceback}`` instead, so the set still reports.
    """
    parser = argparse.ArgumentParser(description=f"benchmark child: {name}")
    parser.add_argument("--spec", required=True, help="JSON run specification")
    parser.add_argument("--out", required=True, help="path of the JSON result")
    args = parser.parse_args()
    spec = json.loads(args.spec)
    start = time.perf_counter()
    try:
        result = run(spec)
    except ImportError as error:
        result = {"skipped": f"{type(error).__name__}: {error}"}
    except Exception:  # noqa: BLE001 - reported, not raised: the other children still run
        result = {"error": traceback.format_exc()}
    result.update({"name": spec.get("name", name), "peak_rss_mb": peak_rss_mb(),
                   "wall_s": time.perf_counter() - start, "python": sys.executable})
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
