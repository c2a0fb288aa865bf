"""``python -m benchmarks``: the reference workload in every implementation, one process each.

    .venv-bench/bin/python -m benchmarks                      # the set -> benchmarks/results/latest.*
    .venv-bench/bin/python -m benchmarks --steps-per-call 8   # adds jaxmtl's fused mode
    .venv-bench/bin/python -m benchmarks --scaling            # batch size / width sweep
    .venv-bench/bin/python -m benchmarks --devices            # 1, 2, 4, 8 devices
    .venv-bench/bin/python -m benchmarks --logging-overhead   # json / tensorboard logging
    .venv-bench/bin/python -m benchmarks --varlen             # variable-length token inputs
    .venv-bench/bin/python -m benchmarks --tasks 2,8,32,64    # many tasks: compiles, start-up
    .venv-bench/bin/python -m benchmarks --only jaxmtl,jax_numpy --repeats 5

Writes ``latest.md`` (table), ``latest.png`` (ratios to Snorkel) and ``latest.json`` (raw
numbers) under ``--out-dir``; the other modes write ``scaling.*``, ``devices.*`` and
``logging.*``. See README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import devices, logging_overhead, many_tasks, report, scaling, varlen
from benchmarks.runner import (
    JAX_NUMPY,
    JAX_SCAN,
    JAXMTL,
    REPO_ROOT,
    SNORKEL,
    TORCH,
    default_torch_python,
    git_state,
    jaxmtl_fused,
    run_set,
)
from benchmarks.workload import default_config, machine_info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scaling", action="store_true",
                        help="sweep batch size and body width instead of the reference set")
    parser.add_argument("--devices", action="store_true",
                        help="jaxmtl fit over 1, 2, 4, 8 devices, parallel=pmap and sharded "
                             "(forced CPU devices, or the real GPUs)")
    parser.add_argument("--logging-overhead", action="store_true",
                        help="jaxmtl fit without logging vs json and tensorboard logging")
    parser.add_argument("--varlen", action="store_true",
                        help="variable-length token inputs (lognormal lengths, max 239 and "
                             "512): Snorkel, a JAX loop padding to 2^k, jaxmtl default and "
                             "bucket_by_length=True")
    parser.add_argument("--tasks", default="", metavar="T1,T2,...",
                        help="the many-task workload for these task counts (jaxmtl, Snorkel, "
                             "hand-written JAX) -> many_tasks.{md,json,png}")
    parser.add_argument("--steps-per-call", type=int, default=0, metavar="K",
                        help="also run jaxmtl with TrainerConfig(steps_per_call=K)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="measured epochs after the warm-up (default 3; scaling 2; "
                             "logging-overhead 5)")
    parser.add_argument("--only", default="",
                        help="comma-separated implementation keys (snorkel, torch, jax_numpy, "
                             "jax_scan, jaxmtl, jaxmtl_kK; with --tasks: jaxmtl, snorkel, jax)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter of the JAX children (default: this one)")
    parser.add_argument("--torch-python", default=None,
                        help="interpreter of the PyTorch/Snorkel children (default: this one "
                             "if it has torch, else .venv-bench/bin/python)")
    parser.add_argument("--max-other-load", type=float, default=0.35,
                        help="re-measure a child while other processes kept more cores busy")
    parser.add_argument("--retries", type=int, default=2,
                        help="re-measurements allowed per child (the least loaded is kept)")
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    return parser.parse_args(argv)


def _select(impls: list[Any], only: str) -> list[Any]:
    keys = {k.strip() for k in only.split(",") if k.strip()}
    return [impl for impl in impls if not keys or impl.key in keys]


def run_devices(args: argparse.Namespace, created: str, machine: dict[str, Any]
                ) -> tuple[dict[str, Any], Any, Any]:
    """The ``--devices`` sweep: one child per (device count, mode); returns (run, md, plot)."""
    backend = devices.probe_backend(args.python)
    print(f"[benchmarks] backend {backend['backend']}, {backend['device_count']} device(s) "
          f"of kind {backend['device_kind']!r}; device counts {devices.device_counts(backend)}")
    impls = _select(devices.implementations(backend), args.only)
    with tempfile.TemporaryDirectory(prefix="jaxmtl-bench-params-") as params_dir:
        spec = {"configs": devices.configs(backend), "repeats": args.repeats or 3,
                "params_dir": params_dir}
        records = run_set(impls, spec, args.python, args.python, args.max_other_load,
                          args.retries, retry_errors=True)
    spec.pop("params_dir")
    run = {"created": created, "machine": machine, "spec": spec, "backend": backend,
           "impls": [{"key": i.key, **i.extra, "env": i.env} for i in impls],
           "records": records}
    return run, devices.render_markdown, devices.plot


def run_logging(args: argparse.Namespace, created: str, machine: dict[str, Any]
                ) -> tuple[dict[str, Any], Any, Any]:
    """The ``--logging-overhead`` comparison: one child per variant; returns (run, md, plot)."""
    impls = _select(logging_overhead.implementations(), args.only)
    spec = {"configs": [default_config()], "repeats": args.repeats or 5}
    records = run_set(impls, spec, args.python, args.python, args.max_other_load, args.retries)
    run = {"created": created, "machine": machine, "spec": spec, "records": records}
    return run, logging_overhead.render_markdown, logging_overhead.plot


def main(argv: list[str] | None = None) -> None:
    """Runs the reference set (or another mode) and writes the result files."""
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_python = args.torch_python or default_torch_python()
    created = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    machine = {**machine_info(), **git_state()}
    if args.varlen:
        spec, records = varlen.run_per_distribution(
            run_set, _select(varlen.IMPLEMENTATIONS, args.only), args.repeats, args.python,
            torch_python, args.max_other_load, args.retries)
        run = {"created": created, "machine": machine, "spec": spec, "records": records}
        stem = "varlen"
        markdown, png_note = varlen.render_markdown(run), "no plot for --varlen"
    elif args.tasks:
        counts = many_tasks.parse_tasks(args.tasks)
        records = many_tasks.run(counts, args.python, torch_python, args.only)
        run = {"created": created, "machine": machine, "spec": {"tasks": counts},
               "records": records}
        stem = "many_tasks"
        markdown = many_tasks.render_markdown(run)
        png_note = many_tasks.plot(run, str(out_dir / "many_tasks.png"))
    elif args.devices or args.logging_overhead:
        stem = "devices" if args.devices else "logging"
        run, render, plot = (run_devices if args.devices else run_logging)(args, created, machine)
        markdown, png_note = render(run), plot(run, str(out_dir / f"{stem}.png"))
    elif args.scaling:
        repeats = args.repeats or 2
        impls = _select([JAXMTL, JAX_NUMPY, TORCH], args.only)
        spec = {"configs": scaling.configs(), "repeats": repeats, "predict": False,
                "cross_check": False}
        records = run_set(impls, spec, args.python, torch_python, args.max_other_load,
                          args.retries)
        run = {"created": created, "machine": machine, "spec": spec, "records": records}
        stem = "scaling"
        markdown, png_note = scaling.render_markdown(run), scaling.plot(run, str(out_dir / "scaling.png"))
    else:
        impls = [SNORKEL, TORCH, JAX_NUMPY, JAX_SCAN, JAXMTL]
        if args.steps_per_call:
            impls.append(jaxmtl_fused(args.steps_per_call))
        impls = _select(impls, args.only)
        spec = {"configs": [default_config()], "repeats": args.repeats or 3}
        records = run_set(impls, spec, args.python, torch_python, args.max_other_load,
                          args.retries)
        run = {"created": created, "machine": machine, "spec": spec, "records": records}
        stem = "latest"
        markdown, png_note = report.render_markdown(run), report.plot(run, str(out_dir / "latest.png"))
    if png_note:
        markdown += f"\n({png_note})\n"
    (out_dir / f"{stem}.md").write_text(markdown)
    (out_dir / f"{stem}.json").write_text(json.dumps(run, indent=1, default=str))
    print(markdown)
    print(f"[benchmarks] wrote {out_dir}/{stem}.md, {stem}.json"
          + ("" if png_note else f", {stem}.png"))


if __name__ == "__main__":
    main()
