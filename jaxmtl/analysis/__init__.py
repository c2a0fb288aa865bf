"""Metrics and scoring: Snorkel's ``snorkel.analysis`` API on numpy."""

from jaxmtl.analysis.delta_m import DeltaM, delta_m
from jaxmtl.analysis.metrics import (
    METRICS,
    ConfusionMatrix,
    confusion_matrix,
    metric_score,
    scores_from_confusion,
)
from jaxmtl.analysis.scorer import Scorer, metrics_dict_to_dataframe

__all__ = [
    "METRICS",
    "ConfusionMatrix",
    "DeltaM",
    "Scorer",
    "confusion_matrix",
    "delta_m",
    "metric_score",
    "metrics_dict_to_dataframe",
    "scores_from_confusion",
]
