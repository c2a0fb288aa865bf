"""Tests for jaxmtl.analysis.scorer: Snorkel's Scorer cases, then a scikit-learn reference."""

import warnings

import numpy as np
import pandas as pd
import pytest
import sklearn.metrics as skm
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxmtl.analysis import Scorer, metrics_dict_to_dataframe

TOL = 1e-12


def _labels():
    golds = np.array([1, 0, 1, 0, 1])
    preds = np.array([1, 0, 1, 1, 0])
    probs = np.array([0.8, 0.6, 0.9, 0.7, 0.4])
    return golds, preds, probs


# --- Snorkel's test_scorer, re-expressed ---------------------------------------------------


def test_scorer():
    def pred_sum(golds, preds, probs):
        return np.sum(preds)

    scorer = Scorer(metrics=["accuracy", "f1"], custom_metric_funcs=dict(pred_sum=pred_sum))
    assert scorer.score(*_labels()) == pytest.approx(dict(accuracy=0.6, f1=2 / 3, pred_sum=3))


def test_dict_metric():
    def dict_metric(golds, preds, probs):
        return dict(a=1, b=2)

    scorer = Scorer(custom_metric_funcs=dict(dict_metric=dict_metric))
    assert scorer.score(*_labels()) == dict(a=1, b=2)


def test_a_custom_metric_that_is_not_a_number_is_named():
    golds, preds = np.array([0, 1, 1]), np.array([0, 1, 0])
    scorer = Scorer(custom_metric_funcs={"nothing": lambda g, p, pr: None})
    with pytest.raises(ValueError, match=r"^Scorer: custom metric nothing returned None; a "
                       r"custom metric returns a number, or a dict of numbers$"):
        scorer.score(golds, preds, None)
    scorer = Scorer(custom_metric_funcs={
        "pair": lambda g, p, pr: {"hits": np.int64((g == p).sum()), "rows": np.array([3])}})
    with pytest.raises(ValueError, match=r"custom metric pair\['rows'\] returned array\(\[3\]\)"):
        scorer.score(golds, preds, None)
    # Numbers of any numpy kind come back as floats.
    scorer = Scorer(custom_metric_funcs={"hits": lambda g, p, pr: np.int64((g == p).sum())})
    assert scorer.score(golds, preds, None) == {"hits": 2.0}


def test_invalid_metric():
    with pytest.raises(ValueError, match=r"^Unrecognized metric: f2; the metrics are "
                       r"\['accuracy', 'coverage', 'f1', .*'roc_auc'\]; pass your own in "
                       r"custom_metric_funcs$"):
        Scorer(metrics=["accuracy", "f2"])


def test_no_metrics():
    assert Scorer().score(*_labels()) == {}


def test_no_labels():
    with pytest.raises(ValueError, match="Cannot score"):
        Scorer().score([], [], [])


@pytest.mark.parametrize("abstain_label, expected", [(None, 0.6), (-1, 0.75), (10, 0.6)])
def test_abstain_labels(abstain_label, expected):
    # The last example is an abstain by convention (label=-1).
    golds = np.array([1, 0, 1, 0, -1])
    preds = np.array([1, 0, 1, 1, 0])
    probs = np.array([0.8, 0.6, 0.9, 0.7, 0.4])
    scorer = Scorer(metrics=["accuracy"], abstain_label=abstain_label)
    assert scorer.score(golds, preds, probs) == pytest.approx(dict(accuracy=expected))


def test_score_slices():
    # Slice "sf" holds the first three points (Snorkel's x.num < 20 on [5, 10, 19, 22, 25]).
    S = np.rec.fromarrays([np.array([1, 1, 1, 0, 0])], names="sf")
    golds = np.array([0, 1, 0, 1, 0])
    preds = np.array([0, 0, 0, 0, 0])
    probs = np.eye(2)[preds]
    scorer = Scorer(metrics=["accuracy"])

    assert scorer.score(golds=golds, preds=preds, probs=probs)["accuracy"] == pytest.approx(0.6)
    slice_metrics = scorer.score_slices(S=S, golds=golds, preds=preds, probs=probs)
    assert slice_metrics["overall"]["accuracy"] == pytest.approx(0.6)
    assert slice_metrics["sf"]["accuracy"] == pytest.approx(2 / 3)

    metrics_df = scorer.score_slices(S=S, golds=golds, preds=preds, probs=probs, as_dataframe=True)
    assert isinstance(metrics_df, pd.DataFrame)
    assert metrics_df["accuracy"]["overall"] == pytest.approx(0.6)
    assert metrics_df["accuracy"]["sf"] == pytest.approx(2 / 3)

    with pytest.raises(ValueError, match="must have the same number of elements"):
        scorer.score_slices(S=S, golds=golds[:1], preds=preds, probs=probs, as_dataframe=True)


def test_score_slices_dict_and_dataframe_slices():
    golds, preds, probs = _labels()
    scorer = Scorer(metrics=["accuracy"])
    masks = {"first": np.array([1, 1, 0, 0, 0], bool), "last": np.array([0, 0, 0, 1, 1], bool)}
    from_dict = scorer.score_slices(masks, golds, preds, probs)
    from_frame = scorer.score_slices(pd.DataFrame(masks), golds, preds, probs)
    assert from_dict == from_frame
    assert from_dict["first"]["accuracy"] == 1.0
    assert from_dict["last"]["accuracy"] == 0.0
    with pytest.raises(ValueError, match="structured array"):
        scorer.score_slices(np.ones(5), golds, preds, probs)


# --- jaxmtl additions ----------------------------------------------------------------------


def test_all_metrics_one_pass():
    golds, preds, probs = _labels()
    names = [
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
    scores = Scorer(metrics=names).score(golds, preds, np.stack([1 - probs, probs], axis=1))
    assert list(scores) == names
    expected = {
        "accuracy": 0.6,
        "coverage": 1.0,
        "precision": 2 / 3,
        "recall": 2 / 3,
        "f1": 2 / 3,
        "f1_micro": 0.6,
        "f1_macro": skm.f1_score(golds, preds, average="macro"),
        "fbeta": 2 / 3,
        "matthews_corrcoef": skm.matthews_corrcoef(golds, preds),
        "roc_auc": skm.roc_auc_score(golds, probs),
    }
    assert scores == pytest.approx(expected, abs=TOL)


def test_coverage_counts_every_point():
    # Snorkel's Scorer gives coverage no filter: abstaining golds and preds both count.
    golds = np.array([-1, 0, 1, 1])
    preds = np.array([0, -1, 1, -1])
    scores = Scorer(metrics=["coverage", "accuracy"]).score(golds, preds, None)
    assert scores == pytest.approx({"coverage": 0.5, "accuracy": 1.0})


def test_soft_golds():
    soft = np.array([[0.9, 0.1], [0.3, 0.7], [-1.0, -1.0], [0.2, 0.8]])
    preds = np.array([0, 1, 1, 0])
    seen = {}

    def record(golds, preds, probs):
        seen["golds"] = golds
        return 0.0

    scores = Scorer(["accuracy"], custom_metric_funcs={"record": record}).score(soft, preds)
    assert scores["accuracy"] == pytest.approx(2 / 3)  # the all -1 row is an abstain
    np.testing.assert_array_equal(seen["golds"], [0, 1, -1, 1])


def test_nan_when_everything_abstains():
    golds = np.array([-1, -1, -1])
    preds = np.array([0, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = Scorer(["accuracy", "f1", "roc_auc", "coverage"]).score(
            golds, preds, np.array([0.1, 0.6, 0.9])
        )
    assert np.isnan(scores["accuracy"]) and np.isnan(scores["f1"]) and np.isnan(scores["roc_auc"])
    assert scores["coverage"] == 1.0


def test_missing_inputs():
    golds, preds, probs = _labels()
    with pytest.raises(ValueError, match="roc_auc requires access to probs"):
        Scorer(["accuracy", "roc_auc"]).score(golds, preds)
    with pytest.raises(ValueError, match="accuracy requires access to preds"):
        Scorer(["accuracy"]).score(golds, None, probs)
    # A metric that does not need preds works without them.
    assert Scorer(["roc_auc"]).score(golds, None, probs) == pytest.approx({"roc_auc": 4 / 6})
    with pytest.raises(ValueError, match="5 golds but 4 preds"):
        Scorer(["accuracy"]).score(golds, preds[:4])


def test_custom_overrides_standard_in_place():
    scorer = Scorer(["accuracy", "f1"], custom_metric_funcs={"accuracy": lambda g, p, s: -1.0})
    assert list(scorer.score(*_labels()).items()) == [
        ("accuracy", -1.0),
        ("f1", pytest.approx(2 / 3)),
    ]


def test_metrics_dict_to_dataframe():
    frame = metrics_dict_to_dataframe(
        {"task/ds/valid/accuracy": 0.5, "task2/ds/test/custom/sub": 1.0}
    )
    assert list(frame.columns) == ["label", "dataset", "split", "metric", "score"]
    assert frame.values.tolist() == [
        ["task", "ds", "valid", "accuracy", 0.5],
        ["task2", "ds", "test", "custom/sub", 1.0],
    ]
    assert metrics_dict_to_dataframe({}).empty
    with pytest.raises(ValueError, match="label/dataset/split/metric"):
        metrics_dict_to_dataframe({"accuracy": 0.5})


# --- Property: Scorer equals scikit-learn on the abstain-filtered points -------------------


def _reference(golds, preds, scores, abstain_label):
    keep = np.ones(golds.size, bool)
    if abstain_label is not None:
        keep = (golds != abstain_label) & (preds != abstain_label)
    g, p, s = golds[keep], preds[keep], scores[keep]
    expected = {"coverage": np.mean(preds != -1)}
    if g.size == 0:
        return expected | dict.fromkeys(
            ["accuracy", "f1_macro", "matthews_corrcoef", "roc_auc"], np.nan
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected |= {
            "accuracy": skm.accuracy_score(g, p),
            "f1_macro": skm.f1_score(g, p, average="macro"),
            "matthews_corrcoef": skm.matthews_corrcoef(g, p),
            "roc_auc": skm.roc_auc_score(g, s) if np.unique(g).size == 2 else np.nan,
        }
    return expected


@settings(max_examples=50, deadline=None)
@given(st.data(), st.sampled_from([-1, 0, None]))
def test_scorer_matches_sklearn(data, abstain_label):
    size = data.draw(st.integers(1, 30))
    golds = np.array(data.draw(st.lists(st.integers(-1, 1), min_size=size, max_size=size)))
    preds = np.array(data.draw(st.lists(st.integers(-1, 1), min_size=size, max_size=size)))
    scores = np.array(
        data.draw(st.lists(st.sampled_from([0.1, 0.4, 0.4, 0.9]), min_size=size, max_size=size))
    )
    if abstain_label is None or abstain_label == 0:
        # roc_auc needs golds in {0, 1} or {-1, 1} once abstains are gone.
        golds = np.abs(golds)
    scorer = Scorer(
        ["accuracy", "f1_macro", "matthews_corrcoef", "roc_auc", "coverage"],
        abstain_label=abstain_label,
    )
    try:
        ours = scorer.score(golds, preds, scores)
    except ValueError:
        # Only roc_auc may refuse: {-1, 0} golds are not a binary problem for scikit-learn.
        keep = (
            np.ones(size, bool)
            if abstain_label is None
            else ((golds != abstain_label) & (preds != abstain_label))
        )
        assert set(np.unique(golds[keep])) == {-1, 0}
        return
    expected = _reference(golds, preds, scores, abstain_label)
    assert ours.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(ours[name], value, atol=TOL, err_msg=name)
