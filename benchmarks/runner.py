"""Runs each implementation in its own child process and collects the JSON results.

One process per implementation keeps imports, thread pools and peak RSS separate. The
JAX children run on ``--python`` (default: this interpreter); the PyTorch/Snorkel ones on
``--torch-python`` (default: this interpreter if it has torch, else ``.venv-bench``).
Around each child the runner reads ``/proc/stat`` to estimate how many cores *other*
processes kept busy meanwhile (``foreign_load``): the noise indicator of the report.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_VENV_PYTHON = REPO_ROOT / ".venv-bench" / "bin" / "python"


@dataclass(frozen=True)
class Implementation:
    """One row of the benchmark: a child module, its spec extras and its interpreter kind."""

    key: str
    label: str
    module: str
    extra: dict[str, Any] = field(default_factory=dict)
    needs_torch: bool = False
    env: dict[str, str] = field(default_factory=dict)  # set in the child's environment


SNORKEL = Implementation("snorkel", "Snorkel 0.10 MultitaskClassifier + Trainer (PyTorch eager)",
                         "benchmarks.impl_snorkel", needs_torch=True)
TORCH = Implementation("torch", "hand-written PyTorch loop", "benchmarks.impl_torch",
                       needs_torch=True)
JAX_NUMPY = Implementation("jax_numpy", "hand-written jitted JAX/optax loop, numpy batches",
                           "benchmarks.impl_jax", {"variant": "numpy"})
JAX_SCAN = Implementation("jax_scan", "same JAX loop, data on device, lax.scan per epoch",
                          "benchmarks.impl_jax", {"variant": "scan"})
# jaxmtl's children run cold (JAXMTL_COMPILATION_CACHE=0): the compile overhead is a first
# run's, comparable with the hand-written loops', whatever an earlier run left in the cache.
COLD = {"JAXMTL_COMPILATION_CACHE": "0"}
JAXMTL = Implementation("jaxmtl", "jaxmtl Trainer.fit (default config)", "benchmarks.impl_jaxmtl",
                        env=COLD)


def jaxmtl_fused(steps_per_call: int) -> Implementation:
    """jaxmtl with ``TrainerConfig(steps_per_call=K)`` (the opt-in fused mode)."""
    return Implementation(f"jaxmtl_k{steps_per_call}",
                          f"jaxmtl Trainer.fit, steps_per_call={steps_per_call}",
                          "benchmarks.impl_jaxmtl", {"steps_per_call": steps_per_call},
                          env=COLD)


def default_torch_python() -> str:
    """This interpreter if it can import torch, else ``.venv-bench/bin/python`` if present."""
    if importlib.util.find_spec("torch") is not None or not BENCH_VENV_PYTHON.exists():
        return sys.executable
    return str(BENCH_VENV_PYTHON)


def git_state() -> dict[str, Any]:
    """The measured code: HEAD commit and the uncommitted files under ``jaxmtl/`` (read-only)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True,
                                  text=True, check=False, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    # Porcelain lines are "XY path": the status columns must not be stripped.
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "jaxmtl").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or "unknown",
            "jaxmtl_dirty": dirty}


def _busy_seconds() -> float | None:
    """Busy CPU seconds of the whole machine since boot (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_child(impl: Implementation, spec: dict[str, Any], python: str,
              timeout_s: float = 900.0) -> dict[str, Any]:
    """Runs one implementation's child; returns its JSON plus timing and load facts.

    A child that fails to start, crashes or times out yields ``{"error": ...}``; one whose
    dependencies are missing yields ``{"skipped": ...}`` (written by the child).
    ``impl.env`` is set in the child's environment (e.g. ``XLA_FLAGS``, read when JAX starts).
    """
    full_spec = {**spec, **impl.extra, "name": impl.key}
    with tempfile.TemporaryDirectory(prefix="jaxmtl-bench-") as tmp:
        out = Path(tmp) / "result.json"
        command = [python, "-m", impl.module, "--spec", json.dumps(full_spec), "--out", str(out)]
        busy0, cpu0, start = _busy_seconds(), _children_cpu_seconds(), time.perf_counter()
        try:
            proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=timeout_s, check=False,
                                  env={**os.environ, **impl.env} if impl.env else None)
            stderr, returncode = proc.stderr, proc.returncode
        except subprocess.TimeoutExpired:
            stderr, returncode = f"timed out after {timeout_s} s", -1
        wall = time.perf_counter() - start
        busy1, cpu1 = _busy_seconds(), _children_cpu_seconds()
        if out.exists():
            result = json.loads(out.read_text())
        else:
            # Native stack frames ("    @ 0x...") would push the message out of the tail.
            message = "\n".join(line for line in stderr.splitlines()
                                if not line.lstrip().startswith("@ "))
            result = {"error": f"child exited {returncode} without a result:\n{message[-3000:]}"}
    foreign = None
    if busy0 is not None and busy1 is not None and wall > 0:
        foreign = max(0.0, ((busy1 - busy0) - (cpu1 - cpu0)) / wall)
    return {"key": impl.key, "label": impl.label, "python": python, "child_wall_s": wall,
            "foreign_load": foreign, "result": result}


def _best_rate(record: dict[str, Any]) -> float | None:
    rows = record["result"].get("results") or []
    return rows[0].get("train_points_per_s_best") if rows else None


def run_set(impls: list[Implementation], spec: dict[str, Any], python: str,
            torch_python: str, max_other_load: float = 0.35, retries: int = 2,
            log: Any = print, retry_errors: bool = False) -> list[dict[str, Any]]:
    """Runs the implementations one after another (never in parallel: 2 cores).

    A child during which other processes kept more than ``max_other_load`` cores busy is
    run again, up to ``retries`` more times (after a pause); the attempt with the least
    other load is kept and every attempt's load and best rate are recorded in
    ``record["attempts"]``. With ``retry_errors``, a child that crashed is run again too
    (within the same ``retries``), and a successful attempt is kept over a crashed one.
    """
    records = []
    for impl in impls:
        interpreter = torch_python if impl.needs_torch else python
        log(f"[benchmarks] {impl.key}: {impl.label} ({interpreter}) ...")
        attempts: list[dict[str, Any]] = []
        for attempt in range(1 + retries):
            if attempt:
                time.sleep(5.0)
            record = run_child(impl, spec, interpreter)
            result = record["result"]
            load = record["foreign_load"]
            status = ("skipped: " + result["skipped"]) if "skipped" in result else (
                "ERROR" if "error" in result else "ok")
            log(f"[benchmarks]   {status}, {record['child_wall_s']:.1f} s"
                + (f", other load {load:.2f} cores" if load is not None else ""))
            if "error" in result:
                log(result["error"])
            attempts.append(record)
            if status == "ERROR" and retry_errors:
                if attempt < retries:
                    log("[benchmarks]   the child crashed: running it again")
                continue
            if status != "ok" or load is None or load <= max_other_load:
                break
            if attempt < retries:
                log(f"[benchmarks]   other load above {max_other_load} cores: measuring again")
        kept = min(attempts, key=lambda r: ("error" in r["result"], r["foreign_load"] or 0.0))
        kept["attempts"] = [{"foreign_load": r["foreign_load"], "best_points_per_s": _best_rate(r),
                             "error": "error" in r["result"]} for r in attempts]
        records.append(kept)
    return records
