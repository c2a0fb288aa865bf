"""``python -m benchmarks.mtl``: a fair multi-task comparison (single-task baselines, Δm, seeds).

    .venv-bench/bin/python -m benchmarks.mtl                 # full run -> benchmarks/results/mtl.*
    .venv-bench/bin/python -m benchmarks.mtl --quick         # smoke run -> mtl_quick.*
    .venv-bench/bin/python -m benchmarks.mtl --datasets yeast --methods single,equal,pcgrad

For each data set (multi-digit, yeast, yeast with 50 % of each task's train labels
hidden, the scale-imbalanced synthetic) and each method (the single-task models,
``equal`` and every balancer of ``jaxmtl.training.balancers.BALANCER_NAMES``, read at run
time) a child process trains every seed under one protocol fixed in advance
(``benchmarks/mtl_train.py``): the same body, budget and epochs for every method, the
best epoch by the valid macro-average, then the test split. Writes ``mtl.md`` (tables:
test mean ± std per task, Δm vs the single-task models, ms/step, mean rank; the closing
verdict per balancer), ``mtl.png`` (Δm per method) and ``mtl.json`` (every number).
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
from pathlib import Path
from typing import Any

from benchmarks import mtl_report
from benchmarks.runner import REPO_ROOT, Implementation, git_state, run_child
from benchmarks.workload import machine_info

DATASETS = ("digits", "yeast", "yeast_partial", "synthetic")
# Epochs per data set, the same for every method (--epochs overrides them all).
# Sized for < 20 min on the 2-core machine (see estimate_full_seconds).
EPOCHS = {"digits": 10, "yeast": 15, "yeast_partial": 15, "synthetic": 12}
QUICK_EPOCHS, QUICK_SEEDS = 2, 2
# Train rows of the full and the --quick data (for the run-time estimate).
TRAIN_ROWS = {"digits": (4000, 1000), "yeast": (1451, 1451), "yeast_partial": (1451, 1451),
              "synthetic": (2000, 1000)}


def all_methods() -> list[str]:
    """"single", then every balancer jaxmtl has now ("equal" first)."""
    from jaxmtl.training.balancers import BALANCER_NAMES

    return ["single", *BALANCER_NAMES]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mtl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"seeds 0..N-1 per method (default 5; --quick {QUICK_SEEDS})")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs for every data set and method (default {EPOCHS}; "
                             f"--quick {QUICK_EPOCHS})")
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help="comma-separated: " + ", ".join(DATASETS))
    parser.add_argument("--methods", default="",
                        help="comma-separated: single and balancer names (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 seeds, 2 epochs, smaller data -> mtl_quick.*")
    parser.add_argument("--hidden", type=int, default=64, help="body width (two Dense layers)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--python", default=None, help="interpreter of the children")
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--render", default=None, metavar="RUN.json",
                        help="only rewrite the .md and .png of a saved run (no training)")
    args = parser.parse_args(argv)
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = sorted(set(args.datasets) - set(DATASETS))
    if unknown:
        parser.error(f"--datasets: unknown {unknown}; expected some of {list(DATASETS)}")
    known = all_methods()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()] or known
    unknown = sorted(set(args.methods) - set(known))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; expected some of {known}")
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: expected at least 1")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs {args.epochs}: expected at least 1")
    return args


def child_spec(args: argparse.Namespace, dataset: str, method: str) -> dict[str, Any]:
    """The spec of one (data set, method) child."""
    seeds = args.seeds or (QUICK_SEEDS if args.quick else 5)
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else EPOCHS[dataset])
    return {"dataset": dataset, "method": method, "seeds": list(range(seeds)),
            "epochs": epochs, "quick": args.quick, "hidden": args.hidden,
            "batch_size": args.batch_size, "lr": args.lr}


def estimate_full_seconds(records: list[dict[str, Any]], batch_size: int) -> float | None:
    """Seconds a full run would take here, extrapolated from a --quick run's children.

    Per child: start-up + the first fit's compile + 5 seeds x (the fixed cost of a fit:
    tracing, initialisation, first evaluation; plus the full epochs x steps at the
    measured step time). None unless every child ran at least 2 seeds.
    """
    total = 0.0
    for record in records:
        result, spec = record["result"], record["spec"]
        seeds = result.get("seeds") or []
        if len(seeds) < 2 or not result.get("step_ms"):
            return None
        full_rows, quick_rows = TRAIN_ROWS[spec["dataset"]]
        step_s = result["step_ms"] / 1e3
        quick_train = spec["epochs"] * -(-quick_rows // batch_size) * step_s
        fixed = max(seeds[1]["fit_s"] - quick_train, 0.0)
        compile_s = max(seeds[0]["fit_s"] - seeds[1]["fit_s"], 0.0)
        startup = record["child_wall_s"] - sum(s["fit_s"] for s in seeds)
        steps = -(-full_rows // batch_size)
        full_fit = fixed + EPOCHS[spec["dataset"]] * steps * step_s
        total += startup + compile_s + 5 * full_fit + steps * step_s  # + the timing epoch
    return total


def main(argv: list[str] | None = None) -> None:
    """Runs every (data set, method) child and writes the report files."""
    import sys

    args = parse_args(argv)
    if args.render:
        rerender(Path(args.render))
        return
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    python = args.python or sys.executable
    created = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    machine = {**machine_info(), **git_state()}
    records = []
    for dataset in args.datasets:
        for method in args.methods:
            spec = child_spec(args, dataset, method)
            print(f"[mtl] {dataset} / {method}: {len(spec['seeds'])} seeds x "
                  f"{spec['epochs']} epochs ...", flush=True)
            impl = Implementation(f"{dataset}/{method}", f"{method} on {dataset}",
                                  "benchmarks.mtl_train")
            cpu_before = _children_cpu_seconds()
            record = run_child(impl, spec, python, timeout_s=3600.0)
            record["spec"] = spec
            record["child_cpu_s"] = _children_cpu_seconds() - cpu_before
            result = record["result"]
            status = result.get("skipped") or ("ERROR" if "error" in result else "ok")
            print(f"[mtl]   {status}, {record['child_wall_s']:.1f} s", flush=True)
            if "error" in result:
                print(result["error"], flush=True)
            records.append(record)
    run = {"created": created, "machine": machine, "versions": versions(python),
           "args": {k: v for k, v in vars(args).items() if k != "out_dir"},
           "records": records}
    stem = "mtl_quick" if args.quick else "mtl"
    summaries, markdown = render(run)
    run["summaries"] = summaries
    if args.quick:
        estimate = estimate_full_seconds(records, args.batch_size)
        run["estimated_full_s"] = estimate
        # CPU seconds / wall seconds of the children: the share of the cores this run got;
        # on a quiet machine the wall time is at most the CPU time.
        run["cpu_share"] = (sum(r["child_cpu_s"] for r in records)
                            / max(sum(r["child_wall_s"] for r in records), 1e-9))
        markdown += estimate_line(run)
    png_note = mtl_report.plot(summaries, str(out_dir / f"{stem}.png"),
                               f"Δm vs single-task models, {created}")
    if png_note:
        markdown += f"\n({png_note})\n"
    (out_dir / f"{stem}.md").write_text(markdown)
    (out_dir / f"{stem}.json").write_text(json.dumps(run, indent=1, default=str))
    print(markdown)
    print(f"[mtl] wrote {out_dir}/{stem}.md, {stem}.json" + ("" if png_note else f", {stem}.png"))


def estimate_line(run: dict[str, Any]) -> str:
    """The report's line on a full run's duration (empty unless a --quick run estimated it)."""
    estimate, share = run.get("estimated_full_s"), run.get("cpu_share")
    if estimate is None or share is None:
        return ""
    return (f"\nEstimated full run (5 seeds, epochs {EPOCHS}, batch {run['args']['batch_size']}): "
            f"{estimate / 60:.0f} min at this run's load (the children got {share:.2f} "
            f"CPU-seconds per second); at most {share * estimate / 60:.0f} min on a quiet "
            f"machine.\n")


def rerender(path: Path) -> None:
    """Rewrites ``<stem>.md`` and ``<stem>.png`` beside a saved ``<stem>.json`` run."""
    run = json.loads(path.read_text())
    summaries, markdown = render(run)
    markdown += estimate_line(run)
    png_note = mtl_report.plot(summaries, str(path.with_suffix(".png")),
                               f"Δm vs single-task models, {run['created']}")
    if png_note:
        markdown += f"\n({png_note})\n"
    path.with_suffix(".md").write_text(markdown)
    print(markdown)


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def versions(python: str) -> dict[str, str]:
    """Versions of the packages that decide the numbers (of this interpreter)."""
    from importlib import metadata

    found = {}
    for package in ("jax", "jaxlib", "flax", "optax", "numpy", "scikit-learn", "river"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def render(run: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], str]:
    """The per-data-set summaries and the whole Markdown report."""
    args, machine = run["args"], run["machine"]
    by_dataset: dict[str, dict[str, dict[str, Any]]] = {}
    failures: dict[str, dict[str, str]] = {}
    for record in run["records"]:
        dataset, method = record["spec"]["dataset"], record["spec"]["method"]
        result = record["result"]
        if "seeds" in result:
            by_dataset.setdefault(dataset, {})[method] = result
        else:
            reason = result.get("skipped") or result.get("error", "no result").strip()
            failures.setdefault(dataset, {})[method] = reason.splitlines()[-1][:200]
    title = "# Multi-task methods against single-task models" + (
        " (SMOKE RUN: --quick, 2 seeds, 2 epochs, small data; not a result)"
        if args["quick"] else "")
    lines = [title, "",
             f"- created {run['created']}, commit {machine.get('commit')}"
             + (f" (uncommitted: {machine['jaxmtl_dirty']})" if machine.get("jaxmtl_dirty")
                else ""),
             f"- machine: {machine.get('cpu_model')}, {machine.get('usable_cores')} usable "
             f"cores, load average {[round(x, 1) for x in machine.get('load_average') or []]}, "
             f"Python {machine.get('python')}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in run["versions"].items()),
             f"- protocol: body Dense({args['hidden']})-ReLU-Dense({args['hidden']})-ReLU, one "
             f"Dense head per task, Adam lr {args['lr']}, no clipping, batch "
             f"{args['batch_size']}, one loader with every task's labels; the same epochs for "
             "every method; best epoch by the valid macro-average (mean over tasks and "
             "metrics; each single-task model by its own task), then the test split; "
             "mean ± std over seeds",
             "- Δm: the mean over tasks and metrics of (M - M_single) / M_single in %, per "
             "seed against the single-task models' mean over seeds (the single-task row's "
             "± is their own seed spread); mean rank: over every task x metric by test mean "
             "(1 = best); ms/step: one extra epoch after seed 0, no evaluation (single: the T "
             "single-task models' step together); finite: seeds "
             "whose parameters and train losses stayed finite",
             ""]
    summaries = {}
    for dataset, results in by_dataset.items():
        summaries[dataset] = mtl_report.summarize_dataset(results)
        first = next(iter(results.values()))
        spec = next(r["spec"] for r in run["records"] if r["spec"]["dataset"] == dataset)
        note = (f"{first['note']}; {len(spec['seeds'])} seeds x {spec['epochs']} epochs, "
                f"{first['steps_per_epoch']} steps/epoch")
        lines += mtl_report.dataset_markdown(dataset, note, summaries[dataset],
                                             failures.get(dataset, {}))
        lines.append("")
    for dataset, failed in failures.items():
        if dataset not in by_dataset:
            lines += [f"### {dataset}", "", "Every method failed: "
                      + "; ".join(f"{m}: {e}" for m, e in failed.items()), ""]
    lines += mtl_report.partial_labels_table(summaries)
    lines += mtl_report.closing_note(summaries)
    return summaries, "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
