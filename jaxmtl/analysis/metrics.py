"""Classification metrics with Snorkel's names and scikit-learn's definitions, in numpy.

Every hard-label metric (accuracy, precision, recall, f1, f1_micro, f1_macro, fbeta,
matthews_corrcoef) is read off one confusion matrix built with a single ``np.bincount``,
so scoring several metrics costs one pass over the data (see :func:`scores_from_confusion`).

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

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

ArrayLike = Any

_BINARY_METRICS = ("precision", "recall", "f1", "fbeta")
# A dense label range wider than this falls back to np.unique: bincount would need R**2 bins.
_MAX_DENSE_LABEL_RANGE = 4096


class ConfusionMatrix(NamedTuple):
    """Counts of (gold, pred) pairs.

    Attributes:
        counts: [R, R] int64; ``counts[i, j]`` = points with gold ``labels[i]`` and pred
            ``labels[j]``. Rows/columns of labels that occur nowhere are all zero.
        labels: [R] int64 label value of each row/column, sorted.
    """

    counts: np.ndarray
    labels: np.ndarray

    @property
    def num_points(self) -> int:
        """Number of scored points."""
        return int(self.counts.sum())

    @property
    def present_labels(self) -> np.ndarray:
        """[L] labels that occur in golds or preds (scikit-learn's ``unique_labels``)."""
        occurs = (self.counts.sum(axis=0) + self.counts.sum(axis=1)) > 0
        return self.labels[occurs]


def to_label_array(labels: ArrayLike, name: str = "labels", allow_soft: bool = False) -> np.ndarray:
    """Convert labels to a 1-D int64 array, as Snorkel's ``to_int_label_array``.

    Args:
        labels: [N] or [N, 1] integer-valued labels; with ``allow_soft`` also [N, K] soft
            labels, which become their argmax (rows that are all -1 become -1, abstain).
        name: what the labels are, for error messages.
        allow_soft: accept [N, K] soft labels.

    Returns:
        [N] int64 labels.

    Raises:
        ValueError: non-integer values, or a shape that is not [N] / [N, 1] (/ [N, K]).
    """
    array = np.asarray(labels)
    if allow_soft and array.ndim == 2 and array.shape[1] > 1:
        hard = np.argmax(array, axis=1)
        return np.where(np.all(array == -1, axis=1), -1, hard).astype(np.int64)
    if array.dtype.kind not in "iub":
        if array.dtype.kind != "f":
            raise ValueError(f"{name}: expected numbers, got dtype {array.dtype}")
        if np.any(np.mod(array, 1) != 0):
            raise ValueError(f"{name}: Input contains at least one non-integer value.")
    array = array.astype(np.int64, copy=False).squeeze()
    if array.ndim == 0:
        array = array[None]
    if array.ndim != 1:
        expected = "[N] ints or [N, K] soft labels" if allow_soft else "[N] ints"
        raise ValueError(
            f"{name}: Input could not be converted to 1d np.array "
            f"(shape {np.shape(labels)}, expected {expected})"
        )
    return array


def confusion_matrix(golds: ArrayLike, preds: ArrayLike) -> ConfusionMatrix:
    """Count (gold, pred) pairs in one ``np.bincount`` pass.

    Args:
        golds: [N] int gold labels.
        preds: [N] int predicted labels.

    Returns:
        The confusion matrix over the integer range spanned by golds and preds.
    """
    golds = np.asarray(golds, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    if golds.shape != preds.shape:
        raise ValueError(f"golds has shape {golds.shape} but preds has shape {preds.shape}")
    if golds.size == 0:
        return ConfusionMatrix(np.zeros((0, 0), np.int64), np.zeros(0, np.int64))
    low = min(int(golds.min()), int(preds.min()))
    high = max(int(golds.max()), int(preds.max()))
    if high - low < _MAX_DENSE_LABEL_RANGE:
        labels = np.arange(low, high + 1, dtype=np.int64)
        gold_index, pred_index = golds - low, preds - low
    else:
        labels, inverse = np.unique(np.concatenate([golds, preds]), return_inverse=True)
        gold_index, pred_index = inverse[: golds.size], inverse[golds.size :]
    size = labels.size
    flat = np.bincount(gold_index * size + pred_index, minlength=size * size)
    return ConfusionMatrix(flat.reshape(size, size), labels)


def _divide(numerator: float, denominator: float) -> float:
    # scikit-learn's default zero_division ("warn") yields 0.0 for 0/0.
    return float(numerator / denominator) if denominator > 0 else 0.0


def _binary_counts(confusion: ConfusionMatrix, metric: str, pos_label: int) -> tuple[int, int, int]:
    """(true positives, predicted positives, actual positives) for ``pos_label``."""
    present = confusion.present_labels
    if present.size > 2:
        raise ValueError(
            f"{metric} not supported for multiclass (labels {present.tolist()}): it is binary "
            "with pos_label; try f1_micro or f1_macro instead."
        )
    if pos_label not in present:
        if present.size == 2:
            raise ValueError(
                f"{metric}: pos_label={pos_label} is not a valid label. "
                f"It should be one of {present.tolist()}"
            )
        return 0, 0, 0
    i = int(np.flatnonzero(confusion.labels == pos_label)[0])
    counts = confusion.counts
    return int(counts[i, i]), int(counts[:, i].sum()), int(counts[i, :].sum())


def _accuracy(confusion: ConfusionMatrix) -> float:
    return float(np.trace(confusion.counts) / confusion.num_points)


def _fbeta(
    confusion: ConfusionMatrix, beta: float = 1.0, pos_label: int = 1, metric: str = "fbeta"
) -> float:
    # precision, recall and f1 are fbeta at beta = 0, inf and 1 (exactly, over counts).
    if beta < 0:
        raise ValueError(f"{metric}: beta should be >= 0, got {beta}")
    true_pos, pred_pos, actual_pos = _binary_counts(confusion, metric, pos_label)
    if np.isposinf(beta):
        return _divide(true_pos, actual_pos)
    beta2 = beta * beta
    # Over counts, not over precision/recall, as scikit-learn >= 1.3: 0/0 -> 0.0 only when
    # there is neither a true nor a predicted positive.
    return _divide((1 + beta2) * true_pos, beta2 * actual_pos + pred_pos)


def _f1_macro(confusion: ConfusionMatrix) -> float:
    counts = confusion.counts
    true_pos = np.diag(counts).astype(np.float64)
    denominator = counts.sum(axis=0) + counts.sum(axis=1)
    present = denominator > 0
    return float(np.mean(2 * true_pos[present] / denominator[present]))


def _matthews_corrcoef(confusion: ConfusionMatrix) -> float:
    # float64 throughout: N**2 overflows int64 for N > ~3e9 and products of sums sooner.
    counts = confusion.counts.astype(np.float64)
    actual = counts.sum(axis=1)
    predicted = counts.sum(axis=0)
    num_points = actual.sum()
    correct = np.trace(counts)
    cov_actual_pred = correct * num_points - actual @ predicted
    cov_pred_pred = num_points**2 - predicted @ predicted
    cov_actual_actual = num_points**2 - actual @ actual
    if cov_pred_pred * cov_actual_actual == 0:
        return 0.0
    return float(cov_actual_pred / np.sqrt(cov_actual_actual * cov_pred_pred))


_FROM_CONFUSION: dict[str, Callable[..., float]] = {
    "accuracy": _accuracy,
    "precision": lambda confusion, pos_label=1: _fbeta(confusion, 0.0, pos_label, "precision"),
    "recall": lambda confusion, pos_label=1: _fbeta(confusion, np.inf, pos_label, "recall"),
    "f1": lambda confusion, pos_label=1: _fbeta(confusion, 1.0, pos_label, "f1"),
    # Summed over all present labels, tp = trace and pred = true = N: micro f1 = accuracy.
    "f1_micro": _accuracy,
    "f1_macro": _f1_macro,
    "fbeta": _fbeta,
    "matthews_corrcoef": _matthews_corrcoef,
}
# Metrics read off the confusion matrix alone; coverage and roc_auc need other inputs.
CONFUSION_METRICS = tuple(_FROM_CONFUSION)


def score_confusion(confusion: ConfusionMatrix, metric: str, **kwargs: Any) -> float:
    """One metric of ``CONFUSION_METRICS`` (NaN on an empty matrix); kwargs: pos_label, beta."""
    if metric not in _FROM_CONFUSION:
        raise ValueError(f"Unrecognized metric: {metric}")
    if confusion.num_points == 0:
        return float("nan")
    return _FROM_CONFUSION[metric](confusion, **kwargs)


def scores_from_confusion(
    confusion: ConfusionMatrix,
    metrics: Iterable[str],
    pos_label: int = 1,
    beta: float = 1.0,
) -> dict[str, float]:
    """Compute several hard-label metrics from one confusion matrix.

    Args:
        confusion: from :func:`confusion_matrix`.
        metrics: names from ``CONFUSION_METRICS``.
        pos_label: positive class of precision, recall, f1 and fbeta.
        beta: weight of recall in fbeta.

    Returns:
        ``{metric: score}`` in the order given; NaN for every metric when empty.
    """
    scores = {}
    for metric in metrics:
        options: dict[str, Any] = {"pos_label": pos_label} if metric in _BINARY_METRICS else {}
        if metric == "fbeta":
            options["beta"] = beta
        scores[metric] = score_confusion(confusion, metric, **options)
    return scores


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
        raise ValueError(f"Unrecognized metric: {metric}")
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
