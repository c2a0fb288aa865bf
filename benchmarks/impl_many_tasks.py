"""One child of the many-task benchmark: T tasks, one implementation, one process.

The workload (``benchmarks/many_tasks.py`` runs it for several T):

- T tasks; task t has its own dataset of N = 1,024 rows of D = 64 standard-normal features
  (seed t) with hard labels ``x[:, t % 64] > 0``, and a 512-row valid set (seed 10,000 + t);
- body Dense(128)-ReLU-Dense(128)-ReLU shared by all tasks, head Dense(2) per task;
- batch 64, Adam 1e-3 (gradient clipping 1.0, the Trainers' default), the shuffled batch
  scheduler, 3 epochs; then ``score`` on every task's valid loader.

Implementations (``spec["impl"]``):

- ``jaxmtl``: ``jaxmtl.Trainer(...).fit`` then ``model.score``;
- ``snorkel``: Snorkel 0.10's ``Trainer`` and ``MultitaskClassifier`` (PyTorch eager);
- ``jax``: a hand-written loop: heads stacked to ``[T, 128, 2]``, one jitted
  ``step(state, x, y, task_id)`` picking the task's head by index (compiled once), a
  jitted evaluation per task likewise.

Measured: seconds from process spawn to the first step done (``first_step_s``: the batch
after the first step is being fetched; for jaxmtl, which reads one batch ahead, the second
after it) and to the end of the first epoch, steady training points/s over epochs 2..3,
the number of programs compiled (``jax.monitoring`` backend-compile events; JAX
implementations), the scores' mean accuracy. The runner adds the whole process's wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from benchmarks.workload import child_main

N_ROWS, N_VALID, N_FEATURES, WIDTH, BATCH_SIZE, LR, N_EPOCHS = 1024, 512, 64, 128, 64, 1e-3, 3


def task_data(task: int, rows: int, valid: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Task ``task``'s features ``[rows, 64]`` float32 and labels ``x[:, task % 64] > 0``."""
    rng = np.random.default_rng(10_000 + task if valid else task)
    X = rng.standard_normal((rows, N_FEATURES)).astype(np.float32)
    return X, (X[:, task % N_FEATURES] > 0).astype(np.int64)


class Clock:
    """Wall-clock stamps (``time.time()``) of epoch starts and of every batch drawn."""

    def __init__(self) -> None:
        self.epochs: list[float] = []
        self.batches: list[float] = []

    def wrap(self, get_batches: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        """``get_batches`` whose iterations are stamped."""
        def stamped(*args: Any, **kwargs: Any) -> Iterator[Any]:
            self.epochs.append(time.time())
            for item in get_batches(*args, **kwargs):
                self.batches.append(time.time())
                yield item
        return stamped


class CompileCounter:
    """Counts XLA compilations (loaded from a persistent cache or not) of this process."""

    def __init__(self) -> None:
        import jax

        self.count = 0

        def listener(event: str, duration: float, **kwargs: Any) -> None:
            if event == "/jax/core/compile/backend_compile_duration":
                self.count += 1

        jax.monitoring.register_event_duration_secs_listener(listener)


def summarize(clock: Clock, end: float, tasks: int, first_step_batch: int) -> dict[str, Any]:
    """Times from the clock's stamps; steady rate over epochs 2..N_EPOCHS."""
    steady_points = (N_EPOCHS - 1) * tasks * N_ROWS
    out: dict[str, Any] = {}
    if len(clock.batches) > first_step_batch:
        out["first_step_at"] = clock.batches[first_step_batch]
    if len(clock.epochs) == N_EPOCHS:
        out["first_epoch_end_at"] = clock.epochs[1]
        out["steady_s"] = end - clock.epochs[1]
        out["steady_points_per_s"] = steady_points / out["steady_s"]
        # Between the first and last batch drawn in epochs 2..N: the steps alone, without
        # the work a framework does between epochs (evaluation, logging, checks).
        inside = [stamp for stamp in clock.batches if stamp >= clock.epochs[1]]
        per_epoch = tasks * N_ROWS // BATCH_SIZE
        if len(inside) == (N_EPOCHS - 1) * per_epoch:
            spans = [inside[(e + 1) * per_epoch - 1] - inside[e * per_epoch]
                     for e in range(N_EPOCHS - 1)]
            out["in_epoch_points_per_s"] = (per_epoch - 1) * BATCH_SIZE * len(spans) / sum(spans)
    return out


def run_jaxmtl(tasks: int) -> dict[str, Any]:
    """jaxmtl Trainer.fit + score."""
    import flax.linen as nn
    import jax

    import jaxmtl
    from jaxmtl.training import trainer as trainer_module

    counter = CompileCounter()
    clock = Clock()
    original = trainer_module.make_batch_scheduler

    def make_stamped_scheduler(*args: Any, **kwargs: Any) -> Any:
        scheduler = original(*args, **kwargs)
        scheduler.get_batches = clock.wrap(scheduler.get_batches)
        return scheduler

    trainer_module.make_batch_scheduler = make_stamped_scheduler
    body = nn.Sequential([nn.Dense(WIDTH), nn.relu, nn.Dense(WIDTH), nn.relu])
    task_list, train, valid = [], [], []
    for t in range(tasks):
        name = f"task{t}"
        task_list.append(jaxmtl.Task(name, {"body": body, f"head{t}": nn.Dense(2)},
                                     [jaxmtl.Operation("body", [("_input_", "x")]),
                                      jaxmtl.Operation(f"head{t}", ["body"])]))
        for split, rows, loaders in (("train", N_ROWS, train), ("valid", N_VALID, valid)):
            X, Y = task_data(t, rows, valid=split == "valid")
            loaders.append(jaxmtl.DictDataLoader(
                jaxmtl.DictDataset(f"data{t}", split, {"x": X}, {name: Y}), BATCH_SIZE,
                shuffle=split == "train", seed=t))
    model = jaxmtl.MultitaskClassifier(task_list, seed=0)
    trainer = jaxmtl.Trainer(n_epochs=N_EPOCHS, lr=LR, optimizer="adam", seed=0,
                             batch_scheduler="shuffled", progress_bar=False)
    trainer.fit(model, train)
    jax.block_until_ready(trainer.state)
    end = time.time()
    compiles_fit = counter.count
    scores = model.score(valid)
    accuracy = float(np.mean([v for k, v in scores.items()
                              if k.startswith("task") and k.endswith("/accuracy")]))
    return {**summarize(clock, end, tasks, first_step_batch=2), "compiles_fit": compiles_fit,
            "compiles": counter.count, "valid_accuracy": accuracy,
            "versions": {"jax": jax.__version__, "jaxmtl": jaxmtl.__version__}}


def run_snorkel(tasks: int) -> dict[str, Any]:
    """Snorkel 0.10 Trainer.fit + score (PyTorch eager)."""
    import snorkel
    import torch
    from snorkel.classification import (
        DictDataLoader,
        DictDataset,
        MultitaskClassifier,
        Operation,
        Task,
        Trainer,
    )
    from torch import nn

    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(N_FEATURES, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH),
                         nn.ReLU())
    task_list, train, valid = [], [], []
    for t in range(tasks):
        name = f"task{t}"
        task_list.append(Task(name, nn.ModuleDict({"body": body, f"head{t}": nn.Linear(WIDTH, 2)}),
                              [Operation("body", [("_input_", "x")]),
                               Operation(f"head{t}", ["body"])]))
        for split, rows, loaders in (("train", N_ROWS, train), ("valid", N_VALID, valid)):
            X, Y = task_data(t, rows, valid=split == "valid")
            loaders.append(DictDataLoader(
                DictDataset(f"data{t}", split, {"x": torch.from_numpy(X)},
                            {name: torch.from_numpy(Y)}),
                batch_size=BATCH_SIZE, shuffle=split == "train"))
    model = MultitaskClassifier(task_list)
    trainer = Trainer(n_epochs=N_EPOCHS, lr=LR, optimizer="adam", batch_scheduler="shuffled",
                      progress_bar=False)
    clock = Clock()
    set_scheduler = trainer._set_batch_scheduler  # Snorkel builds its scheduler in fit

    def set_stamped_scheduler() -> None:
        set_scheduler()
        trainer.batch_scheduler.get_batches = clock.wrap(trainer.batch_scheduler.get_batches)

    trainer._set_batch_scheduler = set_stamped_scheduler
    trainer.fit(model, train)
    end = time.time()
    scores = model.score(valid)
    accuracy = float(np.mean([v for k, v in scores.items() if k.endswith("/accuracy")]))
    return {**summarize(clock, end, tasks, first_step_batch=1), "valid_accuracy": accuracy,
            "versions": {"snorkel": snorkel.__version__, "torch": torch.__version__}}


def run_jax(tasks: int) -> dict[str, Any]:
    """Hand-written loop: stacked heads, ``step(state, x, y, task_id)`` compiled once."""
    import math

    import jax
    import jax.numpy as jnp
    import optax

    counter = CompileCounter()
    keys = jax.random.split(jax.random.PRNGKey(0), 3)

    def dense(key: Any, fan_in: int, fan_out: int, stack: tuple[int, ...] = ()) -> dict:
        w = jax.random.normal(key, (*stack, fan_in, fan_out)) / math.sqrt(fan_in)
        return {"w": w, "b": jnp.zeros((*stack, fan_out))}

    params = {"body1": dense(keys[0], N_FEATURES, WIDTH), "body2": dense(keys[1], WIDTH, WIDTH),
              "heads": dense(keys[2], WIDTH, 2, (tasks,))}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(LR))

    def logits_of(params: dict, x: jax.Array, task_id: jax.Array) -> jax.Array:
        h = jax.nn.relu(x @ params["body1"]["w"] + params["body1"]["b"])
        h = jax.nn.relu(h @ params["body2"]["w"] + params["body2"]["b"])
        return h @ params["heads"]["w"][task_id] + params["heads"]["b"][task_id]

    def loss_fn(params: dict, x: jax.Array, y: jax.Array, task_id: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(
            logits_of(params, x, task_id), y).mean()

    @jax.jit
    def step(state: tuple, x: jax.Array, y: jax.Array, task_id: jax.Array) -> tuple:
        params, opt_state = state
        grads = jax.grad(loss_fn)(params, x, y, task_id)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def accuracy_of(params: dict, x: jax.Array, y: jax.Array, task_id: jax.Array) -> jax.Array:
        return (logits_of(params, x, task_id).argmax(-1) == y).mean()

    data = [task_data(t, N_ROWS) for t in range(tasks)]
    state = (params, tx.init(params))
    clock = Clock()
    per_task = N_ROWS // BATCH_SIZE

    def epoch_batches(epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.int32]]:
        rng = np.random.default_rng((0, epoch))
        orders = [rng.permutation(N_ROWS) for _ in range(tasks)]
        plan = np.repeat(np.arange(tasks), per_task)
        rng.shuffle(plan)  # the shuffled scheduler: every task's batches in random order
        seen = np.zeros(tasks, dtype=int)
        for t in plan:
            rows = orders[t][seen[t] * BATCH_SIZE:(seen[t] + 1) * BATCH_SIZE]
            seen[t] += 1
            yield data[t][0][rows], data[t][1][rows], np.int32(t)

    stamped = clock.wrap(epoch_batches)
    first = True
    for epoch in range(N_EPOCHS):
        for x, y, task_id in stamped(epoch):
            state = step(state, x, y, task_id)
            if first:
                jax.block_until_ready(state)
                clock.batches[0] = time.time()  # the first step done, compile included
                first = False
    jax.block_until_ready(state)
    end = time.time()
    compiles_fit = counter.count
    accuracy = float(np.mean([float(accuracy_of(state[0], *task_data(t, N_VALID, valid=True),
                                                np.int32(t))) for t in range(tasks)]))
    return {**summarize(clock, end, tasks, first_step_batch=0), "compiles_fit": compiles_fit,
            "compiles": counter.count, "valid_accuracy": accuracy,
            "versions": {"jax": jax.__version__, "optax": optax.__version__}}


IMPLEMENTATIONS = {"jaxmtl": run_jaxmtl, "snorkel": run_snorkel, "jax": run_jax}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs ``spec["impl"]`` for ``spec["tasks"]`` tasks; times relative to ``spawned_at``."""
    result = IMPLEMENTATIONS[spec["impl"]](int(spec["tasks"]))
    spawned = spec["spawned_at"]
    for name in ("first_step", "first_epoch_end"):
        if f"{name}_at" in result:
            result[f"{name}_s"] = result.pop(f"{name}_at") - spawned
    return result


if __name__ == "__main__":
    child_main("many_tasks", run)
