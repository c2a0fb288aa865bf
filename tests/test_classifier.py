"""MultitaskClassifier: predict, score, remap_labels, calculate_loss, save/load."""

import jax
import numpy as np
import pandas as pd
import pytest
from conftest import make_task
from sklearn.metrics import accuracy_score

from jaxmtl import DictDataLoader, DictDataset, MultitaskClassifier, probs_to_preds


@pytest.fixture(scope="module")
def model():
    model = MultitaskClassifier([make_task("task1"), make_task("task2", ("A", "C"))])
    model.init({"data": np.zeros((4, 2), np.float32)})
    return model


def loader(n=10, batch_size=4, labels=None, name="ds", split="valid"):
    X = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
    labels = labels if labels is not None else {"task1": np.arange(n) % 2}
    return DictDataLoader(DictDataset(name, split, {"data": X}, labels), batch_size=batch_size)


def test_structure(model):
    assert model.task_names == ["task1", "task2"]
    assert [op.name for op in model.op_sequences["task2"]] == ["op1A", "reluA", "op2task2"]
    assert sorted(model.module_pool) == ["linear1A", "linear2B", "linear2C", "relu"]
    assert sorted(model.params) == ["linear1A", "linear2B", "linear2C"]
    assert model.variables["params"] is model.params


def test_lazy_init_and_seed():
    lazy = MultitaskClassifier([make_task("task1")], seed=3)
    assert lazy.params is None
    X = {"data": np.ones((2, 2), np.float32)}
    lazy.forward(X, ["task1"])
    explicit = MultitaskClassifier([make_task("task1")])
    explicit.init(X, seed=3)
    np.testing.assert_array_equal(lazy.params["linear1A"]["kernel"],
                                  explicit.params["linear1A"]["kernel"])


def test_forward_returns_op_outputs_and_inputs(model):
    X = {"data": np.ones((3, 2), np.float32)}
    outputs = model.forward(X, ["task1"])
    assert set(outputs) == {"_input_", "op1A", "reluA", "op2task1"}
    np.testing.assert_array_equal(outputs["_input_"]["data"], X["data"])


def test_predict_drops_padding_and_matches_forward(model):
    dl = loader(n=10, batch_size=4)
    results = model.predict(dl, return_preds=True)
    assert results["probs"]["task1"].shape == (10, 2)
    np.testing.assert_array_equal(results["golds"]["task1"], np.arange(10) % 2)
    logits = model.forward(dl.dataset.X_dict, ["task1"])["op2task1"]
    np.testing.assert_allclose(results["probs"]["task1"], jax.nn.softmax(logits), rtol=1e-5)
    np.testing.assert_array_equal(results["preds"]["task1"],
                                  probs_to_preds(results["probs"]["task1"]))
    assert "preds" not in model.predict(dl)


def test_score_matches_sklearn(model):
    dl = loader(n=10, batch_size=4)
    results = model.predict(dl, return_preds=True)
    expected = accuracy_score(results["golds"]["task1"], results["preds"]["task1"])
    assert model.score([dl]) == {
        "task1/ds/valid/accuracy": pytest.approx(expected),
        "model/all/valid/accuracy": pytest.approx(expected),
    }
    frame = model.score([dl], as_dataframe=True)
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == ["label", "dataset", "split", "metric", "score"]
    assert frame.iloc[0].tolist() == ["task1", "ds", "valid", "accuracy", pytest.approx(expected)]
    assert frame.iloc[1].tolist()[:4] == ["model", "all", "valid", "accuracy"]
    assert model.score(dl) == model.score([dl])  # one loader, as predict takes


def test_score_ignores_unlabelled_rows_and_soft_golds(model):
    golds = np.array([0, 1, -1, -1, 1, 0])
    dl = loader(n=6, labels={"task1": golds})
    preds = model.predict(dl, return_preds=True)["preds"]["task1"]
    keep = golds != -1
    expected = np.mean(preds[keep] == golds[keep])
    assert model.score([dl])["task1/ds/valid/accuracy"] == pytest.approx(expected)
    soft = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    dl_soft = loader(n=3, labels={"task2": soft})
    preds2 = model.predict(dl_soft, return_preds=True)["preds"]["task2"]
    assert model.score([dl_soft])["task2/ds/valid/accuracy"] == pytest.approx(
        np.mean(preds2 == np.array([0, 1, 0])))


def test_remap_labels(model):
    dl = loader(n=8, labels={"task1": np.arange(8) % 2, "other": np.ones(8, int)})
    assert set(model.score([dl])) == {"task1/ds/valid/accuracy", "model/all/valid/accuracy"}
    remapped = model.score([dl], remap_labels={"other": "task2"})
    assert set(remapped) == {"task1/ds/valid/accuracy", "other/ds/valid/accuracy",
                             "model/all/valid/accuracy"}
    np.testing.assert_allclose(
        remapped["model/all/valid/accuracy"],
        (remapped["task1/ds/valid/accuracy"] + remapped["other/ds/valid/accuracy"]) / 2)
    probs = model.predict(dl, remap_labels={"other": "task2"})["probs"]
    task2_probs = model.predict(loader(n=8, labels={"task2": np.ones(8, int)}))["probs"]["task2"]
    np.testing.assert_allclose(probs["other"], task2_probs)
    assert model.score([dl], remap_labels={"task1": None}) == {}
    # A target that is no task (a typo) is an error, as Snorkel's KeyError; it used to
    # drop the label set from the scores with an INFO line.
    with pytest.raises(ValueError, match=r"^remap_labels maps label 'other' to 'taks2', which "
                       r"is not a task of the model; the tasks are \['task1', 'task2'\]"):
        model.score([dl], remap_labels={"other": "taks2"})
    with pytest.raises(ValueError, match="'taks2', which is not a task"):
        model.predict(dl, remap_labels={"other": "taks2"})


def test_calculate_loss_counts_and_empty_batches(model):
    X = {"data": np.random.default_rng(1).normal(size=(4, 2)).astype(np.float32)}
    loss_dict, count_dict = model.calculate_loss(X, {"task1": np.array([0, 1, -1, 1]),
                                                     "task2": np.array([-1, -1, -1, -1])})
    assert count_dict == {"task1": 3} and list(loss_dict) == ["task1"]
    logits = np.asarray(model.forward(X, ["task1"])["op2task1"], np.float64)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = -np.mean([logp[0, 0], logp[1, 1], logp[3, 1]])
    np.testing.assert_allclose(loss_dict["task1"], expected, rtol=1e-5)
    assert model.calculate_loss(X, {"task1": np.full(4, -1)}) == ({}, {})


def test_save_load_roundtrip_and_failed_load(model, tmp_path):
    path = tmp_path / "model.msgpack"
    model.save(path)
    fresh = MultitaskClassifier([make_task("task1"), make_task("task2", ("A", "C"))], seed=9)
    fresh.load(path)
    for a, b in zip(jax.tree.leaves(model.variables), jax.tree.leaves(fresh.variables), strict=True):
        np.testing.assert_array_equal(a, b)
    dl = loader()
    np.testing.assert_allclose(fresh.predict(dl)["probs"]["task1"], model.predict(dl)["probs"]["task1"])

    other = MultitaskClassifier([make_task("task1", hidden=7)])
    other.init({"data": np.zeros((1, 2), np.float32)})
    before = jax.tree.map(np.asarray, other.variables)
    with pytest.raises(ValueError, match="saved modules \\['linear2C'\\] are not in this model"):
        other.load(path)
    wrong_shape = MultitaskClassifier([make_task("task1"), make_task("task2", ("A", "C"))])
    wrong_shape.init({"data": np.zeros((1, 3), np.float32)})  # 3 input features, not 2
    with pytest.raises(ValueError, match="do not match the model's"):
        wrong_shape.load(path)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(other.variables), strict=True):
        np.testing.assert_array_equal(a, b)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not msgpack at all")
    with pytest.raises(ValueError, match="not a jaxmtl params file"):
        fresh.load(garbage)
    with pytest.raises(ValueError, match="Cannot save an uninitialised model"):
        MultitaskClassifier([make_task("task1")]).save(tmp_path / "x")


def test_add_task_shares_existing_weights(model):
    grown = MultitaskClassifier([make_task("task1")])
    X = {"data": np.ones((2, 2), np.float32)}
    grown.init(X)
    kernel = np.asarray(grown.params["linear1A"]["kernel"])
    grown.add_task(make_task("task3", ("A", "D")))
    outputs = grown.forward(X, ["task3"])
    assert outputs["op2task3"].shape == (2, 2)
    np.testing.assert_array_equal(grown.params["linear1A"]["kernel"], kernel)
    with pytest.raises(ValueError, match="Found duplicate task 'task3'"):
        grown.add_task(make_task("task3"))
    assert grown.task_names == ["task1", "task3"]
