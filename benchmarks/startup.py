"""Start-up cost: ``import jaxmtl`` against ``import jax, flax.linen, optax``.

Each import runs in a fresh interpreter, the two alternating, ``--repeats`` times; the
medians and their ratio are printed (target: ratio <= 1.3)::

    python -m benchmarks.startup --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

STATEMENTS = {
    "jax + flax.linen + optax": "import jax, flax.linen, optax",
    "jaxmtl": "import jaxmtl",
}


def time_import(statement: str) -> float:
    """Seconds for a fresh interpreter to run ``statement`` (interpreter start-up included)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True)
    return time.perf_counter() - start


def measure(repeats: int) -> dict[str, list[float]]:
    """``{label: [seconds per run]}``, the statements alternating so load drifts hit both."""
    times: dict[str, list[float]] = {label: [] for label in STATEMENTS}
    for statement in STATEMENTS.values():  # warm the OS file cache once
        time_import(statement)
    for _ in range(repeats):
        for label, statement in STATEMENTS.items():
            times[label].append(time_import(statement))
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    times = measure(args.repeats)
    medians = {label: statistics.median(values) for label, values in times.items()}
    for label, values in times.items():
        print(f"{label:26s} median {medians[label]:.3f} s  "
              f"(min {min(values):.3f}, max {max(values):.3f}, n={len(values)})")
    base, ours = medians["jax + flax.linen + optax"], medians["jaxmtl"]
    print(f"ratio jaxmtl / (jax + flax.linen + optax): {ours / base:.2f}")


if __name__ == "__main__":
    main()
