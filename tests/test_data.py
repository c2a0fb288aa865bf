import numpy as np
import pytest

from jaxmtl import Batch, DictDataLoader, DictDataset


def make_dataset(n=10, split="train"):
    X = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    Y = np.arange(n) % 3
    soft = np.tile([[0.25, 0.75]], (n, 1))
    return DictDataset("synthetic", split, {"x": X}, {"task_a": Y, "task_b": soft})


def test_dataset_basics():
    ds = make_dataset()
    assert len(ds) == 10
    assert repr(ds) == "DictDataset(name=synthetic, X_keys=['x'], Y_keys=['task_a', 'task_b'])"
    x, y = ds[3]
    np.testing.assert_array_equal(x["x"], [6.0, 7.0])
    assert y["task_a"] == 0
    np.testing.assert_allclose(y["task_b"], [0.25, 0.75])
    assert ds.X_dict["x"].dtype == np.float32 and ds.Y_dict["task_a"].dtype == np.int32


def test_from_tensors():
    ds = DictDataset.from_tensors(np.ones((4, 3)), np.array([0, 1, 1, 0]), "valid")
    assert (ds.name, ds.split) == ("default_dataset", "valid")
    assert list(ds.X_dict) == ["input_data"] and list(ds.Y_dict) == ["task"]


def test_ragged_inputs_are_zero_padded_to_dataset_max():
    ds = DictDataset("d", "train", {"tokens": [np.array([1, 2, 3]), np.array([4])]},
                     {"t": np.array([0, 1])})
    np.testing.assert_array_equal(ds.X_dict["tokens"], [[1, 2, 3], [4, 0, 0]])


@pytest.mark.parametrize(
    "X, Y, message",
    [
        ({"x": np.ones((3, 2))}, {"t": np.array([0, 1])}, "different lengths"),
        ({"x": np.array([[1.0], [np.nan]])}, {"t": np.array([0, 1])}, "non-finite value"),
        ({"x": np.ones((2, 1))}, {"t": np.array([[0.5, 0.6], [1.0, 0.0]])}, "row 0 sums to 1.1"),
        ({"x": np.ones((0, 2))}, {"t": np.zeros(0, dtype=int)}, "empty"),
        ({"x": np.ones((2, 1))}, {"t": np.array([0, -2])}, ">= -1"),
        ({"x": np.ones((2, 1))}, {"t": np.array([0.5, 1.0])}, "must be integers"),
        ({"x": np.array(["a", "b"])}, {"t": np.array([0, 1])}, "not numeric"),
        ({"x": np.ones((2, 1))}, {"t": np.ones((2, 2, 2))}, r"expected \[N\] ints"),
    ],
)
def test_dataset_errors(X, Y, message):
    with pytest.raises(ValueError, match=message):
        DictDataset("d", "train", X, Y)


def test_soft_labels_within_tolerance_and_unlabelled_rows_accepted():
    soft = np.array([[0.5, 0.5005], [-1.0, -1.0]])
    ds = DictDataset("d", "train", {"x": np.ones((2, 1))}, {"t": soft})
    assert ds.Y_dict["t"].shape == (2, 2)


def test_loader_pads_last_batch_and_masks_it():
    dl = DictDataLoader(make_dataset(10), batch_size=4)
    batches = list(dl)
    assert len(dl) == 3 and len(batches) == 3
    assert all(isinstance(b, Batch) for b in batches)
    for X, Y in batches:
        assert X["x"].shape == (4, 2) and Y["task_a"].shape == (4,)
        assert Y["task_b"].shape == (4, 2)
    last = batches[-1]
    np.testing.assert_array_equal(last.mask, [True, True, False, False])
    assert last.num_valid == 2
    np.testing.assert_array_equal(last[1]["task_a"], [2, 0, -1, -1])
    np.testing.assert_array_equal(last[1]["task_b"][2:], -1.0)
    # Unshuffled: rows in order, every row exactly once.
    seen = np.concatenate([b[0]["x"][b.mask, 0] for b in batches])
    np.testing.assert_array_equal(seen, np.arange(10) * 2)


def test_loader_drop_last():
    dl = DictDataLoader(make_dataset(10), batch_size=4, drop_last=True)
    assert len(dl) == 2 and len(list(dl)) == 2
    with pytest.raises(ValueError, match="would yield no batch"):
        DictDataLoader(make_dataset(3), batch_size=4, drop_last=True)


def test_loader_shuffle_is_a_function_of_seed_and_epoch():
    ds = make_dataset(50)
    first = DictDataLoader(ds, batch_size=8, shuffle=True, seed=7)
    second = DictDataLoader(ds, batch_size=8, shuffle=True, seed=7)
    epoch0 = [b[0]["x"][:, 0] for b in first]
    epoch1 = [b[0]["x"][:, 0] for b in first]
    np.testing.assert_array_equal(np.concatenate(epoch0), np.concatenate([b[0]["x"][:, 0] for b in second]))
    assert not np.array_equal(np.concatenate(epoch0), np.concatenate(epoch1))
    order = first.order(0)
    np.testing.assert_array_equal(np.sort(order), np.arange(50))
    first.set_epoch(1)
    np.testing.assert_array_equal(np.concatenate([b[0]["x"][:, 0] for b in first]), np.concatenate(epoch1))


def test_loader_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        DictDataLoader(make_dataset(), batch_size=0)
