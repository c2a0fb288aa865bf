import logging
import re
import threading
import time

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


def test_empty_rows_of_a_variable_length_input_are_kept_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="jaxmtl.data"):
        ds = DictDataset("d", "train", {"tokens": [np.array([1, 2]), np.array([], np.int32),
                                                   np.array([3]), np.array([], np.int32)]},
                         {"t": np.array([0, 1, 0, 1])})
    np.testing.assert_array_equal(ds.lengths["tokens"], [2, 0, 1, 0])
    np.testing.assert_array_equal(ds.X_dict["tokens_mask"].sum(axis=1), [2, 0, 1, 0])
    assert "2 row(s) of X_dict['tokens'] are empty (first: row 1)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxmtl.data"):
        DictDataset("d", "train", {"tokens": [np.array([1, 2]), np.array([3])]},
                    {"t": np.array([0, 1])})
    assert caplog.text == ""


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
        ({"x": np.ones((2, 1))}, {"t": np.array([True, False])},
         r"labels of dtype bool are not numeric; use labels.astype\(int\)"),
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


# --- no silent corruption of inputs and labels ---------------------------------------------
@pytest.mark.parametrize(
    "X, Y, message",
    [
        # float64 beyond float32's range would become inf in the float32 cast.
        ({"x": np.array([[1.0], [1e300]])}, {"t": np.array([0, 1])},
         r"X_dict\['x'\]: value 1e\+300 at row 1 overflows float32 \(largest 3.40282e\+38\)"),
        ({"x": np.array([[1.0], [np.inf]])}, {"t": np.array([0, 1])},
         r"X_dict\['x'\]: non-finite value \(inf\) at row 1"),
        # 2**31 and -2**31 - 1 would wrap to -2**31 and 2**31 - 1 in int32.
        ({"ids": np.array([3, 2**31], np.int64)}, {"t": np.array([0, 1])},
         r"X_dict\['ids'\]: value 2147483648 at row 1 is outside int32's range"),
        ({"ids": np.array([-(2**31) - 1, 0], np.int64)}, {"t": np.array([0, 1])},
         r"X_dict\['ids'\]: value -2147483649 at row 0 is outside int32's range"),
        ({"ids": np.array([0, 2**63], np.uint64)}, {"t": np.array([0, 1])},
         r"X_dict\['ids'\]: value 9223372036854775808 at row 1 is outside int32's range"),
        ({"x": np.ones((2, 1))}, {"t": np.array([0, 2**32 + 1], np.int64)},
         r"Y_dict\['t'\]: value 4294967297 at row 1 is outside int32's range"),
        ({"x": np.ones((2, 1))}, {"t": np.array([[0], [1]])},
         r"Y_dict\['t'\]: shape \(2, 1\) \(a \[N, 1\] column\) looks like a column of hard "
         r"labels; pass y.ravel\(\) \(\[N\] ints\) or \[N, K\] probabilities"),
        # K=1 "probabilities" are rejected the same way: a classifier needs K >= 2.
        ({"x": np.ones((2, 1))}, {"t": np.array([[1.0], [1.0]])}, r"shape \(2, 1\)"),
    ],
)
def test_dataset_rejects_values_that_would_be_corrupted(X, Y, message):
    with pytest.raises(ValueError, match=message):
        DictDataset("d", "train", X, Y)


def test_in_range_int64_becomes_int32_with_the_same_values():
    ids = np.array([-(2**31), 5, 2**31 - 1], np.int64)
    ds = DictDataset("d", "train", {"ids": ids}, {"t": np.array([0, 1, 2], np.uint64)})
    assert ds.X_dict["ids"].dtype == np.int32 and ds.Y_dict["t"].dtype == np.int32
    np.testing.assert_array_equal(ds.X_dict["ids"], ids)
    big = np.array([1e38, -3e38])  # within float32's range: kept (rounded to float32)
    x = DictDataset("d", "train", {"x": big}, {"t": np.array([0, 1])}).X_dict["x"]
    np.testing.assert_array_equal(x, big.astype(np.float32))


def test_out_of_range_int64_kept_when_x64_is_enabled():
    import jax

    ids = np.array([3, 2**40], np.int64)
    labels = np.array([0, 2**33], np.int64)
    with jax.enable_x64(True):
        ds = DictDataset("d", "train", {"ids": ids}, {"t": labels})
    assert ds.X_dict["ids"].dtype == np.int64 and ds.Y_dict["t"].dtype == np.int64
    np.testing.assert_array_equal(ds.X_dict["ids"], ids)
    np.testing.assert_array_equal(ds.Y_dict["t"], labels)


@pytest.mark.parametrize(
    "name, split, labels, message",
    [
        ("a/b", "train", "t", r"DictDataset 'a/b' \(train\): name 'a/b' must be a string "
                              r"without '/' \(metric keys are 'task/dataset/split/metric'\)"),
        ("d", "train/1", "t", r"DictDataset 'd' \(train/1\): split 'train/1' must be a string "
                              r"without '/'"),
        ("d", "train", "t/x", r"DictDataset 'd' \(train\): label names \['t/x'\] contain '/'"),
    ],
)
def test_names_with_slash_rejected(name, split, labels, message):
    with pytest.raises(ValueError, match=message):
        DictDataset(name, split, {"x": np.ones((2, 1))}, {labels: np.array([0, 1])})

# --- torch DataLoader keywords, background preparation, seeds -------------------------

def _loader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("jaxmtl-DictDataLoader")]


def _flatten(batches):
    return [(b[0], b[1], b.mask) for b in batches]


def _assert_same_batches(expected, actual):
    assert len(expected) == len(actual)
    for (X0, Y0, m0), (X1, Y1, m1) in zip(expected, actual, strict=True):
        np.testing.assert_array_equal(m0, m1)
        for key in X0:
            np.testing.assert_array_equal(X0[key], X1[key])
        for key in Y0:
            np.testing.assert_array_equal(Y0[key], Y1[key])


@pytest.mark.parametrize("num_workers, prefetch_factor", [(1, None), (3, 1), (2, 4)])
def test_workers_yield_the_same_batches_in_the_same_order(num_workers, prefetch_factor):
    ds = make_dataset(23)
    plain = DictDataLoader(ds, batch_size=4, shuffle=True, seed=3)
    background = DictDataLoader(ds, batch_size=4, shuffle=True, seed=3,
                                num_workers=num_workers, prefetch_factor=prefetch_factor)
    for _ in range(2):  # two epochs: different permutations, same on both loaders
        _assert_same_batches(_flatten(plain), _flatten(background))
    assert background.epoch == 2
    assert _loader_threads() == []


def test_stopping_early_joins_the_worker_threads():
    dl = DictDataLoader(make_dataset(40), batch_size=2, num_workers=2, prefetch_factor=3)
    iterator = iter(dl)
    first = next(iterator)
    np.testing.assert_array_equal(first[0]["x"][:, 0], [0, 2])
    assert len(_loader_threads()) >= 1  # preparing batches ahead
    iterator.close()
    assert _loader_threads() == []
    for index, _batch in enumerate(dl):  # a `for` that breaks drops its iterator
        if index == 1:
            break
    assert _loader_threads() == []


def test_worker_error_reaches_the_consumer_and_threads_end(monkeypatch):
    dl = DictDataLoader(make_dataset(10), batch_size=2, num_workers=2)
    original = DictDataLoader.batch_at

    def failing(self, order, index):
        if index == 3:
            raise KeyError("boom")
        return original(self, order, index)

    monkeypatch.setattr(DictDataLoader, "batch_at", failing)
    seen = []
    with pytest.raises(KeyError, match="boom"):
        for batch in dl:
            seen.append(batch.num_valid)
    assert seen == [2, 2, 2]
    assert _loader_threads() == []


def test_timeout_raises_runtime_error(monkeypatch):
    dl = DictDataLoader(make_dataset(4), batch_size=2, num_workers=1, timeout=0.01)
    original = DictDataLoader.batch_at

    def slow(self, order, index):
        time.sleep(0.2)
        return original(self, order, index)

    monkeypatch.setattr(DictDataLoader, "batch_at", slow)
    with pytest.raises(RuntimeError, match=r"DictDataLoader timed out after 0.01 seconds"):
        list(dl)
    assert _loader_threads() == []


def test_accepted_torch_keywords_change_nothing():
    ds = make_dataset(9)
    plain = _flatten(DictDataLoader(ds, batch_size=4))
    dl = DictDataLoader(ds, batch_size=4, num_workers=2, prefetch_factor=2, pin_memory=True,
                        persistent_workers=True, timeout=5, multiprocessing_context="spawn",
                        pin_memory_device="cuda", in_order=False)
    _assert_same_batches(plain, _flatten(dl))
    assert (dl.num_workers, dl.prefetch_factor, dl.pin_memory, dl.timeout) == (2, 2, True, 5.0)


@pytest.mark.parametrize("keyword", ["collate_fn", "sampler", "batch_sampler", "worker_init_fn"])
def test_unsupported_torch_keywords_explain_what_to_use(keyword):
    with pytest.raises(ValueError) as info:
        DictDataLoader(make_dataset(), **{keyword: object()})
    message = str(info.value)
    assert message.startswith(f"DictDataLoader: {keyword}=<object object at ")
    assert "is not supported: jaxmtl batches are fixed-shape dicts of numpy arrays" in message
    assert "padded with repeats of its rows and masked" in message


def test_snorkel_positional_collate_fn_is_named():
    with pytest.raises(ValueError, match="DictDataLoader: collate_fn=<function"):
        DictDataLoader(make_dataset(), lambda batch: batch)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_workers": -1}, "num_workers must be an int >= 0, got -1"),
        ({"num_workers": True}, "num_workers must be an int >= 0, got True"),
        ({"prefetch_factor": 2}, "prefetch_factor=2 needs num_workers > 0"),
        ({"num_workers": 1, "prefetch_factor": 0}, "prefetch_factor must be an int >= 1, got 0"),
        ({"persistent_workers": True}, "persistent_workers=True needs num_workers > 0"),
        ({"timeout": -1}, "timeout must be a number of seconds >= 0, got -1"),
        ({"seed": -3}, "seed must be an int >= 0, got -3"),
        ({"generator": np.random.default_rng(0)}, "generator must be a torch.Generator"),
    ],
)
def test_loader_keyword_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(f"DictDataLoader: {message}")):
        DictDataLoader(make_dataset(), **kwargs)


class _TorchLikeGenerator:
    def __init__(self, seed):
        self._seed = seed

    def initial_seed(self):
        return self._seed


def test_generator_initial_seed_is_the_seed():
    ds = make_dataset(30)
    from_generator = DictDataLoader(ds, batch_size=4, shuffle=True,
                                    generator=_TorchLikeGenerator(11))
    assert (from_generator.seed, from_generator.seed_given) == (11, True)
    np.testing.assert_array_equal(from_generator.order(0),
                                  DictDataLoader(ds, shuffle=True, seed=11).order(0))
    with pytest.raises(ValueError, match="seed=12 and generator \\(initial_seed 11\\) disagree"):
        DictDataLoader(ds, seed=12, generator=_TorchLikeGenerator(11))


def test_derive_seed_only_replaces_a_drawn_seed():
    ds = make_dataset(30)
    drawn = DictDataLoader(ds, shuffle=True)
    assert drawn.seed_given is False
    expected = int(np.random.SeedSequence((5, 1)).generate_state(1)[0])
    assert drawn.derive_seed(5, 1) == expected == drawn.seed
    # Deterministic in (trainer seed, loader index); another index gives another seed.
    other = DictDataLoader(ds, shuffle=True)
    assert other.derive_seed(5, 1) == expected and other.derive_seed(5, 0) != expected
    assert drawn.derive_seed(6, 1) != expected  # a later fit with another seed re-derives
    given = DictDataLoader(ds, shuffle=True, seed=0)
    assert given.seed_given is True
    assert given.derive_seed(5, 1) == 0 == given.seed
