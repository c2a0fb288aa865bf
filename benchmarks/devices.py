"""Device-scaling mode (``python -m benchmarks --devices``): jaxmtl over 1, 2, 4, 8 devices.

jaxmtl ``Trainer.fit`` on the reference workload with ``TrainerConfig(parallel="pmap")``
and ``parallel="sharded"``, the loaders' ``batch_size`` being the *global* batch (64 as in
the reference, and 512). Every (device count, mode) is its own child process
(``benchmarks/impl_devices.py``), whose device count is fixed before JAX starts:

- CPU backend: ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` for N = 1, 2, 4, 8.
  These "devices" are threads sharing the same cores, so the sweep measures the overhead
  and the correctness of the multi-device path, not a speed-up.
- GPU backend (``jax.default_backend() == "gpu"``): the real devices, N up to
  ``jax.device_count()`` (``CUDA_VISIBLE_DEVICES`` / ``HIP_VISIBLE_DEVICES`` = 0..N-1), no
  forced counts.

With one device both modes are ``"single"``, so N = 1 runs once and is the baseline of
both. Results go to ``devices.{md,json,png}``.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from benchmarks.report import load_pyplot
from benchmarks.runner import REPO_ROOT, Implementation
from benchmarks.workload import N_PER_TASK, default_config

DEVICE_COUNTS = (1, 2, 4, 8)
MODES = ("pmap", "sharded")
GLOBAL_BATCHES = (64, 512)
CPU_POINTS_PER_TASK = 10_000  # half the reference: 8 forced pmap devices are slow
FORCE_FLAG = "--xla_force_host_platform_device_count"
# A deadlocked XLA:CPU collective aborts after this many seconds (XLA's default: 40 s after
# a 20 s warning), so a hung child costs less; omitted if this jaxlib lacks the flag.
CPU_TIMEOUT_FLAGS = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=10",
                     "--xla_cpu_collective_call_terminate_timeout_seconds=30")
VISIBLE_DEVICE_VARS = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")


def _xla_flags_without_force(flags: str) -> str:
    """``XLA_FLAGS`` minus any forced host device count (the parent's own setting)."""
    return " ".join(f for f in flags.split() if not f.startswith(FORCE_FLAG))


def probe_backend(python: str) -> dict[str, Any]:
    """JAX's default backend, device count and devices, from a child without forced counts.

    ``cpu_timeout_flags`` says whether this jaxlib accepts ``CPU_TIMEOUT_FLAGS``.
    """
    base = _xla_flags_without_force(os.environ.get("XLA_FLAGS", ""))
    code = ("import json, jax; d = jax.devices(); print(json.dumps({'backend': "
            "jax.default_backend(), 'device_count': len(d), 'devices': [str(x) for x in d], "
            "'device_kind': d[0].device_kind}))")
    error: Exception | str = "no attempt"
    for timeouts in (True, False):
        flags = " ".join([base, *CPU_TIMEOUT_FLAGS]).strip() if timeouts else base
        try:
            proc = subprocess.run([python, "-c", code], cwd=REPO_ROOT, capture_output=True,
                                  env={**os.environ, "XLA_FLAGS": flags}, text=True,
                                  timeout=300, check=True)
            return {**json.loads(proc.stdout.strip().splitlines()[-1]),
                    "cpu_timeout_flags": timeouts}
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
            error = exc
    return {"backend": "cpu", "device_count": 1, "devices": [], "device_kind": "?",
            "cpu_timeout_flags": False, "probe_error": str(error)}


def device_counts(backend: dict[str, Any]) -> list[int]:
    """N = 1, 2, 4, 8 on a CPU (forced); on an accelerator the counts up to its devices."""
    if backend["backend"] == "cpu":
        return list(DEVICE_COUNTS)
    return [n for n in DEVICE_COUNTS if n <= backend["device_count"]]


def child_env(backend: dict[str, Any], n_devices: int) -> dict[str, str]:
    """Environment that makes the child's JAX see exactly ``n_devices`` devices."""
    flags = _xla_flags_without_force(os.environ.get("XLA_FLAGS", ""))
    if backend["backend"] == "cpu":
        timeouts = CPU_TIMEOUT_FLAGS if backend.get("cpu_timeout_flags") else ()
        return {"XLA_FLAGS": " ".join([flags, f"{FORCE_FLAG}={n_devices}", *timeouts]).strip()}
    visible = ",".join(str(i) for i in range(n_devices))
    return {"XLA_FLAGS": flags, **{var: visible for var in VISIBLE_DEVICE_VARS}}


def configs(backend: dict[str, Any]) -> list[dict[str, Any]]:
    """One config per global batch size (fewer points per task on a CPU)."""
    n = CPU_POINTS_PER_TASK if backend["backend"] == "cpu" else N_PER_TASK
    return [{**default_config(), "n": n, "batch_size": batch} for batch in GLOBAL_BATCHES]


def implementations(backend: dict[str, Any]) -> list[Implementation]:
    """The children: N = 1 once ("single"), then each N > 1 in each mode."""
    impls = []
    for n in device_counts(backend):
        for mode in (("single",) if n == 1 else MODES):
            impls.append(Implementation(
                f"{mode}_{n}", f"{n} device{'s' if n > 1 else ''}, parallel={mode!r}",
                "benchmarks.impl_devices", {"parallel": mode, "n_devices": n},
                env=child_env(backend, n)))
    return impls


def _rows(run: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per (child, config), with the x-1-device ratio filled in."""
    rows, base = [], {}
    for record in run["records"]:
        result = record["result"]
        spec = next(i for i in run["impls"] if i["key"] == record["key"])
        failed = result.get("skipped") or (_error_line(result["error"])
                                           if "error" in result else None)
        for i, config in enumerate(run["spec"]["configs"]):
            row = (result.get("results") or [None] * len(run["spec"]["configs"]))[i] or {}
            rows.append({"key": record["key"], "mode": spec["parallel"], "n": spec["n_devices"],
                         "batch": config["batch_size"], "load": record["foreign_load"],
                         "attempts": len(record.get("attempts", [])), "failed": failed, **row})
            if spec["n_devices"] == 1 and "train_points_per_s_best" in row:
                base[config["batch_size"]] = row["train_points_per_s_best"]
    for row in rows:
        rate, ref = row.get("train_points_per_s_best"), base.get(row["batch"])
        row["speedup"] = rate / ref if rate and ref else None
    return sorted(rows, key=lambda r: (r["batch"], r["mode"] != "single", r["mode"], r["n"]))


def _error_line(error: str) -> str:
    """A one-line summary of a child's error (XLA's collective timeout named as such)."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    for line in lines:
        if "Termination timeout" in line:
            return ("error: XLA:CPU collective deadlock (" + line.split("] ", 1)[-1][:150]
                    + "...)")
    return "error: " + (lines[-1][:200] if lines else "?")


def _fmt(value: Any, spec: str = ",.0f") -> str:
    return "—" if value is None else f"{value:{spec}}"


def render_markdown(run: dict[str, Any]) -> str:
    """The device sweep as a Markdown table, with the footnotes."""
    machine, backend, cfg = run["machine"], run["backend"], run["spec"]["configs"][0]
    cpu = backend["backend"] == "cpu"
    lines = [
        f"# jaxmtl device scaling — {run['created']}",
        "",
        f"- machine: {machine['cpu_model']}, {machine['cpu_count']} cores, load average at "
        f"start {', '.join(f'{x:.2f}' for x in machine['load_average'])}; code: commit "
        f"{machine.get('commit', '?')}" + (f" + uncommitted {', '.join(machine['jaxmtl_dirty'])}"
                                           if machine.get("jaxmtl_dirty") else ""),
        f"- backend {backend['backend']}, device kind {backend['device_kind']!r}; "
        + ("devices forced with `XLA_FLAGS=--xla_force_host_platform_device_count=N`"
           if cpu else f"real devices: {backend['devices']}"),
        f"- workload: reference model, N = {cfg['n']:,} points per task, global batch = the "
        f"loaders' batch_size, {run['spec']['repeats']} measured epochs after 1 warm-up",
        "",
        "| global batch | parallel | devices | per-device batch | train points/s (best) "
        "| median [worst] | × 1 device | compile / 1st-epoch overhead (s) | last-epoch train loss "
        "| params vs 1 device (rel. L2) | other load (cores) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in _rows(run):
        head = f"| {row['batch']} | {row['mode']} | {row['n']} |"
        if row["failed"] or "train_points_per_s_best" not in row:
            lines.append(f"{head} | {row['failed'] or 'no result'} | | | | | | "
                         f"{_fmt(row['load'], '.2f')} |")
            continue
        lines.append(
            f"{head} {row['per_device_batch']} | {row['train_points_per_s_best']:,.0f} "
            f"| {row['train_points_per_s']:,.0f} [{row['train_points_per_s_worst']:,.0f}] "
            f"| {_fmt(row['speedup'], '.2f')} | {row['compile_s']:.2f} "
            f"| {_fmt(row['final_train_loss'], '.4f')} "
            f"| {_fmt(row.get('param_rel_l2_vs_1'), '.1e')} | {_fmt(row['load'], '.2f')} |")
    crashed = [f"{r['key']} ({sum(bool(a.get('error')) for a in r['attempts'])} of "
               f"{len(r['attempts'])} attempts)" for r in run["records"]
               if any(a.get("error") for a in r.get("attempts", []))]
    lines += ["", "Notes:", ""]
    if cpu:
        lines.append(
            "- **CPU: the forced devices are not real devices.** All N of them are threads "
            f"sharing the same {machine['usable_cores']} cores, so more devices cannot be faster "
            "here: this table measures the overhead and the correctness of jaxmtl's "
            "multi-device path (splitting, padding, replication, cross-device reductions), "
            "not a speed-up. A speed-up can only be read on a machine with several real "
            "devices (the same command on a GPU host uses them).")
        lines.append(f"- Fewer points than the reference: {cfg['n']:,} per task instead of "
                     f"{N_PER_TASK:,} (8 forced pmap devices at batch 64 are slow); "
                     "throughput is per second, so it is comparable.")
    lines += [
        "- Train points/s = points of both tasks / seconds of one epoch, best of the measured "
        "epochs (median and worst beside); × 1 device = best over the 1-device best at the "
        "same global batch. With 1 device both modes run as `parallel=\"single\"`.",
        "- Correctness: the same seeds give the same batches at every N, so the last-epoch "
        "train loss should agree across rows of a global batch. Params vs 1 device = "
        "||p_N - p_1|| / ||p_1|| after training: float reordering only, but compounded over "
        "every step of Adam (whose update g/sqrt(v) amplifies differences in near-zero "
        "gradients), so 1e-3..1e-2 after hundreds of steps is expected; a real error shows "
        "as a different loss.",
        "- Other load = cores kept busy by other processes while the child ran; a child "
        "above `--max-other-load` is re-run (`--retries`), the least disturbed kept.",
    ]
    if crashed:
        lines.append("- Children that crashed (re-run up to `--retries` times; a crashed row "
                     "had no successful attempt): " + ", ".join(crashed)
                     + ". The crashes seen on this machine are XLA:CPU all-reduce rendezvous "
                     "timeouts in the train step (not all forced devices joined the "
                     "collective: a hang, not slowness), in both modes, more often on a quiet "
                     "machine; see the JSON's attempts and errors.")
    return "\n".join(lines) + "\n"


def plot(run: dict[str, Any], path: str) -> str | None:
    """Train points/s against device count, one line per (mode, global batch)."""
    plt, skipped = load_pyplot()
    if plt is None:
        return skipped
    rows = [r for r in _rows(run) if r.get("train_points_per_s_best")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for batch in sorted({r["batch"] for r in rows}):
        single = [r for r in rows if r["batch"] == batch and r["mode"] == "single"]
        for mode, style in (("pmap", "-o"), ("sharded", "--s")):
            points = sorted((r["n"], r["train_points_per_s_best"]) for r in rows
                            if r["batch"] == batch and r["mode"] in (mode, "single"))
            if len(points) > len(single):
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, style, label=f"{mode}, global batch {batch}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("devices" + (" (forced CPU devices, same cores)"
                               if run["backend"]["backend"] == "cpu" else ""))
    ax.set_ylabel("train points/s (best epoch)")
    ax.set_title(f"jaxmtl device scaling {run['created']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
