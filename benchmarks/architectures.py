"""Step time of each ``jaxmtl.modules`` architecture relative to a hard-shared body.

Run: python -m benchmarks.architectures [--tasks 2 8] [--steps 200] [--repeats 3]

D = 128 inputs, batch 64 rows carrying every task's label, Adam 1e-3, one jitted
``jaxmtl.train_step`` (the pure core, buffers donated), Dense(2) head per task. Bodies of
similar size: 256 units per layer in total, two layers deep.

- shared: ``SharedBottom(features=(256, 256))`` (hard parameter sharing, the reference)
- mmoe: ``MMoE(num_experts=4, expert_features=(64, 64))``
- cgc: ``CGC(num_shared_experts=2, num_task_experts=1, expert_features=(64, 64))``
- ple: ``PLE(num_levels=2, num_shared_experts=2, num_task_experts=1, expert_features=(64,))``
- cross_stitch: ``CrossStitch(features=(128, 128))`` (one 128-wide tower per task)
- dselect_k: ``DSelectK(num_experts=4, k=2, expert_features=(64, 64))``

Per architecture: a warm-up call (compile), then ``repeats`` rounds of ``steps`` steps,
interleaved over the architectures; the fastest round is reported (the least disturbed by
other load) with its ratio to ``shared``.
"""

from __future__ import annotations

import argparse
import functools
import time

import flax.linen as nn
import jax
import numpy as np
import optax

import jaxmtl
from jaxmtl import modules

BODIES = {
    "shared": lambda t: modules.SharedBottom(t, features=(256, 256)),
    "mmoe": lambda t: modules.MMoE(t, num_experts=4, expert_features=(64, 64)),
    "cgc": lambda t: modules.CGC(t, num_shared_experts=2, num_task_experts=1,
                                 expert_features=(64, 64)),
    "ple": lambda t: modules.PLE(t, num_levels=2, num_shared_experts=2, num_task_experts=1,
                                 expert_features=(64,)),
    "cross_stitch": lambda t: modules.CrossStitch(t, features=(128, 128)),
    "dselect_k": lambda t: modules.DSelectK(t, num_experts=4, k=2, expert_features=(64, 64)),
}


def make_step(name: str, n_tasks: int, batch: int = 64, d: int = 128):
    """A compiled, warmed-up train step for one architecture, and its body's parameter count.

    Returns:
      (run, params): ``run(steps)`` trains ``steps`` steps and returns seconds per step.
    """
    task_names = tuple(f"t{i}" for i in range(n_tasks))
    body = BODIES[name](task_names)
    tasks = [jaxmtl.Task(t, {"body": body, f"head_{t}": nn.Dense(2)},
                         [jaxmtl.Operation("body", [("_input_", "x")]),
                          jaxmtl.Operation(f"head_{t}", [("body", t)])])
             for t in task_names]
    rng = np.random.default_rng(0)
    X = {"x": rng.standard_normal((batch, d)).astype(np.float32)}
    Y = {t: rng.integers(0, 2, batch) for t in task_names}
    graph = jaxmtl.build_graph(tasks)
    variables = jaxmtl.init_variables(graph, X, jax.random.PRNGKey(0))
    params = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]["body"]))
    step = jax.jit(functools.partial(jaxmtl.train_step, graph), donate_argnums=0)
    batch_args = jax.device_put((X, Y, np.ones(batch, bool)))
    holder = [jaxmtl.TrainState.create(variables, optax.adam(1e-3), jax.random.PRNGKey(0))]

    def run(steps: int) -> float:
        state = holder[0]
        start = time.perf_counter()
        for _ in range(steps):
            state, _ = step(state, *batch_args)
        jax.block_until_ready(state)
        holder[0] = state
        return (time.perf_counter() - start) / steps

    run(1)  # compile
    return run, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; fastest of {args.repeats} "
          f"interleaved rounds of {args.steps} steps")
    print("| architecture | T | body parameters | ms / step | x shared |")
    print("|---|---:|---:|---:|---:|")
    for n_tasks in args.tasks:
        steps = {name: make_step(name, n_tasks) for name in BODIES}
        best = {name: float("inf") for name in BODIES}
        for _ in range(args.repeats):  # interleaved, so a burst of load hits every body
            for name, (run, _) in steps.items():
                best[name] = min(best[name], run(args.steps))
        for name, (_, params) in steps.items():
            print(f"| {name} | {n_tasks} | {params:,} | {1e3 * best[name]:.3f} | "
                  f"{best[name] / best['shared']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
