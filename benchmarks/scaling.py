"""Scaling mode (``python -m benchmarks --scaling``): batch size and body width sweeps.

jaxmtl ``Trainer.fit`` vs the hand-written JAX loop vs the hand-written PyTorch loop, each
in one child process that runs every config. Sweeps: batch size 64..4096 at width 256, and
width 256..2048 at batch 64. To keep a run bounded, a config trains on at most
``FLOP_BUDGET`` FLOPs per epoch: wide bodies use a prefix of the reference data (fewer
points per epoch, never fewer than 4 batches per task).
"""

from __future__ import annotations

from typing import Any

from benchmarks.report import load_pyplot
from benchmarks.workload import N_PER_TASK, default_config, flops_per_point

BATCH_SIZES = (64, 256, 1024, 4096)
WIDTHS = (256, 512, 1024, 2048)
FLOP_BUDGET = 1.2e11  # per measured epoch, both tasks: ~1 s at this CPU's matmul peak
IMPL_KEYS = ("jaxmtl", "jax_numpy", "torch")


def points_per_task(width: int, batch_size: int) -> int:
    """Points per task of a config's epoch: the FLOP budget's worth, within [4 batches, N]."""
    budget_points = int(FLOP_BUDGET / (2 * flops_per_point(width)))
    return max(4 * batch_size, min(N_PER_TASK, budget_points))


def configs() -> list[dict[str, Any]]:
    """The sweep's configs: batch sizes at width 256, then wider bodies at batch 64."""
    out = []
    for batch_size in BATCH_SIZES:
        out.append({**default_config(), "batch_size": batch_size, "sweep": "batch",
                    "n": points_per_task(256, batch_size)})
    for width in WIDTHS[1:]:
        out.append({**default_config(), "width": width, "sweep": "width",
                    "n": points_per_task(width, 64)})
    return out


def _rates(run: dict[str, Any]) -> dict[str, list[float | None]]:
    """Implementation key -> best points/s per config (None where missing)."""
    n_configs = len(run["spec"]["configs"])
    rates: dict[str, list[float | None]] = {}
    for record in run["records"]:
        rows = record["result"].get("results") or []
        values = [row.get("train_points_per_s_best") for row in rows]
        rates[record["key"]] = values + [None] * (n_configs - len(values))
    return rates


def _fmt(value: float | None, spec: str = ",.0f") -> str:
    return "—" if value is None else f"{value:{spec}}"


def render_markdown(run: dict[str, Any]) -> str:
    """The sweep as a Markdown table (best epoch of each config)."""
    rates = _rates(run)
    machine = run["machine"]
    infos: dict[str, Any] = {}
    for record in run["records"]:
        infos.update(record["result"].get("info") or {})
    lines = [
        f"# jaxmtl scaling — {run['created']}",
        "",
        f"- machine: {machine['cpu_model']}, {machine['cpu_count']} cores; jax.devices(): "
        f"{infos.get('devices', '?')}; jax {infos.get('jax', '?')}, torch {infos.get('torch', '?')}",
        f"- best of {run['spec']['repeats']} epochs after a warm-up epoch; train points/s "
        "(both tasks); GFLOP/s = points/s x training FLOPs per point",
        "",
        "| sweep | batch | width | points/task | jaxmtl | hand-written JAX | hand-written torch "
        "| jaxmtl / JAX | jaxmtl / torch | jaxmtl GFLOP/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, config in enumerate(run["spec"]["configs"]):
        ours, jax_loop, torch_loop = (rates.get(k, [None] * (i + 1))[i] for k in IMPL_KEYS)
        ratio_jax = ours / jax_loop if ours and jax_loop else None
        ratio_torch = ours / torch_loop if ours and torch_loop else None
        gflops = ours * flops_per_point(config["width"]) / 1e9 if ours else None
        lines.append(
            f"| {config['sweep']} | {config['batch_size']} | {config['width']} | "
            f"{config['n']:,} | {_fmt(ours)} | {_fmt(jax_loop)} | {_fmt(torch_loop)} | "
            f"{_fmt(ratio_jax, '.2f')} | {_fmt(ratio_torch, '.2f')} | {_fmt(gflops, '.1f')} |"
        )
    for record in run["records"]:
        result = record["result"]
        if "skipped" in result or "error" in result:
            reason = result.get("skipped") or result["error"].strip().splitlines()[-1]
            lines.append(f"\n{record['key']}: {reason}")
        if record["foreign_load"] is not None:
            lines.append(f"\n{record['key']}: other load {record['foreign_load']:.2f} cores "
                         f"over its {record['child_wall_s']:.0f} s")
    return "\n".join(lines) + "\n"


def plot(run: dict[str, Any], path: str) -> str | None:
    """Throughput vs batch size and vs width, one line per implementation."""
    plt, skipped = load_pyplot()
    if plt is None:
        return skipped
    rates = _rates(run)
    configs_ = run["spec"]["configs"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, sweep, axis_key in ((axes[0], "batch", "batch_size"), (axes[1], "width", "width")):
        index = [i for i, c in enumerate(configs_) if c["sweep"] == sweep or
                 (sweep == "width" and c["sweep"] == "batch" and c["batch_size"] == 64)]
        for key, values in rates.items():
            points = [(configs_[i][axis_key], values[i]) for i in index if values[i]]
            if points:
                xs, ys = zip(*sorted(points), strict=True)
                ax.plot(xs, ys, marker="o", label=key)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(axis_key)
        ax.set_ylabel("train points/s (best epoch)")
        ax.set_title(f"{sweep} sweep" + (" (width 256)" if sweep == "batch" else " (batch 64)"))
        ax.legend()
    fig.suptitle(f"jaxmtl scaling {run['created']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
