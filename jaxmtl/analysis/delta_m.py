"""Δm: the average relative gain of a multi-task model over its single-task baselines.

The standard definition (Maninis et al. 2019; Vandenhende et al. 2021; LibMTL), in percent:

    Δm = 100 / |terms| * Σ_{(task, metric)} (-1)^{l} (M_mtl - M_single) / M_single

where ``l = 1`` when a lower value of the metric is better (a loss, an error) and 0
otherwise, and the sum runs over every (task, dataset, split, metric) score of the
baselines. The division is by ``|M_single|``, the same for the usual non-negative metrics
and the gain's sign stays right for a negative one. Both inputs are the Scorer's ``{"task/dataset/split/metric": value}`` dicts
(``model.score(...)`` output); the Scorer's aggregates ``model/all/...`` are ignored.

    mtl = {"a/d/test/accuracy": 0.90, "b/d/test/accuracy": 0.60}
    single = {"a/d/test/accuracy": 0.80, "b/d/test/accuracy": 0.60}
    delta_m(mtl, single, higher_is_better=True).mean   # 6.25 (= (12.5 + 0) / 2)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

AGGREGATE_PREFIX = "model/all/"


@dataclass(frozen=True)
class DeltaM:
    """Δm of one multi-task model against its single-task baselines, in percent.

    Attributes:
      mean: Δm, the mean of ``terms`` over every (task, metric) term.
      per_task: task name -> the mean of that task's terms (over its datasets, splits and
        metrics).
      terms: score key -> ``(-1)^l (M_mtl - M_single) / M_single`` in percent.
    """

    mean: float
    per_task: dict[str, float]
    terms: dict[str, float]


def _split_key(key: str) -> tuple[str, str]:
    """(task, metric) of a ``task/dataset/split/metric`` key."""
    parts = key.split("/")
    if len(parts) < 4 or not all(parts):
        raise ValueError(f"Score key {key!r} is not of the form 'task/dataset/split/metric'")
    return parts[0], parts[-1]


def _lower_is_better(metric: str, key: str, higher_is_better: bool | Mapping[str, bool]) -> bool:
    if isinstance(higher_is_better, bool):
        return not higher_is_better
    if key in higher_is_better:
        return not higher_is_better[key]
    if metric in higher_is_better:
        return not higher_is_better[metric]
    raise KeyError(f"higher_is_better has no entry for metric {metric!r} (score {key!r}); "
                   f"it has {sorted(higher_is_better)}")


def delta_m(mtl_scores: Mapping[str, float], single_task_scores: Mapping[str, float],
            higher_is_better: bool | Mapping[str, bool]) -> DeltaM:
    """Δm in percent, per task and averaged over every (task, metric) term.

    Args:
      mtl_scores: the multi-task model's scores, ``{"task/dataset/split/metric": value}``.
      single_task_scores: the single-task models' scores under the same keys (the union of
        each single-task model's ``score`` dict).
      higher_is_better: True when every metric is better higher; or a mapping from a
        metric name (``"accuracy"``) or a full score key to True/False, which must cover
        every metric scored.

    Returns:
      A ``DeltaM`` with the mean, the per-task means and every term.

    Raises:
      KeyError: a score of one side has no counterpart on the other (a missing baseline is
        never skipped silently), or ``higher_is_better`` lacks a metric.
      ValueError: no score to compare, a key that is not ``task/dataset/split/metric``, a
        value that is not finite, or a baseline of 0 (the relative change is undefined).
    """
    mtl = {k: v for k, v in mtl_scores.items() if not k.startswith(AGGREGATE_PREFIX)}
    single = {k: v for k, v in single_task_scores.items() if not k.startswith(AGGREGATE_PREFIX)}
    no_baseline = sorted(set(mtl) - set(single))
    if no_baseline:
        raise KeyError(f"No single-task baseline for {no_baseline}; the baselines have "
                       f"{sorted(single)}")
    no_mtl = sorted(set(single) - set(mtl))
    if no_mtl:
        raise KeyError(f"The multi-task scores lack {no_mtl}; they have {sorted(mtl)}")
    if not single:
        raise ValueError("delta_m needs at least one 'task/dataset/split/metric' score; "
                         "got none (aggregates 'model/all/...' are ignored)")
    terms: dict[str, float] = {}
    by_task: dict[str, list[float]] = {}
    for key in sorted(single):
        task, metric = _split_key(key)
        m_mtl, m_single = float(mtl[key]), float(single[key])
        for side, value in (("multi-task", m_mtl), ("single-task", m_single)):
            if not math.isfinite(value):
                raise ValueError(f"The {side} score {key!r} is {value}; expected a finite number")
        if m_single == 0.0:
            raise ValueError(f"The single-task baseline {key!r} is 0: the relative change "
                             f"(M_mtl - M_single) / M_single is undefined; leave this score "
                             f"out of both dicts or use another metric")
        sign = -1.0 if _lower_is_better(metric, key, higher_is_better) else 1.0
        term = 100.0 * sign * (m_mtl - m_single) / abs(m_single)
        terms[key] = term
        by_task.setdefault(task, []).append(term)
    per_task = {task: sum(values) / len(values) for task, values in by_task.items()}
    return DeltaM(mean=sum(terms.values()) / len(terms), per_task=per_task, terms=terms)
