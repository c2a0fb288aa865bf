"""Tests for jaxmtl.analysis.metrics: Snorkel's cases, then properties against scikit-learn."""

import warnings

import numpy as np
import pytest
import sklearn.metrics as skm
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxmtl.analysis import METRICS, confusion_matrix, metric_score, scores_from_confusion

TOL = 1e-12


def _ours(*args, **kwargs) -> float:
    """metric_score, failing on any warning (degenerate inputs must be quiet)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return metric_score(*args, **kwargs)


def _sklearn(func, *args, **kwargs) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # UndefinedMetricWarning on zero division
        return float(func(*args, **kwargs))


# --- Snorkel's test_metrics, re-expressed --------------------------------------------------


def test_accuracy_basic():
    golds = np.array([0, 0, 0, 1, 1])
    preds = np.array([0, 0, 0, 1, 0])
    assert _ours(golds, preds, probs=None, metric="accuracy") == pytest.approx(0.8)


def test_bad_inputs():
    golds = np.array([0, 0, 0, 1, 1])
    with pytest.raises(ValueError, match="Input contains at least one non-integer"):
        metric_score(golds, np.array([0, 0, 0, 1, 0.5]), probs=None, metric="accuracy")
    with pytest.raises(ValueError, match="Input could not be converted"):
        metric_score(golds, np.ones((2, 5), int), probs=None, metric="accuracy")
    with pytest.raises(ValueError, match="Unrecognized metric: bad_metric"):
        metric_score(golds, golds, probs=None, metric="bad_metric")
    with pytest.raises(ValueError, match="filter_dict must only include keys in"):
        metric_score(golds, golds, probs=None, metric="accuracy", filter_dict={"bad_map": [0]})
    with pytest.raises(ValueError, match="same length"):
        metric_score(golds, golds[:3], probs=None, metric="accuracy")


@pytest.mark.parametrize(
    "filter_dict, expected",
    [
        (None, 0.6),
        ({"preds": [-1]}, 0.75),
        ({"golds": [0]}, 0.5),
        ({"golds": [1], "preds": [-1]}, 1.0),
    ],
)
def test_ignores(filter_dict, expected):
    golds = np.array([0, 0, 0, 1, 1])
    preds = np.array([0, -1, 0, 1, 0])
    score = _ours(golds, preds, probs=None, metric="accuracy", filter_dict=filter_dict)
    assert score == pytest.approx(expected)


def test_coverage():
    golds = np.array([0, 0, 0, 0, 1])
    preds = np.array([-1, -1, 0, 0, 0])
    assert _ours(golds, preds, probs=None, metric="coverage") == pytest.approx(0.6)
    filtered = _ours(golds, preds, probs=None, filter_dict={"golds": [1]}, metric="coverage")
    assert filtered == pytest.approx(0.5)


@pytest.mark.parametrize(
    "metric, expected",
    [("precision", 1 / 3), ("recall", 0.5), ("f1", 0.4), ("accuracy", 0.4)],
)
def test_binary_scores(metric, expected):
    golds = np.array([0, 0, 0, 1, 1])
    preds = np.array([1, 1, 0, 0, 1])
    assert _ours(golds, preds, probs=None, metric=metric) == pytest.approx(expected, abs=TOL)


def test_pos_label():
    golds = np.array([0, 0, 0, 1, 1])
    preds = np.array([1, 1, 0, 0, 1])
    # For class 0: tp=1, predicted 0 twice, actually 0 three times.
    assert _ours(golds, preds, None, "precision", pos_label=0) == pytest.approx(0.5)
    assert _ours(golds, preds, None, "recall", pos_label=0) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="pos_label=2 is not a valid label"):
        metric_score(golds, preds, None, "f1", pos_label=2)


def test_f1_multiclass():
    golds = np.array([0, 0, 1, 1, 2])
    preds = np.array([1, 1, 0, 1, 2])
    with pytest.raises(ValueError, match="f1 not supported for multiclass"):
        metric_score(golds, preds, probs=None, metric="f1")
    assert _ours(golds, preds, probs=None, metric="f1_micro") == pytest.approx(0.4)
    # Per-class f1: 0 -> 0, 1 -> 0.4, 2 -> 1.
    assert _ours(golds, preds, probs=None, metric="f1_macro") == pytest.approx(1.4 / 3)


def test_fbeta():
    golds = np.array([0, 0, 0, 0, 1])
    preds = np.array([1, 1, 0, 0, 1])
    precision = _ours(golds, preds, probs=None, metric="precision")
    recall = _ours(golds, preds, probs=None, metric="recall")
    assert _ours(golds, preds, None, "fbeta", beta=1e-6) == pytest.approx(precision, abs=1e-6)
    assert _ours(golds, preds, None, "fbeta", beta=1e6) == pytest.approx(recall, abs=1e-6)
    assert _ours(golds, preds, None, "fbeta", beta=0.0) == precision
    assert _ours(golds, preds, None, "fbeta", beta=np.inf) == recall
    # Default beta is 1: fbeta is f1.
    assert _ours(golds, preds, None, "fbeta") == _ours(golds, preds, None, "f1")


def test_matthews():
    golds = np.array([0, 0, 0, 0, 1])
    preds = np.array([1, 0, 0, 0, 0])
    assert _ours(golds, preds, None, "matthews_corrcoef") == pytest.approx(-0.25)
    assert _ours(golds, golds, None, "matthews_corrcoef") == pytest.approx(1.0)


def test_roc_auc():
    golds = np.array([0, 0, 0, 0, 1])
    probs = np.eye(2)[golds]
    assert _ours(golds, preds=None, probs=probs, metric="roc_auc") == pytest.approx(1.0)
    assert _ours(golds, None, np.fliplr(probs), "roc_auc") == pytest.approx(0.0)
    # 1-D probs are scores of class 1.
    assert _ours(golds, None, probs[:, 1], "roc_auc") == pytest.approx(1.0)
    probs_nonbinary = np.array(
        [[1.0, 0.0, 0.0], [0.7, 0.0, 0.3], [0.8, 0.0, 0.2], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    )
    with pytest.raises(ValueError, match="roc_auc is currently only defined for binary"):
        metric_score(golds, preds=None, probs=probs_nonbinary, metric="roc_auc")


def test_roc_auc_degenerate():
    # scikit-learn raises on one gold class; we return NaN.
    assert np.isnan(_ours(np.zeros(4, int), None, np.full(4, 0.5), "roc_auc"))
    assert np.isnan(
        _ours(
            np.array([0, 1]), None, np.array([0.2, 0.8]), "roc_auc", filter_dict={"golds": [0, 1]}
        )
    )
    with pytest.raises(ValueError, match="binary"):
        metric_score(np.array([0, 1, 2]), None, np.array([0.1, 0.5, 0.9]), "roc_auc")
    with pytest.raises(ValueError, match="NaN"):
        metric_score(np.array([0, 1]), None, np.array([0.1, np.nan]), "roc_auc")


def test_missing_preds():
    golds = np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="requires access to preds"):
        metric_score(golds=golds, metric="accuracy")
    with pytest.raises(ValueError, match="requires access to probs"):
        metric_score(golds=golds, preds=golds, metric="roc_auc")


def test_soft_golds_and_column_vectors():
    soft = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]])
    preds = np.array([[0], [1], [0]])
    assert _ours(soft, preds, None, "accuracy") == pytest.approx(2 / 3)


def test_jax_and_list_inputs():
    jnp = pytest.importorskip("jax.numpy")
    assert _ours(jnp.array([1, 0, 1]), [1.0, 0.0, 0.0], None, "accuracy") == pytest.approx(2 / 3)


def test_empty_gives_nan():
    empty = np.array([], dtype=int)
    for metric in ("accuracy", "precision", "f1_macro", "matthews_corrcoef", "coverage"):
        assert np.isnan(_ours(empty, empty, None, metric))
    golds, preds = np.array([-1, -1]), np.array([0, 1])
    assert np.isnan(_ours(golds, preds, None, "f1", filter_dict={"golds": [-1]}))


def test_confusion_matrix_and_several_metrics():
    golds = np.array([2, 2, 5, 5, 5])
    preds = np.array([2, 5, 5, 5, 2])
    confusion = confusion_matrix(golds, preds)
    assert confusion.labels.tolist() == [2, 3, 4, 5]
    np.testing.assert_array_equal(confusion.counts[[0, 3]][:, [0, 3]], [[1, 1], [1, 2]])
    assert confusion.present_labels.tolist() == [2, 5]
    scores = scores_from_confusion(confusion, ["accuracy", "f1", "f1_macro"], pos_label=5)
    assert scores == pytest.approx({"accuracy": 0.6, "f1": 2 / 3, "f1_macro": (0.5 + 2 / 3) / 2})
    # Labels far apart use the sparse path.
    wide = confusion_matrix(np.array([0, 10**9]), np.array([10**9, 10**9]))
    assert wide.labels.tolist() == [0, 10**9]
    np.testing.assert_array_equal(wide.counts, [[0, 1], [0, 1]])


def test_metrics_registry():
    assert set(METRICS) == {
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
    }
    golds, preds = np.array([0, 1, 1]), np.array([0, 1, 0])
    assert METRICS["accuracy"](golds, preds, None) == pytest.approx(2 / 3)


# --- Properties: every metric equals scikit-learn's ------------------------------------------

labels = st.lists(st.integers(-1, 3), max_size=30)
binary_labels = st.lists(st.integers(0, 1), max_size=30)

SKLEARN = {
    "accuracy": skm.accuracy_score,
    "precision": skm.precision_score,
    "recall": skm.recall_score,
    "f1": skm.f1_score,
    "fbeta": lambda g, p: skm.fbeta_score(g, p, beta=1.0),
    "f1_micro": lambda g, p: skm.f1_score(g, p, average="micro"),
    "f1_macro": lambda g, p: skm.f1_score(g, p, average="macro"),
    "matthews_corrcoef": skm.matthews_corrcoef,
}


def _assert_matches_sklearn(metric, golds, preds, **kwargs):
    golds, preds = np.array(golds, dtype=int), np.array(preds, dtype=int)
    if golds.size == 0:
        assert np.isnan(_ours(golds, preds, None, metric, **kwargs))
        return
    try:
        expected = _sklearn(SKLEARN[metric], golds, preds, **kwargs)
    except ValueError:
        with pytest.raises(ValueError):
            metric_score(golds, preds, None, metric, **kwargs)
        return
    np.testing.assert_allclose(_ours(golds, preds, None, metric, **kwargs), expected, atol=TOL)


@settings(max_examples=50, deadline=None)
@given(st.data(), st.sampled_from(sorted(SKLEARN)))
def test_hard_metrics_match_sklearn(data, metric):
    # Binary metrics on labels that are mostly binary; others on multiclass with -1.
    pool = binary_labels if metric in ("precision", "recall", "f1", "fbeta") else labels
    golds = data.draw(pool)
    preds = data.draw(
        st.lists(
            st.integers(-1, 3) if data.draw(st.booleans()) else st.integers(0, 1),
            min_size=len(golds),
            max_size=len(golds),
        )
    )
    _assert_matches_sklearn(metric, golds, preds)


@settings(max_examples=50, deadline=None)
@given(binary_labels, st.sampled_from([0, 1]), st.sampled_from([0.0, 0.5, 2.0]))
def test_binary_metrics_one_class_and_options(golds, pos_label, beta):
    # Predictions identical to golds: one-class inputs are common here.
    preds = golds[::-1]
    for metric in ("precision", "recall", "f1"):
        _assert_matches_sklearn(metric, golds, preds, pos_label=pos_label)
    golds_arr, preds_arr = np.array(golds, int), np.array(preds, int)
    if golds_arr.size:
        expected = _sklearn(skm.fbeta_score, golds_arr, preds_arr, beta=beta, pos_label=pos_label)
        ours = _ours(golds_arr, preds_arr, None, "fbeta", beta=beta, pos_label=pos_label)
        np.testing.assert_allclose(ours, expected, atol=TOL)


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_filter_dict_matches_sklearn_on_filtered(data):
    golds = np.array(data.draw(labels), dtype=int)
    preds = np.array(
        data.draw(st.lists(st.integers(-1, 3), min_size=golds.size, max_size=golds.size)), dtype=int
    )
    drop_golds = data.draw(st.lists(st.integers(-1, 3), max_size=2))
    drop_preds = data.draw(st.lists(st.integers(-1, 3), max_size=2))
    keep = ~np.isin(golds, drop_golds) & ~np.isin(preds, drop_preds)
    filter_dict = {"golds": drop_golds, "preds": drop_preds}
    for metric in ("accuracy", "f1_macro", "matthews_corrcoef"):
        ours = _ours(golds, preds, None, metric, filter_dict=filter_dict)
        if keep.any():
            expected = _sklearn(SKLEARN[metric], golds[keep], preds[keep])
            np.testing.assert_allclose(ours, expected, atol=TOL)
        else:
            assert np.isnan(ours)
    coverage = _ours(golds, preds, None, "coverage", filter_dict=filter_dict)
    expected = np.mean(preds[keep] != -1) if keep.any() else np.nan
    np.testing.assert_allclose(coverage, expected)


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_roc_auc_matches_sklearn(data):
    golds = np.array(data.draw(binary_labels), dtype=int)
    # Few distinct scores so that ties are frequent.
    scores = np.array(
        data.draw(
            st.lists(
                st.sampled_from([0.0, 0.1, 0.5, 0.5000001, 0.9, 1.0]),
                min_size=golds.size,
                max_size=golds.size,
            )
        )
    )
    probs = np.stack([1 - scores, scores], axis=1)
    ours = _ours(golds, None, probs, "roc_auc")
    if np.unique(golds).size < 2:
        assert np.isnan(ours)
    else:
        np.testing.assert_allclose(ours, _sklearn(skm.roc_auc_score, golds, scores), atol=TOL)
