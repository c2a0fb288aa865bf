"""Step time with and without the interference diagnostics (``log_task_gradients``).

Run: python -m benchmarks.diagnostics [--tasks 2 4] [--methods equal pcgrad]
         [--rounds 15] [--steps 20] [--hidden 64] [--features 32] [--out FILE.md]

Workload: a small MLP (shared body Dense(H)-ReLU-Dense(H)-ReLU on F features, H = 64 and
F = 32 by default; one Dense(2) head per task), the "mixed" schedule (one batch of 64 rows per task and step),
Adam, clip 1.0: the Trainer's own compiled step (``accumulate.fit_group_step``, the
diagnostics on when the accumulator carries them) on device-resident batches. After a
warm-up, each round times ``--steps`` steps without diagnostics and then ``--steps``
with them (interleaved, so a loaded machine slows both alike); the figures are the
medians over the rounds of ms per step, and their ratio. "equal" is the plain summed
loss (the Trainer's default), which has no per-task gradients: with diagnostics the step
computes them (one more backward pass per task). "pcgrad" has them already.
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

import jaxmtl
from jaxmtl import TrainerConfig, TrainState, build_graph, init_variables, make_optimizer
from jaxmtl.training.accumulate import fit_group_step, zero_loss_accumulator
from jaxmtl.training.balancers import balancer_for_tasks

BATCH = 64


def make_graph(n_tasks: int, hidden: int):
    """Tasks t0..t{n-1}: the shared body, then each its own head."""
    body = nn.Sequential([nn.Dense(hidden), nn.relu, nn.Dense(hidden), nn.relu])
    tasks = [jaxmtl.Task(f"t{i}", {"body": body, f"head{i}": nn.Dense(2)},
                         [jaxmtl.Operation("body", [("_input_", "x")]),
                          jaxmtl.Operation(f"head{i}", ["body"])])
             for i in range(n_tasks)]
    return build_graph(tasks)


def make_batches(n_tasks: int, features: int) -> tuple:
    """One batch per task (the "mixed" schedule), on the device."""
    rng = np.random.default_rng(0)
    batches = []
    for i in range(n_tasks):
        X = rng.standard_normal((BATCH, features)).astype(np.float32)
        Y = (X[:, i % features] > 0).astype(np.int32)
        batches.append(({"x": X}, {f"t{i}": Y}, np.ones(BATCH, bool)))
    return jax.device_put(tuple(batches))


def make_state(graph, method: str, batches: tuple) -> TrainState:
    task_modules = {name: {op.module_name for op in ops}
                    for name, ops in graph.op_sequences.items()}
    balancer = None if method == "equal" else balancer_for_tasks(method, {}, task_modules)
    variables = init_variables(graph, batches[0][0], jax.random.PRNGKey(0))
    tx = make_optimizer(TrainerConfig(lr=1e-3), 1e-3)
    return TrainState.create(variables, tx, jax.random.PRNGKey(0), balancer=balancer)


def time_method(method: str, n_tasks: int, rounds: int, steps: int, hidden: int = 64,
                features: int = 32) -> dict[str, float]:
    """Median ms per step without and with diagnostics, interleaved by rounds."""
    graph = make_graph(n_tasks, hidden)
    batches = make_batches(n_tasks, features)
    loader_indices = tuple(np.int32(i) for i in range(n_tasks))
    step = jax.jit(functools.partial(fit_group_step, graph), donate_argnums=(0, 1))
    carries = {on: (make_state(graph, method, batches),
                    zero_loss_accumulator(n_tasks, n_tasks, diagnostics=on))
               for on in (False, True)}

    def run(on: bool, n: int) -> float:
        state, accumulator = carries[on]
        start = time.perf_counter()
        for _ in range(n):
            state, accumulator = step(state, accumulator, batches, loader_indices)
        jax.block_until_ready((state, accumulator))
        carries[on] = (state, accumulator)
        return (time.perf_counter() - start) / n

    for on in (False, True):  # compile and warm up
        run(on, steps)
    times = {False: [], True: []}
    for _ in range(rounds):
        for on in (False, True):
            times[on].append(run(on, steps))
    off, on = (1e3 * statistics.median(times[flag]) for flag in (False, True))
    return {"off_ms": off, "on_ms": on, "ratio": on / off}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--methods", nargs="+", default=["equal", "pcgrad"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    lines = [
        "# Interference diagnostics: step time without and with `log_task_gradients`",
        "",
        f"- machine: {platform.processor() or platform.machine()}, jax.devices() = "
        f"{[str(d) for d in jax.devices()]}, jax {jax.__version__}",
        f"- workload: body Dense({args.hidden})-ReLU-Dense({args.hidden})-ReLU on "
        f"{args.features} "
        f"features, batch {BATCH} per task, 'mixed' schedule; median over {args.rounds} "
        f"interleaved rounds of {args.steps} steps (compile and warm-up excluded)",
        "",
        "| method | tasks | off: ms/step | on: ms/step | on / off |",
        "|---|---:|---:|---:|---:|",
    ]
    for method in args.methods:
        for n_tasks in args.tasks:
            row = time_method(method, n_tasks, args.rounds, args.steps, args.hidden,
                              args.features)
            lines.append(f"| {method} | {n_tasks} | {row['off_ms']:.3f} | {row['on_ms']:.3f} "
                         f"| {row['ratio']:.2f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
