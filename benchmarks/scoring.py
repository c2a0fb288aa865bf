"""Time scoring 1,000,000 points with every metric: jaxmtl's Scorer vs scikit-learn.

Run: ``python -m benchmarks.scoring [--num-points N] [--repeats R]``. Prints a Markdown
table of the best-of-R wall time of each and checks that the scores agree.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import numpy as np

from jaxmtl.analysis import METRICS, Scorer

METRIC_NAMES = [
    "accuracy",
    "coverage",
    "precision",
    "recall",
    "f1",
    "f1_micro",
    "f1_macro",
    "fbeta",
    "matthews_corrcoef",
    "roc_auc",
]


def make_data(num_points: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binary golds [N], probs [N, 2] that are informative of them, preds = argmax [N]."""
    rng = np.random.default_rng(seed)
    golds = rng.integers(0, 2, num_points)
    positive = np.clip(0.5 + 0.3 * (2 * golds - 1) + rng.normal(0, 0.25, num_points), 0, 1)
    probs = np.stack([1 - positive, positive], axis=1)
    preds = np.argmax(probs, axis=1)
    return golds, preds, probs


def sklearn_scores(golds: np.ndarray, preds: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """All metrics via scikit-learn, filtering abstains (-1) as Snorkel's Scorer does."""
    import sklearn.metrics as skm

    keep = (golds != -1) & (preds != -1)
    g, p, s = golds[keep], preds[keep], probs[keep, 1]
    return {
        "accuracy": skm.accuracy_score(g, p),
        "coverage": float(np.mean(preds != -1)),
        "precision": skm.precision_score(g, p),
        "recall": skm.recall_score(g, p),
        "f1": skm.f1_score(g, p),
        "f1_micro": skm.f1_score(g, p, average="micro"),
        "f1_macro": skm.f1_score(g, p, average="macro"),
        "fbeta": skm.fbeta_score(g, p, beta=1.0),
        "matthews_corrcoef": skm.matthews_corrcoef(g, p),
        "roc_auc": skm.roc_auc_score(g, s),
    }


def best_time(func: Callable[[], dict[str, float]], repeats: int) -> tuple[float, dict]:
    """Best wall time of ``repeats`` calls (the least disturbed by other load) and the result."""
    times, result = [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        result = func()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    """Run the benchmark and print the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-points", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    assert set(METRIC_NAMES) == set(METRICS)

    golds, preds, probs = make_data(args.num_points)
    scorer = Scorer(metrics=METRIC_NAMES)
    ours_s, ours = best_time(lambda: scorer.score(golds, preds, probs), args.repeats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_s, theirs = best_time(lambda: sklearn_scores(golds, preds, probs), args.repeats)
    max_diff = max(abs(ours[name] - theirs[name]) for name in METRIC_NAMES)

    print(
        f"Scoring {args.num_points:,} binary points with {len(METRIC_NAMES)} metrics "
        f"(best of {args.repeats}); max |difference| = {max_diff:.2e}\n"
    )
    print("| implementation | seconds | speed-up |")
    print("|---|---:|---:|")
    print(
        f"| jaxmtl Scorer (numpy, one confusion matrix) | {ours_s:.3f} | {theirs_s / ours_s:.1f}x |"
    )
    print(f"| scikit-learn (one call per metric) | {theirs_s:.3f} | 1.0x |")


if __name__ == "__main__":
    main()
