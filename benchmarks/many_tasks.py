"""The many-task workload: start-up, compile count and throughput as the task count grows.

``python -m benchmarks --tasks 2,8,32,64`` runs, for each T, one process each of jaxmtl,
Snorkel 0.10 and a hand-written JAX loop (see ``impl_many_tasks.py`` for the workload and
what is measured) and writes ``benchmarks/results/many_tasks.{md,json,png}``.

jaxmtl's child runs with ``JAXMTL_COMPILATION_CACHE=0``: every run is a cold first run, as
the hand-written loop's is.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.report import load_pyplot
from benchmarks.runner import Implementation, run_child

IMPLEMENTATIONS = (
    Implementation("jaxmtl", "jaxmtl Trainer.fit + score", "benchmarks.impl_many_tasks",
                   {"impl": "jaxmtl"}, env={"JAXMTL_COMPILATION_CACHE": "0"}),
    Implementation("snorkel", "Snorkel 0.10 Trainer.fit + score (PyTorch eager)",
                   "benchmarks.impl_many_tasks", {"impl": "snorkel"}, needs_torch=True),
    Implementation("jax", "hand-written JAX loop, stacked heads, one step program",
                   "benchmarks.impl_many_tasks", {"impl": "jax"}),
)


def parse_tasks(text: str) -> list[int]:
    """``"2,8,32"`` -> ``[2, 8, 32]``; each count must be an integer >= 1."""
    counts = []
    for part in text.split(","):
        try:
            count = int(part)
        except ValueError:
            count = 0
        if count < 1:
            raise ValueError(f"--tasks: expected comma-separated integers >= 1, got {part!r}")
        counts.append(count)
    return counts


def run(task_counts: list[int], python: str, torch_python: str, only: str = "",
        log: Any = print) -> list[dict[str, Any]]:
    """One child per (T, implementation), one after another; returns their records."""
    keys = {k.strip() for k in only.split(",") if k.strip()}
    impls = [impl for impl in IMPLEMENTATIONS if not keys or impl.key in keys]
    records = []
    for tasks in task_counts:
        for impl in impls:
            interpreter = torch_python if impl.needs_torch else python
            log(f"[benchmarks] T={tasks} {impl.key} ({interpreter}) ...")
            spec = {"tasks": tasks, "spawned_at": time.time()}
            record = run_child(impl, spec, interpreter)
            record["tasks"] = tasks
            result = record["result"]
            status = ("skipped: " + result["skipped"]) if "skipped" in result else (
                "ERROR\n" + result["error"] if "error" in result else "ok")
            log(f"[benchmarks]   {status}, {record['child_wall_s']:.1f} s")
            records.append(record)
    return records


def _cell(value: Any, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def render_markdown(run_record: dict[str, Any]) -> str:
    """The table: one row per (T, implementation)."""
    machine = run_record["machine"]
    lines = [
        f"# Many-task benchmark ({run_record['created']})",
        "",
        f"{machine.get('cpu_model', '?')}, {machine.get('usable_cores', '?')} cores; commit "
        f"{machine.get('commit', '?')}. T tasks × 1,024 rows × 64 features, body "
        "Dense(128)-ReLU-Dense(128)-ReLU, head Dense(2) per task, batch 64, Adam 1e-3, "
        "shuffled scheduler, 3 epochs, then score on 512 valid rows per task. One process "
        "per row; times from process spawn.",
        "",
        "| T | implementation | first step s | first epoch done s | whole script s "
        "| steady points/s | in-epoch points/s | programs compiled (fit / all) | valid accuracy "
        "| other load |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for record in run_record["records"]:
        result = record["result"]
        if "skipped" in result or "error" in result:
            what = "skipped" if "skipped" in result else "error"
            lines.append(f"| {record['tasks']} | {record['key']} | {what} | | | | | | | |")
            continue
        compiles = ("–" if "compiles" not in result
                    else f"{result['compiles_fit']} / {result['compiles']}")
        lines.append(
            f"| {record['tasks']} | {record['key']} | {_cell(result.get('first_step_s'), '.2f')} "
            f"| {_cell(result.get('first_epoch_end_s'), '.2f')} | {record['child_wall_s']:.2f} "
            f"| {_cell(result.get('steady_points_per_s'), ',.0f')} "
            f"| {_cell(result.get('in_epoch_points_per_s'), ',.0f')} | {compiles} "
            f"| {_cell(result.get('valid_accuracy'), '.3f')} "
            f"| {_cell(record.get('foreign_load'), '.2f')} |")
    lines += [
        "",
        "First step: the step's result exists (hand-written JAX) or the batch after it is being "
        "fetched (Snorkel; jaxmtl reads one batch ahead, so the second after it). Steady "
        "points/s: epochs 2-3 (all compiles done in epoch 1), from the start of epoch 2 to the "
        "end of training; in-epoch: between the first and last batch drawn in each of "
        "epochs 2-3, without the work between epochs (evaluation, logging). Programs compiled: "
        "`jax.monitoring` backend-compile events, in `fit` / in the whole script (score "
        "included); Snorkel compiles nothing. Other load: cores kept busy by other processes "
        "meanwhile.",
    ]
    return "\n".join(lines) + "\n"


def plot(run_record: dict[str, Any], path: str) -> str | None:
    """Whole-script seconds and compiled programs against T, one line per implementation."""
    plt, skipped = load_pyplot()
    if plt is None:
        return skipped
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl in IMPLEMENTATIONS:
        rows = [r for r in run_record["records"] if r["key"] == impl.key
                and "error" not in r["result"] and "skipped" not in r["result"]]
        if not rows:
            continue
        ts = [r["tasks"] for r in rows]
        axes[0].plot(ts, [r["child_wall_s"] for r in rows], marker="o", label=impl.key)
        if all("compiles" in r["result"] for r in rows):
            axes[1].plot(ts, [r["result"]["compiles"] for r in rows], marker="o",
                         label=impl.key)
    for ax, label in ((axes[0], "whole script seconds"), (axes[1], "programs compiled")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tasks T")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"many-task benchmark {run_record['created']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
