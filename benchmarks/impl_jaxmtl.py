"""jaxmtl ``Trainer.fit`` (default config, ``progress_bar=False``) on the reference workload.

How an epoch is timed (the Trainer builds a fresh jitted step in every ``fit`` call, so a
second ``fit`` recompiles and cannot serve as the "steady" epoch):

1. Primary: one ``fit(n_epochs=1 + R)`` on a fresh model. The batch scheduler the Trainer
   builds is wrapped so that each epoch's first batch request is time-stamped; epoch ``e``
   lasts from its stamp to the next one (the last epoch ends when ``fit`` has returned and
   ``trainer.state`` is ready). Epoch 0 is the warm-up; ``compile_s`` = epoch 0 (from the
   ``fit`` call) minus the median steady epoch, so it includes tracing, compiling and init.
   Being the first thing the process runs, it is "cold" (backend start-up and first
   tracing included), as the hand-written loops' warm-up epoch is.
2. Cross-checks, afterwards (so in a warm process): a fresh model and
   ``Trainer(n_epochs=1)``: ``fit`` once (``first_fit_s``), then ``fit`` again on the same
   model and trainer (``refit_s``: shows the recompile); a fresh ``fit(n_epochs=2)`` minus
   ``first_fit_s`` is the difference estimate of a steady epoch (``diff_epoch_s``).

With ``steps_per_call`` in the spec, ``TrainerConfig(steps_per_call=K)`` is passed through;
a config that rejects the key is reported as skipped.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.impl_jax import jax_info
from benchmarks.workload import (
    child_main,
    make_data,
    n_batches,
    predict_stats,
    summarize,
    timed,
    train_accuracy,
)


def build_model(config: dict[str, Any]) -> Any:
    """Two tasks sharing body Dense-ReLU-Dense-ReLU; head_a hard labels, head_b soft labels."""
    import flax.linen as nn

    import jaxmtl

    width = config["width"]
    body = nn.Sequential([nn.Dense(width), nn.relu, nn.Dense(width), nn.relu])

    def soft_loss(logits: Any, probs: Any) -> Any:
        return jaxmtl.cross_entropy_with_probs(logits, probs, reduction="none")

    tasks = [
        jaxmtl.Task("task_a", {"body": body, "head_a": nn.Dense(2)},
                    [jaxmtl.Operation("body", [("_input_", "x")]),
                     jaxmtl.Operation("head_a", ["body"])]),
        jaxmtl.Task("task_b", {"body": body, "head_b": nn.Dense(4)},
                    [jaxmtl.Operation("body", [("_input_", "x")]),
                     jaxmtl.Operation("head_b", ["body"])],
                    loss_func=soft_loss),
    ]
    return jaxmtl.MultitaskClassifier(tasks, seed=0)


def build_loaders(config: dict[str, Any]) -> tuple[list[Any], Any, np.ndarray]:
    """Train loaders (one per task, shuffled), a predict loader (both labels) and hard labels."""
    import jaxmtl

    X, hard, soft = make_data(config["n"], config["d"])
    bs = config["batch_size"]
    train = [
        jaxmtl.DictDataLoader(jaxmtl.DictDataset("synthetic_a", "train", {"x": X},
                                                 {"task_a": hard}), bs, shuffle=True, seed=0),
        jaxmtl.DictDataLoader(jaxmtl.DictDataset("synthetic_b", "train", {"x": X},
                                                 {"task_b": soft}), bs, shuffle=True, seed=1),
    ]
    both = jaxmtl.DictDataset("synthetic", "test", {"x": X}, {"task_a": hard, "task_b": soft})
    return train, jaxmtl.DictDataLoader(both, config["predict_batch"]), hard


class EpochClock:
    """Time-stamps the start of each epoch of ``Trainer.fit`` by wrapping its batch scheduler.

    ``install()`` replaces ``jaxmtl.training.trainer.make_batch_scheduler`` with a wrapper
    whose schedulers record ``time.perf_counter()`` when an epoch's first batch is asked
    for; ``uninstall()`` restores it. If a future Trainer stops calling that function,
    ``starts`` stays empty and the caller falls back to the difference method.
    """

    def __init__(self) -> None:
        self.starts: list[float] = []
        self._original: Callable | None = None

    def install(self) -> None:
        """Wraps the Trainer's scheduler factory (idempotent)."""
        from jaxmtl.training import trainer as trainer_module

        if self._original is not None or not hasattr(trainer_module, "make_batch_scheduler"):
            return
        self._original = original = trainer_module.make_batch_scheduler
        starts = self.starts

        def make_timed_scheduler(*args: Any, **kwargs: Any) -> Any:
            scheduler = original(*args, **kwargs)
            inner = scheduler.get_batches

            def get_batches(dataloaders: Any, epoch: int) -> Any:
                starts.append(time.perf_counter())
                yield from inner(dataloaders, epoch)

            scheduler.get_batches = get_batches
            return scheduler

        trainer_module.make_batch_scheduler = make_timed_scheduler

    def uninstall(self) -> None:
        """Restores the original scheduler factory."""
        from jaxmtl.training import trainer as trainer_module

        if self._original is not None:
            trainer_module.make_batch_scheduler = self._original
            self._original = None


def make_trainer(n_epochs: int, config: dict[str, Any], extra: dict[str, Any]) -> Any:
    """``jaxmtl.Trainer`` with the workload's settings (default config otherwise)."""
    import jaxmtl

    return jaxmtl.Trainer(n_epochs=n_epochs, lr=config["lr"], grad_clip=config["grad_clip"],
                          seed=0, progress_bar=False, **extra)


def timed_fit(n_epochs: int, config: dict[str, Any], extra: dict[str, Any],
              model: Any = None, trainer: Any = None) -> tuple[float, Any, Any]:
    """Seconds of one ``fit`` until ``trainer.state`` is ready; returns (s, model, trainer)."""
    import jax

    model = model if model is not None else build_model(config)
    trainer = trainer if trainer is not None else make_trainer(n_epochs, config, extra)
    loaders, _, _ = build_loaders(config)
    start = time.perf_counter()
    trainer.fit(model, loaders)
    jax.block_until_ready(trainer.state)
    return time.perf_counter() - start, model, trainer


def measure_predict(model: Any, config: dict[str, Any], repeats: int) -> dict[str, Any]:
    """``model.predict`` over a loader of both tasks' labels, batch ``predict_batch``."""
    _, loader, hard = build_loaders(config)
    out = model.predict(loader)  # compile
    seconds = [timed(lambda: model.predict(loader))[0] for _ in range(repeats)]
    return {**predict_stats(seconds, config["n"]),
            "task_a_train_accuracy": train_accuracy(out["probs"]["task_a"], hard)}


def run_config(config: dict[str, Any], repeats: int, extra: dict[str, Any],
               cross_check: bool, with_predict: bool) -> dict[str, Any]:
    """All measurements of one config (see the module docstring)."""
    import jax

    clock = EpochClock()
    clock.install()
    try:
        call = time.perf_counter()
        model = build_model(config)
        trainer = make_trainer(1 + repeats, config, extra)
        loaders, _, _ = build_loaders(config)
        trainer.fit(model, loaders)
        jax.block_until_ready(trainer.state)
        end = time.perf_counter()
    finally:
        clock.uninstall()
    total_s = end - call
    points = 2 * config["n"]
    result: dict[str, Any] = {"config": config, "fit_total_s": total_s,
                              "steps_per_epoch": 2 * n_batches(config["n"], config["batch_size"])}
    if len(clock.starts) == 1 + repeats:
        bounds = [*clock.starts, end]
        epochs = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        steady = epochs[1:]
        result.update(summarize(steady, points))
        result["timing_method"] = "epoch stamps inside one fit(n_epochs=1+R)"
        result["warmup_epoch_s"] = clock.starts[1] - call
        result["compile_s"] = result["warmup_epoch_s"] - statistics.median(steady)
    if cross_check or "train_points_per_s" not in result:
        first_s, model1, trainer1 = timed_fit(1, config, extra)
        refit_s, _, _ = timed_fit(1, config, extra, model=model1, trainer=trainer1)
        two_s, _, _ = timed_fit(2, config, extra)
        diff_epoch = two_s - first_s
        result.update({"first_fit_s": first_s, "refit_s": refit_s, "fit2_s": two_s,
                       "diff_epoch_s": diff_epoch, "diff_points_per_s": points / diff_epoch})
        if "train_points_per_s" not in result:
            result.update(summarize([diff_epoch], points))
            result["timing_method"] = "fit(n_epochs=2) - fit(n_epochs=1) on fresh models"
            result["compile_s"] = first_s - diff_epoch
        steady = statistics.median(result["epoch_seconds"])
        result["refit_overhead_s"] = refit_s - steady
    if with_predict:
        result.update(measure_predict(model, config, repeats))
    return result


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs every config of ``spec``; ``steps_per_call`` (optional) goes to TrainerConfig."""
    import jaxmtl

    extra: dict[str, Any] = {}
    if spec.get("steps_per_call"):
        extra["steps_per_call"] = int(spec["steps_per_call"])
        try:
            jaxmtl.TrainerConfig(**extra)
        except (TypeError, ValueError) as error:
            return {"skipped": f"TrainerConfig rejects steps_per_call: {error}",
                    "info": jax_info()}
    results = [run_config(config, spec["repeats"], extra,
                          cross_check=spec.get("cross_check", True),
                          with_predict=spec.get("predict", True))
               for config in spec["configs"]]
    return {"info": {**jax_info(), "jaxmtl": jaxmtl.__version__}, "results": results,
            "trainer_extra": extra}


if __name__ == "__main__":
    child_main("jaxmtl", run)
