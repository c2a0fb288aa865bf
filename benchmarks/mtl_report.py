"""Pure summaries of ``python -m benchmarks.mtl`` results: best epochs, Δm, ranks, Markdown, PNG.

Everything here works on the children's JSON (``benchmarks/mtl_train.py``), so it can be
re-run on a saved ``mtl.json`` and tested without training.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jaxmtl.analysis import delta_m

SINGLE, EQUAL = "single", "equal"
MAX_COLUMNS = 4  # more task x metric scores than this: per-metric macro-averages + task tables


def _split_key(key: str) -> tuple[str, str, str]:
    task, _, split, metric = key.split("/")
    return task, split, metric


def best_epoch(epochs: list[dict[str, float]], tasks: list[str] | None = None) -> int:
    """Index of the epoch with the highest valid macro-average (first one on ties).

    The macro-average is the mean of the valid scores of ``tasks`` (all tasks if None)
    over their metrics; NaN scores (e.g. ROC-AUC of a split with one class) are left out.
    """
    def macro(scores: dict[str, float]) -> float:
        values = [v for k, v in scores.items() if _split_key(k)[1] == "valid"
                  and (tasks is None or _split_key(k)[0] in tasks) and math.isfinite(v)]
        return float(np.mean(values)) if values else -math.inf

    averages = [macro(scores) for scores in epochs]
    if not averages:
        raise ValueError("No evaluation was logged: expected one per epoch")
    return int(np.argmax(averages))


def selected_test_scores(record: dict[str, Any], single: bool, tasks: list[str]
                         ) -> tuple[dict[str, float], dict[str, int]]:
    """The test scores at the best epoch(s) of one seed, and the best epoch per task.

    The multi-task model takes one epoch for all tasks; each side-by-side single-task
    model takes its own, by its own task's valid scores.
    """
    epochs = record["epochs"]
    groups = [[task] for task in tasks] if single else [tasks]
    scores, chosen = {}, {}
    for group in groups:
        index = best_epoch(epochs, group)
        for key, value in epochs[index].items():
            task, split, _ = _split_key(key)
            if split == "test" and task in group:
                scores[key] = value
        chosen.update({task: index + 1 for task in group})
    return scores, chosen


def _ordered(keys: Any, tasks: list[str]) -> list[str]:
    """Score keys in the data set's task order, then by metric name."""
    return sorted(keys, key=lambda k: (tasks.index(_split_key(k)[0]), _split_key(k)[2]))


def _mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(np.mean(array)), float(np.std(array, ddof=1)) if len(array) > 1 else 0.0


def summarize_dataset(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per method: test mean ± std per score, Δm per seed vs the single-task means, ranks.

    Args:
      results: method -> the child's result for one data set (methods that failed are
        reported by the caller, not passed here).

    Returns:
      ``{"keys", "excluded", "methods": {method: {...}}}``. Scores whose single-task mean
      is 0 or not finite cannot enter Δm; they are listed in ``excluded``.
    """
    any_result = next(iter(results.values()))
    tasks = any_result["tasks"]
    methods: dict[str, dict[str, Any]] = {}
    for method, result in results.items():
        per_seed, epochs = [], []
        for record in result["seeds"]:
            scores, chosen = selected_test_scores(record, method == SINGLE, tasks)
            per_seed.append(scores)
            epochs.append(chosen)
        keys = _ordered(per_seed[0], tasks)
        stats = {key: _mean_std([s[key] for s in per_seed]) for key in keys}
        methods[method] = {"per_seed": per_seed, "best_epochs": epochs,
                           "mean": {k: v[0] for k, v in stats.items()},
                           "std": {k: v[1] for k, v in stats.items()},
                           "step_ms": result.get("step_ms"),
                           "finite_seeds": sum(r["finite"] for r in result["seeds"]),
                           "n_seeds": len(result["seeds"])}
    keys = _ordered(methods[next(iter(methods))]["mean"], tasks)
    excluded: list[str] = []
    if SINGLE in methods:
        baseline = methods[SINGLE]["mean"]
        excluded = [k for k in keys if not math.isfinite(baseline[k]) or baseline[k] == 0.0]
        used = [k for k in keys if k not in excluded]
        for summary in methods.values():
            dms = []
            for scores in summary["per_seed"]:
                mtl = {k: scores[k] for k in used}
                dms.append(delta_m(mtl, {k: baseline[k] for k in used}, True).mean
                           if all(math.isfinite(v) for v in mtl.values()) else math.nan)
            summary["delta_m_per_seed"] = dms
            summary["delta_m"], summary["delta_m_std"] = _mean_std(dms)
    _add_mean_ranks(methods, keys)
    return {"keys": keys, "excluded": excluded, "methods": methods}


def _add_mean_ranks(methods: dict[str, dict[str, Any]], keys: list[str]) -> None:
    """Mean over scores of each method's rank by test mean (1 = best; ties share)."""
    names = list(methods)
    ranks = np.zeros((len(keys), len(names)))
    for i, key in enumerate(keys):
        values = np.array([methods[m]["mean"][key] for m in names])
        values = np.where(np.isfinite(values), values, -np.inf)
        for j, value in enumerate(values):
            ranks[i, j] = 1 + np.sum(values > value) + 0.5 * (np.sum(values == value) - 1)
    for j, name in enumerate(names):
        methods[name]["mean_rank"] = float(ranks[:, j].mean()) if keys else math.nan


def verdicts(summary: dict[str, Any]) -> dict[str, str]:
    """Per balancer: "better", "worse" or "within 1 std" than equal weighting on Δm.

    Better (worse) means the Δm means differ by more than the larger of the two
    standard deviations over seeds.
    """
    methods = summary["methods"]
    if EQUAL not in methods or "delta_m" not in methods[EQUAL]:
        return {}
    base = methods[EQUAL]
    out = {}
    for name, row in methods.items():
        if name in (SINGLE, EQUAL):
            continue
        gap = row["delta_m"] - base["delta_m"]
        spread = max(row["delta_m_std"], base["delta_m_std"])
        out[name] = ("better" if gap > spread else "worse" if gap < -spread
                     else "within 1 std")
    return out


def _cell(mean: float, std: float, scale: float = 1.0, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "nan"
    shown = round(scale * mean, digits) + 0.0  # no "-0.00"
    return f"{shown:.{digits}f} ± {scale * std:.{digits}f}"


def _macro(summary_row: dict[str, Any], metric: str) -> tuple[float, float]:
    """Mean ± std over seeds of the macro-average over tasks of ``metric``."""
    per_seed = [float(np.nanmean([v for k, v in scores.items() if _split_key(k)[2] == metric]))
                for scores in summary_row["per_seed"]]
    return _mean_std(per_seed)


def dataset_markdown(name: str, result_note: str, summary: dict[str, Any],
                     failures: dict[str, str]) -> list[str]:
    """The Markdown section of one data set."""
    methods, keys = summary["methods"], summary["keys"]
    metrics = sorted({_split_key(k)[2] for k in keys})
    wide = len(keys) > MAX_COLUMNS
    columns = ([f"macro {m}" for m in metrics] if wide
               else [f"{_split_key(k)[0]} {_split_key(k)[2]}" for k in keys])
    lines = [f"### {name}", "", f"{result_note}.", "",
             "| method | " + " | ".join(columns) + " | Δm % | ms/step | mean rank | finite |",
             "|---|" + "---:|" * (len(columns) + 4)]
    for method, row in methods.items():
        cells = ([_cell(*_macro(row, m)) for m in metrics] if wide
                 else [_cell(row["mean"][k], row["std"][k]) for k in keys])
        dm = _cell(row["delta_m"], row["delta_m_std"], digits=2) if "delta_m" in row else "n/a"
        step = f"{row['step_ms']:.1f}" if row.get("step_ms") else "n/a"
        lines.append(f"| {method} | " + " | ".join(cells) +
                     f" | {dm} | {step} | {row['mean_rank']:.2f} | "
                     f"{row['finite_seeds']}/{row['n_seeds']} |")
    for method, error in failures.items():
        lines.append(f"| {method} | failed: {error} |" + " |" * (len(columns) + 3))
    if summary["excluded"]:
        lines += ["", "Left out of Δm (single-task mean 0 or not finite): "
                  + ", ".join(f"`{k}`" for k in summary["excluded"]) + "."]
    if wide:
        for metric in metrics:
            names = list(methods)
            lines += ["", f"Per task, test {metric} (mean ± std over seeds):", "",
                      "| task | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
            for key in (k for k in keys if _split_key(k)[2] == metric):
                lines.append(f"| {_split_key(key)[0]} | " + " | ".join(
                    _cell(methods[m]["mean"][key], methods[m]["std"][key], digits=2)
                    for m in names) + " |")
    return lines


def closing_note(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """Which balancers beat equal weighting beyond one standard deviation, per data set."""
    lines = ["## Balancers against equal weighting (Δm, beyond one standard deviation)", ""]
    for name, summary in summaries.items():
        found = verdicts(summary)
        if not found:
            lines.append(f"- {name}: no comparison (equal weighting or the single-task "
                         f"baselines missing)")
            continue
        groups = {v: sorted(m for m, verdict in found.items() if verdict == v)
                  for v in ("better", "within 1 std", "worse")}
        lines.append(f"- {name}: better: {', '.join(groups['better']) or 'none'}; "
                     f"within 1 std: {', '.join(groups['within 1 std']) or 'none'}; "
                     f"worse: {', '.join(groups['worse']) or 'none'}")
    return lines


def partial_labels_table(summaries: dict[str, dict[str, Any]], full: str = "yeast",
                         partial: str = "yeast_partial") -> list[str]:
    """Δm with all labels against Δm with hidden labels, and finite seeds, per method."""
    if full not in summaries or partial not in summaries:
        return []
    rows_full, rows_partial = summaries[full]["methods"], summaries[partial]["methods"]
    lines = [f"## Partially labelled rows: {full} vs {partial}", "",
             f"| method | Δm % {full} | Δm % {partial} | change | finite seeds ({partial}) |",
             "|---|---:|---:|---:|---:|"]
    for method, row in rows_partial.items():
        before = rows_full.get(method, {}).get("delta_m", math.nan)
        after = row.get("delta_m", math.nan)
        before, after = round(before, 2) + 0.0, round(after, 2) + 0.0  # no "-0.00"
        lines.append(f"| {method} | {before:.2f} | {after:.2f} | {after - before:+.2f} | "
                     f"{row['finite_seeds']}/{row['n_seeds']} |")
    return lines + [""]


def plot(summaries: dict[str, dict[str, Any]], path: str, title: str) -> str | None:
    """Δm mean ± std per method, one panel per data set; returns a note if skipped."""
    from benchmarks.report import load_pyplot

    plt, skipped = load_pyplot()
    if plt is None:
        return skipped
    panels = [(n, s) for n, s in summaries.items()
              if any("delta_m" in row for row in s["methods"].values())]
    if not panels:
        return "no PNG: no Δm (the single-task baselines were not run)"
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    for ax, (name, summary) in zip(axes[0], panels, strict=True):
        names = [m for m, row in summary["methods"].items() if "delta_m" in row]
        means = [summary["methods"][m]["delta_m"] for m in names]
        stds = [summary["methods"][m]["delta_m_std"] for m in names]
        colors = ["0.6" if m == SINGLE else "C1" if m == EQUAL else "C0" for m in names]
        ax.bar(range(len(names)), means, yerr=stds, color=colors, capsize=3)
        ax.axhline(0.0, color="k", linewidth=0.8)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
        ax.set_title(name)
        ax.set_ylabel("Δm vs single-task (%)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
