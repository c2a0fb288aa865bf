"""jaxmtl.evaluation: padding removal, macro averages and label -> task mapping."""

from types import SimpleNamespace

import numpy as np

from jaxmtl.evaluation import drop_padding, labels_to_tasks, macro_averages


def test_drop_padding_keeps_each_blocks_valid_rows():
    rows = np.arange(16).reshape(8, 2)
    np.testing.assert_array_equal(drop_padding(rows, [4, 2]),
                                  [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]])
    assert drop_padding(rows, [4, 4]) is rows  # nothing padded: no copy


def test_macro_averages_per_split_and_metric_skip_nan():
    averages = macro_averages({"a/d/valid/accuracy": 1.0, "b/e/valid/accuracy": 0.5,
                               "a/d/test/accuracy": 0.25, "a/d/valid/roc_auc": float("nan")})
    assert averages.keys() == {"model/all/valid/accuracy", "model/all/test/accuracy",
                               "model/all/valid/roc_auc"}
    assert averages["model/all/valid/accuracy"] == 0.75
    assert averages["model/all/test/accuracy"] == 0.25
    assert np.isnan(averages["model/all/valid/roc_auc"])


def test_labels_to_tasks_follows_the_remap_and_drops_labels_without_a_task():
    graph = SimpleNamespace(op_sequences={"task_a": (), "task_b": ()})
    mapping = labels_to_tasks(graph, ["task_a", "slice_x", "other", "task_b"],
                              {"slice_x": "task_a", "task_b": None})
    assert mapping == {"task_a": "task_a", "slice_x": "task_a"}
