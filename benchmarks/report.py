"""Markdown table and PNG bar chart of one run of the benchmark set (``latest.*``).

Ratios use each implementation's *best* measured epoch (the one least disturbed by other
load on the shared machine, as ``benchmarks/scoring.py`` does); medians are shown beside.
"""

from __future__ import annotations

from typing import Any

# Against the floors (hand-written JAX on the same machine), not against Snorkel: Snorkel's
# speed relative to JAX differs from machine to machine (PyTorch threading), the floors'
# do not. The Snorkel ratios stay in the table as information.
TARGETS = [
    # (what, implementation key, metric, reference key, minimum ratio)
    ("jaxmtl fit >= 0.95 x hand-written JAX loop", "jaxmtl", "train", "jax_numpy", 0.95),
    ("jaxmtl fused (steps_per_call) >= 1.0 x the lax.scan JAX loop", "jaxmtl_k*", "train",
     "jax_scan", 1.0),
    ("jaxmtl predict >= 0.95 x hand-written JAX predict", "jaxmtl", "predict", "jax_numpy",
     0.95),
]


def _first(record: dict[str, Any]) -> dict[str, Any] | None:
    results = record["result"].get("results") or []
    return results[0] if results else None


def _value(records: dict[str, dict], key: str, metric: str) -> float | None:
    record = records.get(key)
    row = _first(record) if record else None
    if row is None:
        return None
    return row.get("train_points_per_s_best" if metric == "train" else "predict_points_per_s_best")


def _fmt(value: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _header(run: dict[str, Any]) -> list[str]:
    machine = run["machine"]
    infos: dict[str, Any] = {}
    for record in run["records"]:
        infos.update(record["result"].get("info") or {})
    versions = ", ".join(f"{name} {infos[name]}" for name in
                         ("jax", "jaxlib", "flax", "optax", "torch", "snorkel") if name in infos)
    cfg = run["spec"]["configs"][0]
    return [
        f"# jaxmtl benchmark — {run['created']}",
        "",
        f"- machine: {machine['cpu_model']}, {machine['cpu_count']} cores "
        f"({machine['usable_cores']} usable), load average at start "
        f"{', '.join(f'{x:.2f}' for x in machine['load_average'])}; Python {machine['python']}",
        f"- jax.devices(): {infos.get('devices', '?')} (backend {infos.get('backend', '?')}); "
        f"torch threads {infos.get('torch_threads', '?')}",
        f"- versions: {versions}",
        f"- code: commit {machine.get('commit', '?')}"
        + (f" + uncommitted changes in {', '.join(machine['jaxmtl_dirty'])}"
           if machine.get("jaxmtl_dirty") else " (jaxmtl/ clean)"),
        f"- workload: N = {cfg['n']:,} points per task, D = {cfg['d']}, body width "
        f"{cfg['width']}, batch {cfg['batch_size']} per task loader, Adam lr {cfg['lr']}, "
        f"grad clip {cfg['grad_clip']}; {run['spec']['repeats']} measured epochs after 1 warm-up",
        "",
    ]


def render_markdown(run: dict[str, Any]) -> str:
    """The results table, the target checks and the footnotes, as Markdown."""
    records = {r["key"]: r for r in run["records"]}
    snorkel_train = _value(records, "snorkel", "train")
    snorkel_predict = _value(records, "snorkel", "predict")
    jax_train = _value(records, "jax_numpy", "train")
    lines = _header(run) + [
        "| implementation | train points/s (best) | median [worst] | × Snorkel | × JAX loop "
        "| compile / 1st-epoch overhead (s) | predict points/s (best) | predict × Snorkel "
        "| peak RSS (MiB) | task_a train acc | other load (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for record in run["records"]:
        result, row = record["result"], _first(record)
        load = _fmt(record["foreign_load"], ".2f")
        if row is None:
            reason = result.get("skipped") or "error: " + result.get("error", "?").strip().splitlines()[-1]
            lines.append(f"| {record['label']} | {reason} | | | | | | | "
                         f"{_fmt(result.get('peak_rss_mb'))} | | {load} |")
            continue
        train, predict = row["train_points_per_s_best"], row.get("predict_points_per_s_best")
        lines.append(
            f"| {record['label']} | {train:,.0f} | {row['train_points_per_s']:,.0f} "
            f"[{row['train_points_per_s_worst']:,.0f}] | {_fmt(_ratio(train, snorkel_train), '.2f')} "
            f"| {_fmt(_ratio(train, jax_train), '.2f')} | {row['compile_s']:.2f} "
            f"| {_fmt(predict)} | {_fmt(_ratio(predict, snorkel_predict), '.2f')} "
            f"| {result['peak_rss_mb']:,.0f} | {_fmt(row.get('task_a_train_accuracy'), '.4f')} "
            f"| {load} |"
        )
    lines += ["", "Targets (best epochs):", ""] + [f"- {line}" for line in check_targets(records)]
    lines += ["", *_jaxmtl_notes(records), "", *FOOTNOTES]
    return "\n".join(lines) + "\n"


def check_targets(records: dict[str, dict]) -> list[str]:
    """One line per target: PASS/FAIL/n.a. with the measured ratio."""
    lines = []
    for what, key, metric, reference, minimum in TARGETS:
        keys = [k for k in records if k.startswith(key[:-1])] if key.endswith("*") else [key]
        ratios = [_ratio(_value(records, k, metric), _value(records, reference, metric))
                  for k in keys]
        ratios = [r for r in ratios if r is not None]
        if not ratios:
            lines.append(f"{what}: n.a. (not measured or skipped)")
            continue
        best = max(ratios)
        lines.append(f"{what}: {'PASS' if best >= minimum else 'FAIL'} ({best:.2f} x)")
    return lines


def _jaxmtl_notes(records: dict[str, dict]) -> list[str]:
    lines = []
    for key, record in records.items():
        row = _first(record) if key.startswith("jaxmtl") else None
        if row is None or "refit_s" not in row:
            continue
        lines.append(
            f"{record['label']}: timing = {row['timing_method']}; fresh fit(n_epochs=1) in a "
            f"warm process {row['first_fit_s']:.2f} s; a second fit(n_epochs=1) on the same "
            f"model and trainer {row['refit_s']:.2f} s, i.e. {row['refit_overhead_s']:.2f} s "
            f"above a steady epoch (the Trainer reuses its compiled step across fits); "
            f"difference estimate fit(2) - fit(1) = {row['diff_epoch_s']:.3f} s per epoch "
            f"({row['diff_points_per_s']:,.0f} points/s; noisy: a difference of two "
            f"compile-dominated calls)."
        )
    return lines


FOOTNOTES = [
    "Notes:",
    "1. Train points/s = points of both tasks (2 N) / seconds of one epoch, measured after one "
    "warm-up epoch; best = the least disturbed measured epoch, median and worst beside it.",
    "2. jaxmtl: one `fit(n_epochs=1+R)` on a fresh model; the Trainer's batch scheduler is "
    "wrapped to time-stamp each epoch's start, the last epoch ending when `fit` returned and "
    "`trainer.state` is ready. Epoch 0 is the warm-up. Snorkel: a warm-up `fit(n_epochs=1)` then "
    "R timed `fit(n_epochs=1)` on the same model/trainer. Hand-written loops: epochs timed "
    "to `block_until_ready` / the end of the eager loop.",
    "3. Compile / 1st-epoch overhead = warm-up epoch (from the `fit` call) minus the median "
    "steady epoch, in a fresh process: tracing + XLA compilation + start-up for JAX, parameter "
    "and optimizer initialisation included on both sides, jaxmtl without its persistent cache; "
    "first-call "
    "allocation and thread start-up for PyTorch (no compilation).",
    "4. Predict = N points through both heads (probabilities copied to host numpy), batch 1024, "
    "best of R calls after a warm-up call; `model.predict` for jaxmtl and Snorkel.",
    "5. Peak RSS = `ru_maxrss` of the implementation's own child process. Other load = cores "
    "kept busy by other processes while the child ran (/proc/stat minus the child's CPU time): "
    "numbers taken while it is well above 0 are disturbed; such a child is measured again "
    "(`--max-other-load`, `--retries`) and the least disturbed attempt kept (all attempts are "
    "in the JSON).",
]


def load_pyplot() -> tuple[Any, str | None]:
    """``(matplotlib.pyplot, None)`` on the Agg backend, or ``(None, "no PNG: ...")``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        return None, f"no PNG: {error}"
    return plt, None


def plot(run: dict[str, Any], path: str) -> str | None:
    """Bar chart of train and predict throughput as ratios to the hand-written JAX loop
    (dashed: the targets, 0.95 x that loop and, for fused training, 1.0 x the lax.scan
    loop); returns a note if skipped."""
    plt, skipped = load_pyplot()
    if plt is None:
        return skipped
    records = {r["key"]: r for r in run["records"]}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    scan = _ratio(_value(records, "jax_scan", "train"), _value(records, "jax_numpy", "train"))
    train_targets = (0.95,) if scan is None else (0.95, scan)
    for ax, metric, targets in ((axes[0], "train", train_targets), (axes[1], "predict", (0.95,))):
        base = _value(records, "jax_numpy", metric)
        names, ratios = [], []
        for key in records:
            ratio = _ratio(_value(records, key, metric), base)
            if ratio is not None:
                names.append(key)
                ratios.append(ratio)
        bars = ax.bar(names, ratios, color="tab:blue")
        ax.bar_label(bars, fmt="%.2f")
        for target in targets:
            ax.axhline(target, color="tab:red", linestyle="--", linewidth=1)
        ax.set_title(f"{metric} throughput / the JAX loop's (best epoch)")
        ax.set_ylabel("ratio to the hand-written JAX loop")
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"jaxmtl benchmark {run['created']} (dashed: targets)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
