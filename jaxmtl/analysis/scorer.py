"""Scorer: several metrics over one filtering pass and one confusion matrix (Snorkel's Scorer)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxmtl._lazy import lazy_module
from jaxmtl.analysis.metrics import (
    CONFUSION_METRICS,
    METRICS,
    ArrayLike,
    confusion_matrix,
    coverage_score,
    roc_auc_score,
    scores_from_confusion,
    to_label_array,
)

pd = lazy_module("pandas")  # imported when a DataFrame is asked for, not at import

CustomMetric = Callable[[np.ndarray, np.ndarray | None, np.ndarray | None], Any]


def _as_score(name: str, value: Any) -> float:
    """A custom metric's value as a float (what the logs, checkpoints and macro averages
    need), or a ValueError naming the metric."""
    error = ValueError(f"Scorer: custom metric {name} returned {value!r}; a custom metric "
                       f"returns a number, or a dict of numbers")
    if np.ndim(value) != 0:
        raise error
    try:
        return float(np.asarray(value).item())
    except (TypeError, ValueError):
        raise error from None


class Scorer:
    """Calculate standard and user-defined metrics, as ``snorkel.analysis.Scorer``.

    Abstains follow Snorkel: every standard metric but coverage drops the points whose
    gold or pred equals ``abstain_label``; coverage is computed on all points (Snorkel's
    Scorer passes it no filter), i.e. the fraction of preds that are not -1.

    Args:
        metrics: names from ``METRICS``.
        custom_metric_funcs: ``{name: f(golds, preds, probs)}``; ``f`` receives the
            unfiltered [N] int golds (soft golds already argmaxed), preds and probs, and
            returns a float, or a dict of floats that is merged into the results. A custom
            name equal to a standard one replaces it.
        abstain_label: gold/pred value ignored by the standard metrics; None keeps all.

    Raises:
        ValueError: a name in ``metrics`` is not in ``METRICS``.
    """

    def __init__(
        self,
        metrics: Sequence[str] | None = None,
        custom_metric_funcs: Mapping[str, CustomMetric] | None = None,
        abstain_label: int | None = -1,
    ) -> None:
        for metric in metrics or ():
            if metric not in METRICS:
                raise ValueError(f"Unrecognized metric: {metric}; the metrics are "
                                 f"{sorted(METRICS)}; pass your own in custom_metric_funcs")
        self.custom_metric_funcs: dict[str, CustomMetric] = dict(custom_metric_funcs or {})
        self.abstain_label = abstain_label
        # Snorkel keeps one dict where a custom func overrides a standard metric in place.
        self.metric_names: tuple[str, ...] = tuple(
            dict.fromkeys([*(metrics or ()), *self.custom_metric_funcs])
        )
        self.standard_metrics: tuple[str, ...] = tuple(
            m for m in dict.fromkeys(metrics or ()) if m not in self.custom_metric_funcs
        )

    def score(
        self,
        golds: ArrayLike,
        preds: ArrayLike | None = None,
        probs: ArrayLike | None = None,
    ) -> dict[str, float]:
        """Calculate every metric of this scorer.

        Args:
            golds: [N] int gold labels, or [N, K] soft labels scored by their argmax (rows
                that are all -1 are abstains, -1).
            preds: [N] int predictions; needed by all metrics but roc_auc.
            probs: [N, K] probabilities; needed by roc_auc ([N, 2] or [N]).

        Returns:
            ``{metric: score}``; NaN for a standard metric with no points left after
            dropping abstains, and for roc_auc with a single gold class.

        Raises:
            ValueError: no gold labels at all, a required input missing, or mismatched lengths.
        """
        if len(golds) == 0:
            raise ValueError("Cannot score empty labels")
        golds = to_label_array(golds, "golds", allow_soft=True)
        preds = to_label_array(preds, "preds") if preds is not None else None
        probs = np.asarray(probs) if probs is not None else None
        for name, array in (("preds", preds), ("probs", probs)):
            if array is not None and len(array) != len(golds):
                raise ValueError(f"{len(golds)} golds but {len(array)} {name}")

        standard = self._score_standard(golds, preds, probs)
        results: dict[str, float] = {}
        for name in self.metric_names:
            if name not in self.custom_metric_funcs:
                results[name] = standard[name]
                continue
            value = self.custom_metric_funcs[name](golds, preds, probs)
            if isinstance(value, Mapping):
                results.update({key: _as_score(f"{name}['{key}']", item)
                                for key, item in value.items()})
            else:
                results[name] = _as_score(name, value)
        return results

    def _score_standard(
        self, golds: np.ndarray, preds: np.ndarray | None, probs: np.ndarray | None
    ) -> dict[str, float]:
        """Standard metrics: one abstain mask, one confusion matrix, one roc_auc pass."""
        for metric in self.standard_metrics:
            for name in METRICS[metric].inputs:
                if {"preds": preds, "probs": probs}.get(name, golds) is None:
                    raise ValueError(f"Metric {metric} requires access to {name}.")

        keep = None
        if self.abstain_label is not None:
            keep = golds != self.abstain_label
            if preds is not None:
                keep &= preds != self.abstain_label
            if keep.all():
                keep = None
        kept_golds = golds if keep is None else golds[keep]

        scores: dict[str, float] = {}
        hard = [m for m in self.standard_metrics if m in CONFUSION_METRICS]
        if hard:
            kept_preds = preds if keep is None else preds[keep]
            scores.update(scores_from_confusion(confusion_matrix(kept_golds, kept_preds), hard))
        if "roc_auc" in self.standard_metrics:
            scores["roc_auc"] = roc_auc_score(kept_golds, probs if keep is None else probs[keep])
        if "coverage" in self.standard_metrics:
            scores["coverage"] = coverage_score(preds)
        return scores

    def score_slices(
        self,
        S: Any,
        golds: ArrayLike,
        preds: ArrayLike,
        probs: ArrayLike,
        as_dataframe: bool = False,
    ) -> dict[str, dict[str, float]] | pd.DataFrame:
        """Calculate the metrics overall and on each slice.

        Args:
            S: [N] slice membership: a numpy record/structured array with one field per
                slice (Snorkel's ``SFApplier`` output), a DataFrame, or ``{name: [N] mask}``.
            golds: [N] int gold labels (or [N, K] soft labels).
            preds: [N] int predictions.
            probs: [N, K] probabilities (may be None when no metric needs them).
            as_dataframe: return a DataFrame with one row per slice ("overall" first)
                and one column per metric.

        Returns:
            ``{"overall": scores, slice_name: scores, ...}`` or the DataFrame.

        Raises:
            ValueError: lengths of S, golds, preds and probs differ, or a slice is empty
                ("Cannot score empty labels", as in Snorkel).
        """
        slices = _slice_masks(S)
        lengths = {len(golds)} | {len(mask) for mask in slices.values()}
        lengths |= {len(a) for a in (preds, probs) if a is not None}
        if len(lengths) > 1:
            raise ValueError("S, golds, preds, and probs must have the same number of elements")

        golds, preds, probs = (None if a is None else np.asarray(a) for a in (golds, preds, probs))
        metrics_dict = {"overall": self.score(golds, preds, probs)}
        for slice_name, mask in slices.items():
            metrics_dict[slice_name] = self.score(
                *(None if a is None else a[mask] for a in (golds, preds, probs))
            )
        if as_dataframe:
            return pd.DataFrame.from_dict(metrics_dict).transpose()
        return metrics_dict


def _slice_masks(S: Any) -> dict[str, np.ndarray]:
    """``{slice_name: [N] bool mask}`` from a structured array, DataFrame or mapping."""
    # S can only be a DataFrame if pandas is already imported; don't import it to ask.
    pandas = sys.modules.get("pandas")
    if pandas is not None and isinstance(S, pandas.DataFrame):
        return {str(name): S[name].to_numpy().astype(bool) for name in S.columns}
    if isinstance(S, Mapping):
        return {str(name): np.asarray(mask).astype(bool) for name, mask in S.items()}
    names = getattr(getattr(S, "dtype", None), "names", None)
    if names is None:
        raise ValueError(
            f"S: expected a structured array with one field per slice, a DataFrame or a "
            f"dict of masks, got {type(S).__name__}"
        )
    return {name: np.asarray(S[name]).astype(bool) for name in names}


def metrics_dict_to_dataframe(metrics_dict: Mapping[str, float]) -> pd.DataFrame:
    """Turn ``{"task/dataset/split/metric": score}`` into a long DataFrame.

    Args:
        metrics_dict: scores keyed "label/dataset/split/metric" (the metric part may
            itself contain "/").

    Returns:
        DataFrame with columns label, dataset, split, metric, score; one row per key.

    Raises:
        ValueError: a key has fewer than four "/"-separated parts.
    """
    rows = []
    for full_name, score in metrics_dict.items():
        parts = full_name.split("/", 3)
        if len(parts) != 4:
            raise ValueError(f"Metric key {full_name!r}: expected 'label/dataset/split/metric'")
        rows.append((*parts, score))
    return pd.DataFrame(rows, columns=["label", "dataset", "split", "metric", "score"])
