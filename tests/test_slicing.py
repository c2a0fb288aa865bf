"""jaxmtl.slicing utils and combiner: Snorkel 0.10's test/slicing/test_utils.py and
test_slice_combiner.py re-expressed, plus multi-class and error cases."""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmtl
from jaxmtl.slicing import (
    SliceCombinerModule,
    add_slice_labels,
    combine_slice_representations,
    convert_to_slice_tasks,
    slice_label_dict,
    slice_matrix,
)

X = np.array([0.1, 0.2, 0.3, 0.4, 0.5], np.float32)
Y = np.array([0, 1, 1, 0, 1])


def record_array(**columns) -> np.recarray:
    """What Snorkel's SFApplier returns: one int field per slicing function."""
    return np.rec.fromarrays([np.asarray(c, int) for c in columns.values()],
                             names=list(columns))


def dummy_task(task_name: str, n_classes: int = 2) -> jaxmtl.Task:
    module_pool = {"linear1": nn.Dense(10), "linear2": nn.Dense(n_classes)}
    op_sequence = [
        jaxmtl.Operation("linear1", [("_input_", "data")], name="encoder"),
        jaxmtl.Operation("linear2", ["encoder"], name="prediction_head"),
    ]
    return jaxmtl.Task(task_name, module_pool, op_sequence)


def loader(Y_dict=None) -> jaxmtl.DictDataLoader:
    dataset = jaxmtl.DictDataset("TestData", "train", {"data": X[:, None]},
                                 Y_dict if Y_dict is not None else {"TestTask": Y})
    return jaxmtl.DictDataLoader(dataset)


# --- add_slice_labels ------------------------------------------------------------------

def test_add_slice_labels_from_a_record_array():
    dataloader = loader()
    assert len(dataloader.dataset.Y_dict) == 1
    S = record_array(f=X < 0.25)  # the first two rows are in slice f
    assert add_slice_labels(dataloader, dummy_task("TestTask"), S) is None
    labelsets = dataloader.dataset.Y_dict
    assert sorted(labelsets) == ["TestTask", "TestTask_slice:base_ind",
                                 "TestTask_slice:base_pred", "TestTask_slice:f_ind",
                                 "TestTask_slice:f_pred"]
    assert labelsets["TestTask_slice:f_ind"].tolist() == [1, 1, 0, 0, 0]
    assert labelsets["TestTask_slice:base_ind"].tolist() == [1, 1, 1, 1, 1]
    assert labelsets["TestTask_slice:f_pred"].tolist() == [0, 1, -1, -1, -1]
    assert labelsets["TestTask_slice:base_pred"].tolist() == [0, 1, 1, 0, 1]
    assert labelsets["TestTask"].tolist() == [0, 1, 1, 0, 1]
    assert all(v.dtype == np.int32 for v in labelsets.values())
    # The loader serves them: one batch of the five rows (padded rows are -1).
    _, Y_batch = next(iter(dataloader))
    assert Y_batch["TestTask_slice:f_pred"][:5].tolist() == [0, 1, -1, -1, -1]


def test_add_slice_labels_from_a_plain_bool_matrix_with_names():
    dataloader = loader()
    S = np.stack([X < 0.25, X > 0.45], axis=1)
    add_slice_labels(dataloader, "TestTask", S, ["low", "high"])
    labelsets = dataloader.dataset.Y_dict
    assert labelsets["TestTask_slice:low_ind"].tolist() == [1, 1, 0, 0, 0]
    assert labelsets["TestTask_slice:high_ind"].tolist() == [0, 0, 0, 0, 1]
    assert labelsets["TestTask_slice:high_pred"].tolist() == [-1, -1, -1, -1, 1]
    assert len(labelsets) == 7


def test_soft_labels_are_masked_to_all_minus_one_rows_outside_the_slice():
    soft = np.stack([1.0 - Y, Y], axis=1) * 0.8 + 0.1
    labels = slice_label_dict(soft, np.array([[1], [0], [1], [0], [0]]), "t", ["s"])
    expected = soft.copy()
    expected[[1, 3, 4]] = -1
    np.testing.assert_array_equal(labels["t_slice:s_pred"], expected)
    np.testing.assert_array_equal(labels["t_slice:base_pred"], soft)
    # Valid DictDataset labels: masked soft rows count as unlabelled.
    dataset = jaxmtl.DictDataset("d", "train", {"data": X[:, None]}, labels)
    assert dataset.Y_dict["t_slice:s_pred"].dtype == np.float32


def test_an_explicit_base_slice_is_used_as_given():
    matrix, names = slice_matrix(record_array(f=[1, 0, 0], base=[1, 1, 0]))
    assert names == ["f", "base"]
    assert matrix.tolist() == [[1, 1], [0, 1], [0, 0]]


def test_add_slice_labels_warns_when_it_replaces_different_labels(caplog):
    dataloader = loader()
    add_slice_labels(dataloader, "TestTask", record_array(f=[1, 1, 0, 0, 0]))
    with caplog.at_level(logging.WARNING, logger="jaxmtl.slicing.labels"):
        add_slice_labels(dataloader, "TestTask", record_array(f=[1, 1, 0, 0, 0]))
        assert not caplog.records  # the same labels again: nothing replaced
        add_slice_labels(dataloader, "TestTask", record_array(f=[0, 0, 0, 0, 1]))
    assert [r.getMessage() for r in caplog.records] == [
        "add_slice_labels: replacing the existing labels 'TestTask_slice:f_ind' of dataset "
        "TestData (train)",
        "add_slice_labels: replacing the existing labels 'TestTask_slice:f_pred' of dataset "
        "TestData (train)"]


@pytest.mark.parametrize("S, names, message", [
    (np.array([[0], [2], [1], [0], [0]]), ["f"],
     "S: slice 'f' has value 2 at row 1; slice membership must be 0/1 (or bool)"),
    (np.ones((4, 1)), ["f"], "S has 4 rows but the labels of task 'TestTask' have 5"),
    (np.ones((5, 2)), None, "S is a plain [N, n_slices] array (shape (5, 2)); pass "
                            "slice_names"),
    (np.ones((5, 2)), ["f"], "S has 2 columns but there are 1 slice names ['f']"),
    (np.ones(5), ["f"], "S has shape (5,); expected a record array"),
    (record_array(f=[1, 0, 0, 0, 0]), ["g"],
     "S has slice fields ['f'], but the slices are ['g']"),
    (np.ones((5, 2)), ["f", "f"], "slice_names repeat ['f']"),
    (np.ones((5, 1)), ["a/b"], "slice name 'a/b' must be a non-empty str without '/'"),
])
def test_bad_slice_matrices_name_the_problem(S, names, message):
    with pytest.raises(ValueError) as raised:
        add_slice_labels(loader(), "TestTask", S, names)
    assert message in str(raised.value)


def test_missing_base_labels_are_an_error():
    with pytest.raises(ValueError, match=r"Base task \(TestTask\) labels missing from "
                                         r"DictDataset\(name=TestData"):
        add_slice_labels(loader({"other": Y}), "TestTask", record_array(f=X < 0.25))


# --- convert_to_slice_tasks ------------------------------------------------------------

def test_convert_to_slice_tasks():
    task = dummy_task("TestTask")
    pool_before = dict(task.module_pool)
    slice_names = ["slice_a", "slice_b", "slice_c"]
    slice_tasks = convert_to_slice_tasks(task, slice_names)
    names = [t.name for t in slice_tasks]
    assert names == ([f"TestTask_slice:{s}_ind" for s in slice_names + ["base"]]
                     + [f"TestTask_slice:{s}_pred" for s in slice_names + ["base"]]
                     + ["TestTask"])
    assert len(slice_tasks) == 2 * (len(slice_names) + 1) + 1
    # The body's modules are the same objects in every slice task.
    for op in task.op_sequence[:-1]:
        for slice_task in slice_tasks:
            assert slice_task.module_pool[op.module_name] is task.module_pool[op.module_name]
    # One predictor head module for every predictor task.
    pred_tasks = [t for t in slice_tasks if t.name.endswith("_pred")]
    head_name = pred_tasks[0].op_sequence[-1].module_name
    assert head_name == "TestTask_slice:shared_pred_head"
    assert all(t.op_sequence[-1].module_name == head_name for t in pred_tasks)
    assert [t.op_sequence[-1].name for t in pred_tasks] == [
        f"TestTask_slice:{s}_pred_head" for s in slice_names + ["base"]]
    # Indicator heads are binary; the master head is the base head; the base task is intact.
    ind_heads = {t.module_pool[t.op_sequence[-1].module_name] for t in slice_tasks[:4]}
    assert ind_heads == {nn.Dense(2)}
    master = slice_tasks[-1]
    assert [op.name for op in master.op_sequence[-2:]] == ["TestTask_master_combiner",
                                                           "TestTask_master_head"]
    assert master.module_pool["TestTask_master_head"] is pool_before["linear2"]
    assert isinstance(master.module_pool["TestTask_master_combiner"], SliceCombinerModule)
    assert task.module_pool == pool_before
    assert [t.scorer.metric_names for t in slice_tasks[:4]] == [("f1",)] * 4
    assert all(t.scorer is task.scorer for t in slice_tasks[4:])


def test_convert_to_slice_tasks_keeps_a_given_base_slice_once():
    tasks = convert_to_slice_tasks(dummy_task("t"), ["a", "base"])
    assert [t.name for t in tasks] == ["t_slice:a_ind", "t_slice:base_ind", "t_slice:a_pred",
                                       "t_slice:base_pred", "t"]


def test_convert_to_slice_tasks_needs_a_body():
    task = jaxmtl.Task("t", {"head": nn.Dense(2)},
                       [jaxmtl.Operation("head", [("_input_", "data")])])
    with pytest.raises(ValueError, match="Task 't' has one op; slicing needs a body"):
        convert_to_slice_tasks(task, ["a"])


def test_the_master_task_computes_its_head_from_the_combined_slice_representation():
    model = jaxmtl.MultitaskClassifier(convert_to_slice_tasks(dummy_task("t", 3), ["a", "b"]))
    outputs = model.forward({"data": X[:, None]}, model.task_names)
    assert outputs["t_master_head"].shape == (5, 3)
    assert outputs["t_slice:a_pred_head"].shape == (5, 3)
    assert outputs["t_slice:a_ind_head"].shape == (5, 2)
    assert outputs["t_slice:a_pred_transform"].shape == (5, 10)
    # The master head reads the combiner's output, recomputed here from the slice ops.
    order = ["a", "b", "base"]
    combined = combine_slice_representations(
        jnp.stack([outputs[f"t_slice:{s}_ind_head"] for s in order], 1),
        jnp.stack([outputs[f"t_slice:{s}_pred_head"] for s in order], 1),
        jnp.stack([outputs[f"t_slice:{s}_pred_transform"] for s in order], 1))
    np.testing.assert_allclose(outputs["t_master_combiner"], combined, rtol=1e-6)
    head = model.params["t_master_head"]
    np.testing.assert_allclose(outputs["t_master_head"],
                               combined @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-6)


# --- SliceCombinerModule ---------------------------------------------------------------

B, H = 4, 20


def combine(outputs, **kwargs):
    module = SliceCombinerModule(**kwargs)
    assert module.init(jax.random.PRNGKey(0), outputs) == {}  # parameter-free
    return np.asarray(module.apply({}, outputs))


def two_slices(ind_a, pred_a, ind_b, pred_b, num_classes=2):
    return {
        "task_slice:a_ind_head": jnp.full((B, 2), ind_a),
        "task_slice:a_pred_transform": jnp.full((B, H), 4.0),
        "task_slice:a_pred_head": jnp.full((B, num_classes), pred_a),
        "task_slice:b_ind_head": jnp.full((B, 2), ind_b),
        "task_slice:b_pred_transform": jnp.full((B, H), 2.0),
        "task_slice:b_pred_head": jnp.full((B, num_classes), pred_b),
        "_input_": {"data": jnp.zeros((B, 1))},
    }


def test_forward_shape():
    rng = np.random.default_rng(123)
    for batch, hidden in [(4, 20), (1, 1)]:
        outputs = {"task_slice:base_ind_head": rng.uniform(size=(batch, 2)),
                   "task_slice:base_pred_transform": rng.uniform(size=(batch, hidden)),
                   "task_slice:base_pred_head": rng.uniform(size=(batch, 2))}
        assert combine(outputs).shape == (batch, hidden)


@pytest.mark.parametrize("ind_a, pred_a, ind_b, pred_b", [
    (10.0, 10.0, -10.0, -10.0),  # equal logits per head: every probability is 1/2
    (10.0, 0.0, -10.0, 0.0),     # reweighting by ind (zeros in pred head)
    (0.0, 5.0, 0.0, 5.0),        # by pred confidence (zeros in ind head)
    (0.0, -5.0, 0.0, 5.0),       # the sign of equal logits does not change confidence
])
def test_average_reweighting(ind_a, pred_a, ind_b, pred_b):
    np.testing.assert_allclose(combine(two_slices(ind_a, pred_a, ind_b, pred_b)),
                               np.full((B, H), 3.0), rtol=1e-6)


def test_many_slices():
    outputs = {}
    for i in range(100):
        sign, value = (1.0, 4.0) if i % 2 == 0 else (-1.0, 2.0)
        outputs[f"task_slice:{i}_ind_head"] = jnp.full((B, 2), 20.0 * sign)
        outputs[f"task_slice:{i}_pred_transform"] = jnp.full((B, H), value)
        outputs[f"task_slice:{i}_pred_head"] = jnp.full((B, 2), 20.0 * sign)
    np.testing.assert_allclose(combine(outputs), np.full((B, H), 3.0), rtol=1e-6)


def test_temperature():
    noise = np.random.default_rng(0).normal(0.0, 1e-5, size=(6, B, H))
    outputs = {
        "task_slice:a_ind_head": 10.0 + noise[0, :, :2],
        "task_slice:a_pred_transform": 4.0 + noise[1],
        "task_slice:a_pred_head": 10.0 + noise[2, :, :2],
        "task_slice:b_ind_head": -10.0 + noise[3, :, :2],
        "task_slice:b_pred_transform": 2.0 + noise[4],
        "task_slice:b_pred_head": -10.0 + noise[5, :, :2],
    }
    # A large temperature smooths the attention to the plain mean despite the noise.
    np.testing.assert_allclose(combine(outputs, temperature=1e5), np.full((B, H), 3.0),
                               atol=1e-4)
    # A tiny one makes it pick one slice per row: every entry is near 4 or 2.
    peaked = combine(outputs, temperature=1e-15)
    near = np.isclose(peaked, 4.0, atol=1e-4) | np.isclose(peaked, 2.0, atol=1e-4)
    assert near.all()


def numpy_combiner(ind, pred, feats, temperature=1.0, rule="max"):
    """Independent reference: [B, S, 2], [B, S, K], [B, S, H] -> [B, H]."""
    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    probs = softmax(pred)
    confidence = probs[..., 1] if rule == "positive" else probs.max(-1)
    attention = softmax(softmax(ind)[..., 1] * confidence / temperature)
    return (attention[..., None] * feats).sum(1)


@pytest.mark.parametrize("num_classes, rule", [(2, "positive"), (3, "max"), (10, "max")])
def test_combiner_matches_a_numpy_reference_for_any_number_of_classes(num_classes, rule):
    rng = np.random.default_rng(num_classes)
    ind = rng.normal(0, 3, size=(B, 3, 2)).astype(np.float32)
    pred = rng.normal(0, 3, size=(B, 3, num_classes)).astype(np.float32)
    feats = rng.normal(size=(B, 3, H)).astype(np.float32)
    outputs = {}
    for s, name in enumerate(["x", "x_p", "y"]):  # "x_p" sorts differently per suffix
        outputs[f"t_slice:{name}_ind_head"] = ind[:, s]
        outputs[f"t_slice:{name}_pred_head"] = pred[:, s]
        outputs[f"t_slice:{name}_pred_transform"] = feats[:, s]
    expected = numpy_combiner(ind, pred, feats, temperature=0.5, rule=rule)
    np.testing.assert_allclose(combine(outputs, temperature=0.5), expected, rtol=1e-5)
    np.testing.assert_allclose(combine(outputs, temperature=0.5, confidence="max"),
                               numpy_combiner(ind, pred, feats, 0.5, "max"), rtol=1e-5)


def test_combiner_multiclass_weights_the_confident_slice_expert():
    # Snorkel 0.10 raises NotImplementedError here; jaxmtl weighs by the top-class
    # probability. Slice a: in the slice (p = 1) and sure (p_max ~ 1); slice b: out of it.
    outputs = two_slices(0.0, 0.0, 0.0, 0.0, num_classes=3)
    outputs["task_slice:a_ind_head"] = jnp.tile(jnp.array([-30.0, 30.0]), (B, 1))
    outputs["task_slice:a_pred_head"] = jnp.tile(jnp.array([0.0, 30.0, 0.0]), (B, 1))
    outputs["task_slice:b_ind_head"] = jnp.tile(jnp.array([30.0, -30.0]), (B, 1))
    weight_a = np.exp(1.0) / (np.exp(1.0) + 1.0)  # softmax([1 * 1, 0 * 1/3])
    np.testing.assert_allclose(combine(outputs), np.full((B, H), 4 * weight_a + 2 * (1 - weight_a)),
                               rtol=1e-5)


@pytest.mark.parametrize("kwargs, pred_classes, message", [
    ({"confidence": "positive"}, 3, "confidence='positive' (the probability of class 1, "
                                    "Snorkel 0.10's binary rule) needs K = 2 predictor "
                                    "logits, got K = 3"),
    ({}, 1, "predictor heads return 1 logit(s) per row; expected K >= 2"),
    ({"confidence": "mean"}, 2, "confidence='mean', expected one of ['auto', 'positive', "
                                "'max']"),
])
def test_combiner_errors(kwargs, pred_classes, message):
    with pytest.raises(ValueError) as raised:
        combine(two_slices(1.0, 1.0, 1.0, 1.0, num_classes=pred_classes), **kwargs)
    assert message in str(raised.value)


def test_combiner_errors_name_missing_outputs():
    outputs = two_slices(1.0, 1.0, 1.0, 1.0)
    del outputs["task_slice:b_pred_transform"]
    with pytest.raises(ValueError, match=r"slice 'task_slice:b' has an indicator output but "
                                         r"no \['task_slice:b_pred_transform'\]"):
        combine(outputs)
    with pytest.raises(ValueError, match="no output name ends with '_ind_head'"):
        combine({"x_pred_head": jnp.ones((B, 2))})


def test_snorkel_pandas_sf_applier_output_feeds_add_slice_labels():
    """Snorkel's own SF applier (bench extra) produces the S that add_slice_labels takes."""
    pd = pytest.importorskip("pandas")
    snorkel_slicing = pytest.importorskip("snorkel.slicing")

    @snorkel_slicing.slicing_function()
    def f(x):
        return x.val < 0.25

    S = snorkel_slicing.PandasSFApplier([f]).apply(pd.DataFrame({"val": X, "y": Y}),
                                                   progress_bar=False)
    assert isinstance(S, np.recarray) and S.dtype.names == ("f",)
    dataloader = loader()
    add_slice_labels(dataloader, dummy_task("TestTask"), S)
    labelsets = dataloader.dataset.Y_dict
    assert len(labelsets) == 5
    assert labelsets["TestTask_slice:f_ind"].tolist() == [1, 1, 0, 0, 0]
    assert labelsets["TestTask_slice:f_pred"].tolist() == [0, 1, -1, -1, -1]
    assert labelsets["TestTask_slice:base_pred"].tolist() == [0, 1, 1, 0, 1]


def test_nnx_body_and_head_convert_to_slice_tasks():
    from flax import nnx

    rngs = nnx.Rngs(0)
    head = nnx.Linear(6, 3, rngs=rngs)
    task = jaxmtl.Task("t", {"body": nnx.Sequential(nnx.Linear(1, 6, rngs=rngs), nnx.relu),
                             "head": head},
                       [jaxmtl.Operation("body", [("_input_", "data")]),
                        jaxmtl.Operation("head", ["body"])])
    tasks = convert_to_slice_tasks(task, ["a"])
    assert tasks[-1].module_pool["t_master_head"] is head  # the head, under its new name
    assert tasks[2].module_pool["t_slice:shared_pred_head"] == nn.Dense(3)
    model = jaxmtl.MultitaskClassifier(tasks)
    outputs = model.forward({"data": X[:, None]}, model.task_names)
    # The master head is the NNX head with its own initial weights.
    np.testing.assert_allclose(outputs["t_master_head"],
                               head(jnp.asarray(outputs["t_master_combiner"])), rtol=1e-5)
    assert outputs["t_slice:a_pred_head"].shape == (5, 3)


def test_a_head_without_a_known_width_is_an_error():
    from flax import nnx

    class NnxHead(nnx.Module):
        def __call__(self, x):
            return x

    task = jaxmtl.Task("t", {"body": nn.Dense(4), "head": NnxHead()},
                       [jaxmtl.Operation("body", [("_input_", "data")]),
                        jaxmtl.Operation("head", ["body"])])
    with pytest.raises(ValueError, match="Task 't': its head module NnxHead is neither a Flax "
                                         "Linen module nor an NNX module with an int "
                                         "out_features"):
        convert_to_slice_tasks(task, ["a"])
