"""Where the host time of jaxmtl's ``Trainer.fit`` loop goes, per step.

    .venv-bench/bin/python -m benchmarks.profile_jaxmtl [--epochs 3] [--top 25]

Three views of the steady epochs (epoch 0, with compilation, is never profiled):

1. ``cProfile`` over ``fit``'s epochs 1.., enabled and disabled by the same epoch-start
   wrapper of the batch scheduler as ``impl_jaxmtl``: functions by own time, per step. It
   inflates cheap Python calls, so read it for ranking, not absolute cost.
2. Host-only pipeline costs without any profiler: one epoch of the batch scheduler alone
   (loaders' shuffling, gathering and padding), ``batch.num_valid``, the label filter and
   ``LogManager.update``, in microseconds per step; and the same epoch's step calls made
   with the pipeline's batches prepared beforehand (dispatch + compute, no data work).
3. The wall time per step of a real epoch, for scale.

Writes ``benchmarks/results/profile.md`` and prints it.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.impl_jaxmtl import build_loaders, build_model, make_trainer
from benchmarks.runner import REPO_ROOT
from benchmarks.workload import default_config, n_batches


def profile_fit(config: dict[str, Any], epochs: int, top: int) -> tuple[str, float, int]:
    """cProfile of epochs 1.. of one ``fit``; returns (table, wall s per step, steps)."""
    import jax

    from jaxmtl.training import trainer as trainer_module

    profiler = cProfile.Profile()
    starts: list[float] = []
    original = trainer_module.make_batch_scheduler

    def make_profiled_scheduler(*args: Any, **kwargs: Any) -> Any:
        scheduler = original(*args, **kwargs)
        inner = scheduler.get_batches

        def get_batches(dataloaders: Any, epoch: int) -> Any:
            starts.append(time.perf_counter())
            if len(starts) == 2:
                profiler.enable()
            yield from inner(dataloaders, epoch)

        scheduler.get_batches = get_batches
        return scheduler

    trainer_module.make_batch_scheduler = make_profiled_scheduler
    try:
        model, trainer = build_model(config), make_trainer(epochs, config, {})
        loaders, _, _ = build_loaders(config)
        trainer.fit(model, loaders)
        jax.block_until_ready(trainer.state)
        profiler.disable()
        end = time.perf_counter()
    finally:
        trainer_module.make_batch_scheduler = original
    steps = (epochs - 1) * 2 * n_batches(config["n"], config["batch_size"])
    wall = (end - starts[1]) / steps
    return stats_table(profiler, steps, top, wall, "step"), wall, steps


def stats_table(profiler: cProfile.Profile, units: int, top: int, wall: float,
                unit: str) -> str:
    """Markdown table of the top functions by own time, per ``unit``.

    Time cProfile cannot attribute (C++ callables such as a jitted function, and frames
    entered before profiling began, e.g. ``fit`` itself) is shown as one "unattributed" row.
    """
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (filename, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():
        where = f"{Path(filename).name}:{line}({name})" if line else name
        rows.append((tottime, cumtime, calls, where))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    lines = [f"| function | own µs/{unit} | cumulative µs/{unit} | calls/{unit} | own share |",
             "|---|---:|---:|---:|---:|",
             f"| (unattributed: jitted calls and frames entered before profiling) | "
             f"{1e6 * (wall - total / units):.1f} | | | |"]
    for tottime, cumtime, calls, where in rows[:top]:
        lines.append(f"| `{where}` | {1e6 * tottime / units:.1f} | {1e6 * cumtime / units:.1f} "
                     f"| {calls / units:.2f} | {100 * tottime / total:.1f}% |")
    return "\n".join(lines)


def profile_predict(config: dict[str, Any], top: int, calls: int = 5) -> tuple[str, float]:
    """cProfile of ``model.predict`` (batch ``predict_batch``) on a trained-shape model."""
    model = build_model(config)
    loaders, predict_loader, _ = build_loaders(config)
    model.init(loaders[0].batch_at(loaders[0].order(0), 0)[0])
    model.predict(predict_loader)  # compile
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(calls):
        model.predict(predict_loader)
    profiler.disable()
    wall = (time.perf_counter() - start) / calls
    return stats_table(profiler, calls, top, wall, "predict call"), wall


COMPILE_FRAMES = ("pjit.py", "compiler.py", "interpreters", "linear_util", "lowering")


def pyspy_summary(config: dict[str, Any], top: int) -> str:
    """Line-level leaf frames of ``Trainer.fit`` from py-spy (sampling, low overhead).

    Runs ``impl_jaxmtl`` (fit with 1 + 3 epochs) under ``py-spy record --format raw``
    and keeps the samples inside ``Trainer.fit`` that are not tracing or compiling; a
    leaf at ``fit``'s own line means the thread was inside a C++ call made on that line
    (the jitted step: dispatch, or waiting on the device).
    """
    import json
    import shutil
    import subprocess
    import sys
    import tempfile

    py_spy = Path(sys.executable).parent / "py-spy"
    binary = str(py_spy) if py_spy.exists() else shutil.which("py-spy")
    if binary is None:
        return "(py-spy not installed: `.venv-bench/bin/pip install py-spy`)"
    spec = {"configs": [config], "repeats": 3, "cross_check": False, "predict": False}
    with tempfile.TemporaryDirectory() as tmp:
        raw, out = Path(tmp) / "raw.txt", Path(tmp) / "out.json"
        command = [binary, "record", "--nonblocking", "-r", "1000", "-f", "raw",
                   "-o", str(raw), "--",
                   sys.executable, "-m", "benchmarks.impl_jaxmtl", "--spec", json.dumps(spec),
                   "--out", str(out)]
        proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                              check=False)
        if not raw.exists() or not out.exists():
            return f"(py-spy failed: {proc.stderr.strip()[-500:]})"
        row = json.loads(out.read_text())["results"][0]
        per_step = 1e6 * statistics.median(row["epoch_seconds"]) / row["steps_per_epoch"]
        leaves: dict[str, int] = {}
        for line in raw.read_text().splitlines():
            stack, count = line.rsplit(" ", 1)
            frames = stack.split(";")
            if not any(f.startswith("Trainer.fit ") for f in frames) or any(
                    c in f for f in frames for c in COMPILE_FRAMES):
                continue
            leaves[frames[-1]] = leaves.get(frames[-1], 0) + int(count)
    total = sum(leaves.values())
    lines = ["| leaf frame (function (file:line)) | share of fit's samples | ≈ µs/step |",
             "|---|---:|---:|"]
    for frame, count in sorted(leaves.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| `{frame}` | {100 * count / total:.1f}% | {per_step * count / total:.1f} |")
    return (f"{total} samples at 1 kHz inside `Trainer.fit`, tracing/compiling excluded "
            f"(steady epoch: {per_step:.0f} µs/step):\n\n" + "\n".join(lines))


def pipeline_costs(config: dict[str, Any]) -> dict[str, float]:
    """Host-only costs per step (µs) of the Trainer's per-batch work, without a profiler."""
    from jaxmtl.training.batch_schedulers import make_batch_scheduler
    from jaxmtl.training.log_manager import LogManager

    loaders, _, _ = build_loaders(config)
    model = build_model(config)
    steps = sum(len(dl) for dl in loaders)
    scheduler = make_batch_scheduler("shuffled", 0)
    for dl in loaders:
        dl.set_epoch(1)
    start = time.perf_counter()
    batches = list(scheduler.get_batches(loaders, 1))
    data_us = 1e6 * (time.perf_counter() - start) / steps

    task_names = set(model.task_names)
    start = time.perf_counter()
    for batch, _ in batches:
        _ = {k: v for k, v in batch[1].items() if k in task_names}
        _ = batch.num_valid
    filter_us = 1e6 * (time.perf_counter() - start) / steps

    log_manager = LogManager(steps)
    start = time.perf_counter()
    for _ in batches:
        log_manager.update(64)
        log_manager.trigger_evaluation()
    log_us = 1e6 * (time.perf_counter() - start) / steps

    costs = {"scheduler + loaders (shuffle, gather, pad), per step": data_us,
             "label filter + batch.num_valid": filter_us,
             "LogManager.update + trigger_evaluation": log_us}
    costs.update(step_costs(config, model, loaders, batches))
    return costs


def step_costs(config: dict[str, Any], model: Any, loaders: list[Any],
               batches: list[Any]) -> dict[str, float]:
    """µs per step of jitted steps on batches prepared beforehand (dispatch + compute).

    Side by side, interleaved, best of 3 passes over one epoch's batches: jaxmtl's
    ``fit_step`` (what ``Trainer.fit`` calls), jaxmtl's bare ``train_step``, and the
    hand-written step of ``impl_jax``; plus XLA's cost analysis (FLOPs, bytes) of each.
    """
    import jax

    from benchmarks.impl_jax import _update, init_params, loss_a, loss_b, make_tx
    from jaxmtl.training.config import TrainerConfig
    from jaxmtl.training.step import TrainState, make_optimizer, train_step
    try:  # the library moves: fit_step lived in trainer.py, then in runners.py
        from jaxmtl.training.runners import fit_step
        from jaxmtl.training.runners import zero_loss_accumulator as _zero_loss_accumulator
    except ImportError:
        from jaxmtl.training.trainer import _zero_loss_accumulator, fit_step

    steps = len(batches)
    tx = make_optimizer(TrainerConfig(lr=config["lr"], grad_clip=config["grad_clip"]),
                        config["lr"])
    variables = model.ensure_variables(batches[0][0][0])
    index = {id(dl): i for i, dl in enumerate(loaders)}
    prepared = [(b[0], b[1], b.mask, index[id(dl)]) for b, dl in batches]
    graph = model.graph
    fit_jit = jax.jit(lambda s, a, x, y, m, i: fit_step(graph, s, a, x, y, m, i),
                      donate_argnums=(0, 1))
    train_jit = jax.jit(lambda s, x, y, m: train_step(graph, s, x, y, m)[0], donate_argnums=0)
    htx = make_tx(config)
    hand = {0: jax.jit(lambda c, x, y, m: _update(htx, loss_a, c, x, y, m), donate_argnums=0),
            1: jax.jit(lambda c, x, y, m: _update(htx, loss_b, c, x, y, m), donate_argnums=0)}

    def run_fit(carry: Any) -> Any:
        state, acc = carry
        for X, Y, mask, i in prepared:
            state, acc = fit_jit(state, acc, X, Y, mask, i)
        return state, acc

    def run_train(state: Any) -> Any:
        for X, Y, mask, _ in prepared:
            state = train_jit(state, X, Y, mask)
        return state

    def run_hand(carry: Any) -> Any:
        for X, Y, mask, i in prepared:
            carry = hand[i](carry, X["x"], Y["task_a" if i == 0 else "task_b"], mask)
        return carry

    def fresh_state() -> Any:
        return TrainState.create(jax.tree.map(lambda v: v.copy(), variables), tx,
                                 jax.random.PRNGKey(0))

    carries = {"jaxmtl fit_step (as Trainer.fit calls it)": (run_fit, (
                   fresh_state(), _zero_loss_accumulator(len(loaders), len(graph.task_names)))),
               "jaxmtl train_step (no loss accumulator)": (run_train, fresh_state()),
               "hand-written JAX step (impl_jax)": (run_hand, (
                   init_params(0, config["d"], config["width"]),
                   htx.init(init_params(0, config["d"], config["width"]))))}
    best = {name: float("inf") for name in carries}
    for attempt in range(4):  # attempt 0 compiles
        for name, (runner, carry) in carries.items():
            start = time.perf_counter()
            carry = jax.block_until_ready(runner(carry))
            if attempt:
                best[name] = min(best[name], 1e6 * (time.perf_counter() - start) / steps)
            carries[name] = (runner, carry)
    out = {f"{name}, dispatch + compute": value for name, value in best.items()}
    X, Y, mask, i = prepared[0]
    for name, lowered in (
        ("jaxmtl fit_step", fit_jit.lower(fresh_state(), _zero_loss_accumulator(
            len(loaders), len(graph.task_names)), X, Y, mask, i)),
        ("hand-written step", hand[i].lower(carries["hand-written JAX step (impl_jax)"][1],
                                             X["x"], Y["task_a" if i == 0 else "task_b"], mask)),
    ):
        cost = lowered.compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        out[f"{name}: XLA kFLOP per step (task {i})"] = cost.get("flops", float("nan")) / 1e3
        out[f"{name}: XLA kB accessed per step"] = cost.get("bytes accessed", float("nan")) / 1e3
    return out


def main() -> None:
    """Profiles and writes ``benchmarks/results/profile.md``."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="fit epochs (first not profiled)")
    parser.add_argument("--top", type=int, default=25, help="rows of the cProfile table")
    parser.add_argument("--no-py-spy", dest="py_spy", action="store_false",
                        help="skip the py-spy view")
    args = parser.parse_args()
    config = default_config()
    costs = pipeline_costs(config)
    table, wall_per_step, steps = profile_fit(config, args.epochs, args.top)
    predict_table, predict_wall = profile_predict(config, min(args.top, 12))
    lines = [
        "# Host-side profile of jaxmtl `Trainer.fit` (reference workload, default config)",
        "",
        "Host-only costs without a profiler, µs per step (one epoch of "
        f"{2 * n_batches(config['n'], config['batch_size'])} steps):",
        "",
        "| part | value |", "|---|---:|",
        *[f"| {name} | {value:,.1f} |" for name, value in costs.items()],
        "",
        f"cProfile over {steps} steady steps ({wall_per_step * 1e6:.0f} µs/step wall under the "
        "profiler), top functions by own time:",
        "",
        table,
        "",
        f"cProfile of `model.predict` over {config['n']:,} points, batch "
        f"{config['predict_batch']} ({predict_wall * 1e3:.1f} ms per call under the profiler):",
        "",
        predict_table,
        "",
        "py-spy (sampling profiler, no cProfile distortion; a leaf on `Trainer.fit`'s own "
        "line is time inside the C++ jitted-step call):",
        "",
        pyspy_summary(config, args.top) if args.py_spy else "(skipped: --no-py-spy)",
    ]
    text = "\n".join(lines) + "\n"
    out = REPO_ROOT / "benchmarks" / "results" / "profile.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
