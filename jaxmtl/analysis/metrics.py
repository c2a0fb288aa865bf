"""Classification metrics with Snorkel's names and scikit-learn's definitions, in numpy.

Every hard-label metric (accuracy, precision, recall, f1, f1_micro, f1_macro, fbeta,
matthews_corrcoef) is read off one confusion matrix built with a single ``np.bincount``,
so scoring several metrics costs one pass over the data (see :func:`scores_from_confusion`,
in ``confusion.py``).

Degenerate inputs never crash:

* no points (e.g. everything filtered out): every metric is NaN (scikit-learn raises);
* roc_auc with a single gold class: NaN (scikit-learn raises);
* one label only: scikit-learn's value (precision/recall/f-scores 0.0 when ``pos_label``
  never occurs, matthews_corrcoef 0.0, accuracy/f1_micro/f1_macro 1.0 if all correct);
* zero division elsewhere: 0.0, scikit-learn's default, without a warning.

Misuse raises ``ValueError`` as scikit-learn does: a binary metric (precision, recall, f1,
fbeta) on more than two labels, or a ``pos_label`` absent from two present labels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxmtl.analysis.confusion import (  # noqa: F401  (re-exported: one metrics namespace)
    CONFUSION_METRICS,
    ArrayLike,
    ConfusionMatrix,
    confusion_matrix,
    score_confusion,
    scores_from_confusion,
    to_label_array,
)


def coverage_score(preds: ArrayLike) -> float:
    """Fraction of predictions that are not abstains (-1).

    Args:
        preds: [N] int predictions.

    Returns:
        The coverage; NaN when there are no predictions.
    """
    preds = np.asarray(preds)
    if preds.size == 0:
        return float("nan")
    return float(np.count_nonzero(preds != -1) / preds.size)


def roc_auc_score(golds: ArrayLike, probs: ArrayLike) -> float:
    """Binary ROC AUC of the positive-class probabilities, as scikit-learn's.

    Computed as the Mann-Whitney statistic (ties count one half), which equals the
    trapezoidal area under scikit-learn's ROC curve.

    Args:
        golds: [N] int gold labels in {0, 1} (or {-1, 1}); 1 is the positive class.
        probs: [N, 2] class probabilities (column 1 is scored) or [N] scores of class 1.

    Returns:
        The AUC; NaN when fewer than two gold classes are present (scikit-learn raises).

    Raises:
        ValueError: probs with other than 2 columns, non-finite probs, or golds that are
            multiclass or not in {0, 1} / {-1, 1}.
    """
    golds = np.asarray(golds)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 2:
        if probs.shape[1] != 2:
            raise ValueError(
                "Metric roc_auc is currently only defined for binary problems "
                f"(probs has shape {probs.shape}, expected [N, 2] or [N])."
            )
        probs = probs[:, 1]
    elif probs.ndim != 1:
        raise ValueError(f"roc_auc: probs has shape {probs.shape}, expected [N, 2] or [N]")
    if probs.shape[0] != golds.shape[0]:
        raise ValueError(f"roc_auc: {golds.shape[0]} golds but {probs.shape[0]} probs")
    if golds.size == 0:
        return float("nan")
    low, high = golds.min(), golds.max()
    if low == high:
        return float("nan")
    if np.any((golds != low) & (golds != high)):
        raise ValueError("Metric roc_auc is currently only defined for binary problems.")
    if (int(low), int(high)) not in ((0, 1), (-1, 1)):
        raise ValueError(
            f"roc_auc: golds take values {{{low}, {high}}}; expected {{0, 1}} or {{-1, 1}}"
        )
    if not np.all(np.isfinite(probs)):
        raise ValueError("roc_auc: probs contain NaN or infinity")
    is_positive = golds == high
    positive_scores = np.sort(probs[is_positive])
    negative_scores = np.sort(probs[~is_positive])
    # For each positive: negatives strictly below plus negatives tied (left + right = 2*below + tied).
    below = np.searchsorted(negative_scores, positive_scores, side="left")
    below_or_tied = np.searchsorted(negative_scores, positive_scores, side="right")
    pairs = positive_scores.size * negative_scores.size
    return float((below.sum() + below_or_tied.sum()) / (2.0 * pairs))


def _hard_metric(name: str) -> Callable[..., float]:
    def func(golds: np.ndarray, preds: np.ndarray, **kwargs: Any) -> float:
        return score_confusion(confusion_matrix(golds, preds), name, **kwargs)

    func.__doc__ = f"{name} of [N] int golds against [N] int preds (NaN when N == 0)."
    return func


class Metric(NamedTuple):
    """A metric function and the inputs (of golds, preds, probs) it takes, in order."""

    func: Callable[..., float]
    inputs: tuple[str, ...] = ("golds", "preds")

    def __call__(
        self, golds: ArrayLike, preds: ArrayLike, probs: ArrayLike, **kwargs: Any
    ) -> float:
        """Apply the metric to already filtered golds [N], preds [N], probs [N, K]."""
        available = {"golds": golds, "preds": preds, "probs": probs}
        return self.func(*(available[name] for name in self.inputs), **kwargs)


METRICS: dict[str, Metric] = {
    **{name: Metric(_hard_metric(name)) for name in CONFUSION_METRICS},
    "coverage": Metric(coverage_score, ("preds",)),
    "roc_auc": Metric(roc_auc_score, ("golds", "probs")),
}
_FILTER_KEYS = ("golds", "preds")


def keep_mask(
    golds: np.ndarray | None,
    preds: np.ndarray | None,
    filter_dict: Mapping[str, Sequence[int]] | None,
) -> np.ndarray | None:
    """Boolean [N] mask of the points Snorkel's ``filter_dict`` keeps, or None to keep all.

    ``filter_dict`` is ``{"golds": [values], "preds": [values]}``: a point whose gold or pred
    is a listed value is dropped; the filter of a None input is skipped, as in Snorkel.
    """
    if not filter_dict:
        return None
    unknown = set(filter_dict) - set(_FILTER_KEYS)
    if unknown:
        raise ValueError(
            f"filter_dict must only include keys in {list(_FILTER_KEYS)}, got {sorted(unknown)}"
        )
    mask = None
    for key, labels in (("golds", golds), ("preds", preds)):
        if labels is not None and filter_dict.get(key):
            keep = ~np.isin(labels, list(filter_dict[key]))
            mask = keep if mask is None else mask & keep
    return mask


def metric_score(
    golds: ArrayLike | None = None,
    preds: ArrayLike | None = None,
    probs: ArrayLike | None = None,
    metric: str = "accuracy",
    filter_dict: Mapping[str, Sequence[int]] | None = None,
    **kwargs: Any,
) -> float:
    """Evaluate one metric, as Snorkel's ``snorkel.analysis.metric_score``.

    Args:
        golds: [N] int gold labels, or [N, K] soft labels (scored by their argmax).
        preds: [N] int predictions.
        probs: [N, K] probabilities (roc_auc: [N, 2] or [N] positive-class scores).
        metric: a name in ``METRICS``.
        filter_dict: drop points whose gold (key "golds") or pred (key "preds") is one of
            the listed values, e.g. ``{"golds": [-1], "preds": [-1]}``.
        **kwargs: metric options: ``pos_label`` (precision, recall, f1, fbeta; default 1),
            ``beta`` (fbeta; default 1).

    Returns:
        The score (NaN for no points left, or roc_auc with one gold class).

    Raises:
        ValueError: unknown metric, missing required input, malformed labels.
    """
    if metric not in METRICS:
        raise ValueError(f"Unrecognized metric: {metric}; the metrics are "
                         f"{sorted(METRICS)}")
    golds = to_label_array(golds, "golds", allow_soft=True) if golds is not None else None
    preds = to_label_array(preds, "preds") if preds is not None else None
    probs = np.asarray(probs) if probs is not None else None
    available = {"golds": golds, "preds": preds, "probs": probs}
    lengths = {name: len(array) for name, array in available.items() if array is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"golds, preds and probs must have the same length, got {lengths}")

    mask = keep_mask(golds, preds, filter_dict)
    if mask is not None:
        available = {k: None if v is None else v[mask] for k, v in available.items()}
    for name in METRICS[metric].inputs:
        if available[name] is None:
            raise ValueError(f"Metric {metric} requires access to {name}.")
    return METRICS[metric](**available, **kwargs)
