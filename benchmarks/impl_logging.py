"""Child of ``--logging-overhead``: jaxmtl ``Trainer.fit`` with or without logging.

One process per variant (``spec["variant"]``):

- ``reference``: the reference workload as ``--devices``/the main set run it: no valid
  split, default evaluation cadence (once an epoch, train losses only), no logging;
- ``no_log`` (run A): plus a valid split (``n_valid`` held-out points per task, one loader
  per task) and ``log_manager_config={"counter_unit": "batches", "evaluation_freq": 100}``,
  so the Trainer evaluates every 100 batches, but ``logging=False``;
- ``json`` (run B) / ``tensorboard`` (run C): run A with ``logging=True`` and that
  ``log_writer``, writing under a temporary ``log_dir`` (removed afterwards).

Each runs one ``fit(n_epochs=1 + R)`` on a fresh model, timed per epoch by
``impl_jaxmtl.EpochClock``; epoch 0 (tracing, compiling, the first evaluation's compile)
is the warm-up. The last epoch includes the writer's ``cleanup`` (``log.json`` is
written then), since ``fit`` returns after it.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks.impl_jax import jax_info
from benchmarks.impl_jaxmtl import EpochClock, build_loaders, build_model, make_trainer
from benchmarks.workload import N_PER_TASK, child_main, n_batches, summarize

VARIANTS = ("reference", "no_log", "json", "tensorboard")
EVALUATION_FREQ = 100  # batches


def make_valid_data(n_valid: int, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out points labelled by the workload's W: X [n, d], hard [n], soft [n, 4].

    W is drawn as ``workload.make_data`` draws it (after the 20,000 x d training features
    of seed 0); the valid features come from seed 1.
    """
    rng = np.random.default_rng(0)
    rng.standard_normal((N_PER_TASK, d), dtype=np.float32)
    W = rng.standard_normal((d, 4)).astype(np.float32)
    X = np.random.default_rng(1).standard_normal((n_valid, d), dtype=np.float32)
    logits = X @ W
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return X, (logits[:, 0] > 0).astype(np.int64), (z / z.sum(axis=1, keepdims=True)).astype(
        np.float32)


def valid_loaders(config: dict[str, Any], n_valid: int) -> list[Any]:
    """One valid-split loader per task (as the train loaders), batch ``predict_batch``."""
    import jaxmtl

    X, hard, soft = make_valid_data(n_valid, config["d"])
    bs = config["predict_batch"]
    return [
        jaxmtl.DictDataLoader(jaxmtl.DictDataset("synthetic_a", "valid", {"x": X},
                                                 {"task_a": hard}), bs),
        jaxmtl.DictDataLoader(jaxmtl.DictDataset("synthetic_b", "valid", {"x": X},
                                                 {"task_b": soft}), bs),
    ]


def trainer_extra(variant: str, log_dir: str) -> dict[str, Any]:
    """TrainerConfig fields of a variant (on top of the workload's lr, clip, seed)."""
    if variant == "reference":
        return {}
    extra: dict[str, Any] = {"log_manager_config": {"counter_unit": "batches",
                                                    "evaluation_freq": EVALUATION_FREQ}}
    if variant != "no_log":
        extra.update(logging=True, log_writer=variant,
                     log_writer_config={"log_dir": log_dir, "run_name": variant})
    return extra


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


def run_variant(config: dict[str, Any], repeats: int, variant: str, n_valid: int
                ) -> dict[str, Any]:
    """One timed ``fit(n_epochs=1 + repeats)`` of ``variant`` (see the module docstring)."""
    import jax

    with tempfile.TemporaryDirectory(prefix="jaxmtl-bench-logs-") as log_dir:
        model = build_model(config)
        trainer = make_trainer(1 + repeats, config, trainer_extra(variant, log_dir))
        loaders, _, _ = build_loaders(config)
        if variant != "reference":
            loaders += valid_loaders(config, n_valid)
        clock = EpochClock()
        clock.install()
        try:
            call = time.perf_counter()
            trainer.fit(model, loaders)
            jax.block_until_ready(trainer.state)
            end = time.perf_counter()
        finally:
            clock.uninstall()
        written = _dir_bytes(log_dir)
        files = sorted(os.path.relpath(os.path.join(root, name), log_dir)
                       for root, _, names in os.walk(log_dir) for name in names)
    if len(clock.starts) != 1 + repeats:
        raise RuntimeError(f"EpochClock saw {len(clock.starts)} epochs, expected {1 + repeats}")
    bounds = [*clock.starts, end]
    epochs = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    steps = 2 * n_batches(config["n"], config["batch_size"])
    evals = 0 if variant == "reference" else (
        (1 + repeats) * steps // EVALUATION_FREQ - steps // EVALUATION_FREQ)
    return {"config": config, "variant": variant, **summarize(epochs[1:], 2 * config["n"]),
            "epoch_s_median": statistics.median(epochs[1:]), "epoch_s_best": min(epochs[1:]),
            "measured_s_total": sum(epochs[1:]), "warmup_epoch_s": clock.starts[1] - call,
            "steps_per_epoch": steps, "evaluations_in_measured_epochs": evals,
            "n_valid_per_task": 0 if variant == "reference" else n_valid,
            "log_bytes": written, "log_files": files,
            "valid_metrics": {k: v for k, v in trainer.metrics.items() if "/valid/" in k}}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs ``spec["variant"]`` on every config of ``spec``."""
    import jaxmtl

    variant = spec["variant"]
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if variant == "tensorboard":
        import tensorboardX  # noqa: F401 - a missing writer is reported as skipped
    results = [run_variant(config, spec["repeats"], variant, spec.get("n_valid", 2000))
               for config in spec["configs"]]
    return {"info": {**jax_info(), "jaxmtl": jaxmtl.__version__}, "results": results}


if __name__ == "__main__":
    child_main("logging", run)
