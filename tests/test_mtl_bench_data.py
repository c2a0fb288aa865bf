"""The data loaders of ``python -m benchmarks.mtl``: shapes, label ranges, fixed splits."""

import numpy as np
import pytest

from benchmarks import data_synthetic
from benchmarks.data_splits import hide_labels, package_file

SPLIT_SIZES = {"train": 1451, "valid": 483, "test": 483}


def _check(data, n_features, sizes):
    assert set(data.splits) == {"train", "valid", "test"}
    for split, (X, labels) in data.splits.items():
        assert X.dtype == np.float32 and X.shape == (sizes[split], n_features)
        assert np.isfinite(X).all()
        assert list(labels) == data.task_names
        for task, y in labels.items():
            assert y.shape == (sizes[split],) and y.dtype == np.int64
            assert y.min() >= 0 and y.max() == data.num_classes[task] - 1


def test_digits_pairs():
    pytest.importorskip("sklearn")
    from benchmarks import data_digits

    images, digits = data_digits.read_digits()
    assert images.shape == (1797, 8, 8) and images.max() == 16.0
    np.testing.assert_array_equal(np.bincount(digits)[:3], [178, 182, 177])
    data = data_digits.load(n_train=300, n_eval=50, shift=4)
    _check(data, 96, {"train": 300, "valid": 50, "test": 50})
    assert data.num_classes == {"left": 10, "right": 10}
    # Side by side (shift 8): the canvas is the two images, unchanged.
    pair = data_digits.overlap_pairs(images, np.array([3]), np.array([5]), shift=8)
    np.testing.assert_array_equal(pair.reshape(8, 16), np.hstack([images[3], images[5]]) / 16)
    np.testing.assert_array_equal(data.splits["test"][0],
                                  data_digits.load(n_train=300, n_eval=50).splits["test"][0])


def test_yeast_and_partial_labels():
    pytest.importorskip("river")
    from benchmarks import data_yeast

    X, Y = data_yeast.read_yeast()
    assert X.shape == (2417, 103) and Y.shape == (2417, 14)
    assert set(np.unique(Y)) == {0, 1}
    data = data_yeast.load()
    _check(data, 103, SPLIT_SIZES)
    np.testing.assert_allclose(data.splits["train"][0].mean(0), 0.0, atol=1e-4)
    partial = data_yeast.load_partial()
    for task, y in partial.splits["train"][1].items():
        full = data.splits["train"][1][task]
        assert (y == -1).sum() == round(0.5 * len(y))          # 726 of 1451 per task
        np.testing.assert_array_equal(y[y >= 0], full[y >= 0])  # the rest untouched
    np.testing.assert_array_equal(partial.splits["test"][1]["c1"], data.splits["test"][1]["c1"])


def test_synthetic_scales_and_balanced_classes():
    data = data_synthetic.load(n_train=400, n_eval=100)
    _check(data, 32, {"train": 400, "valid": 100, "test": 100})
    assert data.loss_scale == {"t1": 1.0, "t2": 10.0, "t3": 100.0, "t4": 1000.0}
    for y in data.splits["train"][1].values():
        np.testing.assert_array_equal(np.bincount(y), [100, 100, 100, 100])  # quantile bins


def test_hide_labels_rejects_bad_fraction_and_missing_file_is_named():
    data = data_synthetic.load(n_train=40, n_eval=10)
    with pytest.raises(ValueError, match=r"fraction=1.0: expected a value in \[0, 1\)"):
        hide_labels(data, 1.0, 0)
    with pytest.raises(ModuleNotFoundError, match="'no_such_pkg_xyz' is not installed"):
        package_file("no_such_pkg_xyz", "data.csv")
    with pytest.raises(FileNotFoundError, match="numpy has no 'nothing.csv'"):
        package_file("numpy", "nothing.csv")
