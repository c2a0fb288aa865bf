"""Hard-label metrics read off one confusion matrix (Snorkel's names, scikit-learn's
definitions): the matrix is built with a single ``np.bincount``, so scoring several
metrics costs one pass over the data (:func:`scores_from_confusion`). The degenerate
cases and errors are those ``metrics`` lists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
        raise ValueError(f"Unrecognized metric: {metric}; the metrics are "
                         f"{sorted(_FROM_CONFUSION)}")
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
