"""Logging-overhead mode (``python -m benchmarks --logging-overhead``).

The reference workload through jaxmtl ``Trainer.fit``, one child process per variant
(``benchmarks/impl_logging.py``):

- A0 ``reference``: no valid split, no logging (the main set's jaxmtl row);
- A ``no_log``: a valid split of 2,000 held-out points per task and evaluation every 100
  batches (``log_manager_config={"counter_unit": "batches", "evaluation_freq": 100}``),
  ``logging=False``;
- B ``json``: A with ``logging=True, log_writer="json"``;
- C ``tensorboard``: A with ``logging=True, log_writer="tensorboard"``.

The overhead of logging is B (C) over A: the same evaluations, plus writing the scalars
(target: within 5 %). A over A0 is the cost of the evaluations themselves (forward passes
over the valid split, the host reads of the state and the loss accumulator), shown for
information. Results go to ``logging.{md,json,png}``.
"""

from __future__ import annotations

from typing import Any

from benchmarks.impl_logging import EVALUATION_FREQ
from benchmarks.report import load_pyplot
from benchmarks.runner import Implementation

N_VALID = 2_000
TARGET_PERCENT = 5.0
LABELS = {
    "reference": "A0: no valid split, no logging (reference)",
    "no_log": f"A: valid split, evaluation every {EVALUATION_FREQ} batches, logging=False",
    "json": "B: A + logging=True, log_writer='json'",
    "tensorboard": "C: A + logging=True, log_writer='tensorboard'",
}


def implementations() -> list[Implementation]:
    """The four variants' children, A first (the base of the overheads)."""
    return [Implementation(f"log_{variant}", label, "benchmarks.impl_logging",
                           {"variant": variant, "n_valid": N_VALID})
            for variant, label in LABELS.items()]


def _row(record: dict[str, Any]) -> dict[str, Any] | None:
    rows = record["result"].get("results") or []
    return rows[0] if rows else None


def _overhead(row: dict[str, Any] | None, base: dict[str, Any] | None, key: str
              ) -> float | None:
    if row is None or base is None:
        return None
    return 100.0 * (row[key] / base[key] - 1.0)


def _fmt(value: float | None, spec: str = ".3f", suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def overheads(run: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per variant: overhead % over A (all measured epochs, median, best epoch) and A0."""
    rows = {r["key"]: _row(r) for r in run["records"]}
    base, ref = rows.get("log_no_log"), rows.get("log_reference")
    return {key: {"vs_A_total": _overhead(row, base, "measured_s_total"),
                  "vs_A_median": _overhead(row, base, "epoch_s_median"),
                  "vs_A_best": _overhead(row, base, "epoch_s_best"),
                  "vs_A0_median": _overhead(row, ref, "epoch_s_median"),
                  "vs_A0_best": _overhead(row, ref, "epoch_s_best")}
            for key, row in rows.items()}


def render_markdown(run: dict[str, Any]) -> str:
    """The variants' epoch times and overheads as a Markdown table, target checks, notes."""
    machine = run["machine"]
    infos: dict[str, Any] = {}
    for record in run["records"]:
        infos.update(record["result"].get("info") or {})
    over = overheads(run)
    first = next((_row(r) for r in run["records"] if _row(r)), None)
    cfg = first["config"] if first else {}
    lines = [
        f"# jaxmtl logging overhead — {run['created']}",
        "",
        f"- machine: {machine['cpu_model']}, {machine['cpu_count']} cores, load average at "
        f"start {', '.join(f'{x:.2f}' for x in machine['load_average'])}; jax.devices(): "
        f"{infos.get('devices', '?')}; jax {infos.get('jax', '?')}; code: commit "
        f"{machine.get('commit', '?')}" + (f" + uncommitted {', '.join(machine['jaxmtl_dirty'])}"
                                           if machine.get("jaxmtl_dirty") else ""),
        f"- workload: reference (N = {cfg.get('n', 0):,} per task, batch "
        f"{cfg.get('batch_size', '?')} per task loader); valid split {N_VALID:,} held-out "
        f"points per task (one loader per task, batch {cfg.get('predict_batch', '?')}); "
        f"{run['spec']['repeats']} measured epochs after 1 warm-up epoch, one process per "
        "variant",
        "",
        "| variant | measured epochs s (total) | epoch s (median) | epoch s (best) "
        "| train points/s (best) | overhead vs A, total | vs A, median | vs A, best "
        "| vs A0 (median) | evaluations in measured epochs | log bytes | other load (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for record in run["records"]:
        row, key, result = _row(record), record["key"], record["result"]
        load = _fmt(record["foreign_load"], ".2f")
        if row is None:
            reason = result.get("skipped") or "error: " + result.get(
                "error", "?").strip().splitlines()[-1]
            lines.append(f"| {record['label']} | {reason} | | | | | | | | | | {load} |")
            continue
        o = over.get(key, {})
        lines.append(
            f"| {record['label']} | {row['measured_s_total']:.3f} | {row['epoch_s_median']:.3f} "
            f"| {row['epoch_s_best']:.3f} | {row['train_points_per_s_best']:,.0f} "
            f"| {_fmt(o.get('vs_A_total'), '+.1f', ' %')} "
            f"| {_fmt(o.get('vs_A_median'), '+.1f', ' %')} "
            f"| {_fmt(o.get('vs_A_best'), '+.1f', ' %')} "
            f"| {_fmt(o.get('vs_A0_median'), '+.1f', ' %')} "
            f"| {row['evaluations_in_measured_epochs']} | {row['log_bytes']:,} | {load} |")
    lines += ["", f"Target (logging within {TARGET_PERCENT:.0f} % of A, on the total of the "
              "measured epochs, which hold the same evaluations in every variant):", ""]
    for key, name in (("log_json", "B json"), ("log_tensorboard", "C tensorboard")):
        total = over.get(key, {}).get("vs_A_total")
        verdict = "n.a." if total is None else ("PASS" if total <= TARGET_PERCENT else "FAIL")
        lines.append(f"- {name}: {verdict} ({_fmt(total, '+.1f', ' %')} total, "
                     f"{_fmt(over.get(key, {}).get('vs_A_median'), '+.1f', ' %')} median epoch, "
                     f"{_fmt(over.get(key, {}).get('vs_A_best'), '+.1f', ' %')} best epoch)")
    lines += [
        "", "Notes:", "",
        "- Epoch seconds are from one `fit(n_epochs=1+R)` per variant, each epoch stamped at "
        "its first batch request (`impl_jaxmtl.EpochClock`); epoch 0 (compiling the step and "
        "the evaluation, creating the writer) is the warm-up and excluded. An epoch includes "
        "the evaluations that fall in it; the last one also the writer's `cleanup` "
        "(`log.json` is written then).",
        f"- Evaluations are every {EVALUATION_FREQ} batches counted over epochs, so epochs "
        "hold 6 or 7 of them and single epochs (median, best) mix the two; the total of the "
        "measured epochs holds the same evaluations in every variant and is the measure the "
        "target uses. Epoch stamps are host-side (dispatch runs ahead of the device between "
        "evaluations), another reason single epochs scatter more than the total.",
        "- Overhead = epoch seconds / A's - 1. Differences of a few % are within the noise of "
        "this shared 2-core machine: compare the median and best columns and the other load, "
        "and re-run when they disagree.",
        "- Other load = cores kept busy by other processes while the child ran; a child "
        "above `--max-other-load` is re-run (`--retries`), the least disturbed kept.",
    ]
    return "\n".join(lines) + "\n"


def plot(run: dict[str, Any], path: str) -> str | None:
    """Bars of median and best epoch seconds per variant, A's best dashed at +5 %."""
    plt, skipped = load_pyplot()
    if plt is None:
        return skipped
    rows = [(r["key"].removeprefix("log_"), _row(r)) for r in run["records"] if _row(r)]
    if not rows:
        return "no PNG: no results"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["epoch_s_median"] for _, r in rows], 0.4, label="median")
    bars = ax.bar([x + 0.2 for x in xs], [r["epoch_s_best"] for _, r in rows], 0.4, label="best")
    ax.bar_label(bars, fmt="%.3f")
    base = dict(rows).get("no_log")
    if base:
        ax.axhline(base["epoch_s_best"] * (1 + TARGET_PERCENT / 100), color="tab:red",
                   linestyle="--", linewidth=1, label=f"A best + {TARGET_PERCENT:.0f} %")
    ax.set_xticks(list(xs), [name for name, _ in rows])
    ax.set_ylabel("train epoch seconds")
    ax.set_title(f"jaxmtl logging overhead {run['created']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
