"""jaxmtl.analysis.delta_m against hand computations."""

import math

import numpy as np
import pytest

from jaxmtl.analysis import DeltaM, delta_m


def test_two_tasks_one_metric_by_hand():
    mtl = {"a/d/test/accuracy": 0.90, "b/d/test/accuracy": 0.57,
           "model/all/test/accuracy": 0.735}
    single = {"a/d/test/accuracy": 0.80, "b/d/test/accuracy": 0.60}
    result = delta_m(mtl, single, higher_is_better=True)
    # a: (0.90 - 0.80) / 0.80 = +12.5 %; b: (0.57 - 0.60) / 0.60 = -5 %; mean 3.75 %.
    assert isinstance(result, DeltaM)
    np.testing.assert_allclose(result.terms["a/d/test/accuracy"], 12.5, rtol=1e-12)
    np.testing.assert_allclose(result.terms["b/d/test/accuracy"], -5.0, rtol=1e-12)
    np.testing.assert_allclose(result.mean, 3.75, rtol=1e-12)
    assert result.per_task == pytest.approx({"a": 12.5, "b": -5.0}, rel=1e-12)
    assert set(result.terms) == {"a/d/test/accuracy", "b/d/test/accuracy"}  # no aggregate


def test_mixed_directions_and_metrics_by_hand():
    mtl = {"a/d/test/f1": 0.50, "a/d/test/roc_auc": 0.88, "b/d/test/loss": 0.30}
    single = {"a/d/test/f1": 0.40, "a/d/test/roc_auc": 0.80, "b/d/test/loss": 0.20}
    result = delta_m(mtl, single, {"f1": True, "roc_auc": True, "loss": False})
    # f1 +25 %, roc_auc +10 %, loss: -(0.30 - 0.20) / 0.20 = -50 %.
    np.testing.assert_allclose(result.mean, (25.0 + 10.0 - 50.0) / 3, rtol=1e-12)
    assert result.per_task == pytest.approx({"a": 17.5, "b": -50.0}, rel=1e-12)


def test_full_key_entry_wins_over_metric_name():
    mtl, single = {"a/d/test/score": 2.0}, {"a/d/test/score": 4.0}
    result = delta_m(mtl, single, {"score": True, "a/d/test/score": False})
    np.testing.assert_allclose(result.mean, 50.0, rtol=1e-12)  # -(2 - 4) / 4


def test_matches_numpy_on_random_scores():
    rng = np.random.default_rng(0)
    keys = [f"t{i}/d/test/accuracy" for i in range(7)]
    mtl_values, single_values = rng.uniform(0.1, 1, 7), rng.uniform(0.1, 1, 7)
    result = delta_m(dict(zip(keys, mtl_values, strict=True)),
                     dict(zip(keys, single_values, strict=True)), True)
    expected = 100 * np.mean((mtl_values - single_values) / single_values)
    np.testing.assert_allclose(result.mean, expected, rtol=1e-12)


def test_missing_baseline_is_an_error_naming_the_key():
    with pytest.raises(KeyError, match=r"No single-task baseline for \['b/d/test/accuracy'\]"):
        delta_m({"a/d/test/accuracy": 0.9, "b/d/test/accuracy": 0.8},
                {"a/d/test/accuracy": 0.8}, True)


def test_missing_multitask_score_is_an_error_naming_the_key():
    with pytest.raises(KeyError, match=r"multi-task scores lack \['b/d/test/accuracy'\]"):
        delta_m({"a/d/test/accuracy": 0.9},
                {"a/d/test/accuracy": 0.8, "b/d/test/accuracy": 0.8}, True)


def test_zero_baseline_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match=r"baseline 'a/d/test/f1' is 0"):
        delta_m({"a/d/test/f1": 0.3}, {"a/d/test/f1": 0.0}, True)


def test_non_finite_score_is_an_error():
    with pytest.raises(ValueError, match=r"multi-task score 'a/d/test/f1' is nan"):
        delta_m({"a/d/test/f1": math.nan}, {"a/d/test/f1": 0.5}, True)


def test_higher_is_better_must_cover_every_metric():
    with pytest.raises(KeyError, match=r"no entry for metric 'f1'.*\['accuracy'\]"):
        delta_m({"a/d/test/f1": 0.3}, {"a/d/test/f1": 0.5}, {"accuracy": True})


def test_bad_key_and_empty_input():
    with pytest.raises(ValueError, match=r"'accuracy' is not of the form"):
        delta_m({"accuracy": 0.3}, {"accuracy": 0.5}, True)
    with pytest.raises(ValueError, match="at least one"):
        delta_m({"model/all/test/accuracy": 0.3}, {"model/all/test/accuracy": 0.5}, True)
