"""SliceAwareClassifier: Snorkel 0.10's test/slicing/test_sliceaware_classifier.py
re-expressed, plus real-number slice scores, multi-class, compile counts and Trainer
features (balancer, checkpoint, exact resume, save/load) on slice tasks."""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import count_compiles

import jaxmtl
from jaxmtl.slicing import SliceAwareClassifier

DATA = [3, 43, 12, 9, 3]
SLICES = ["f", "g"]


def snorkel_like_S(data) -> np.recarray:
    """SFApplier([f, g]) output for f: num > 42, g: num > 10."""
    data = np.asarray(data)
    return np.rec.fromarrays([(data > 42).astype(int), (data > 10).astype(int)],
                             names=SLICES)


def make_model(slice_names=SLICES, num_classes=2, **kwargs) -> SliceAwareClassifier:
    mlp = nn.Sequential([nn.Dense(10), nn.Dense(10), nn.relu])
    return SliceAwareClassifier(base_architecture=mlp, head_dim=10, slice_names=slice_names,
                                input_data_key="test_data", task_name="test_task",
                                num_classes=num_classes, **kwargs)


def dataset(split: str, X=None, Y=None, label="test_task") -> jaxmtl.DictDataset:
    X = np.array([(x, x) for x in DATA], np.float32) if X is None else X
    Y = np.array([int(i % 2 == 0) for i in range(len(X))]) if Y is None else Y
    return jaxmtl.DictDataset("test_dataset", split, {"test_data": X}, {label: Y})


def test_slice_tasks():
    model = make_model(scorer=jaxmtl.Scorer(metrics=["f1"]))
    assert set(model.task_names) == {
        "test_task", "test_task_slice:base_pred", "test_task_slice:base_ind",
        "test_task_slice:f_pred", "test_task_slice:f_ind", "test_task_slice:g_pred",
        "test_task_slice:g_ind"}
    assert model.name == "test_task_sliceaware_classifier"
    assert model.slice_names == SLICES
    assert model.base_task.name == "test_task"


def test_make_slice_dataloader():
    model = make_model()
    dataloader = model.make_slice_dataloader(dataset("train"), snorkel_like_S(DATA),
                                             batch_size=4)
    Y_dict = dataloader.dataset.Y_dict
    assert sorted(Y_dict) == sorted(model.task_names)
    assert Y_dict["test_task_slice:g_pred"].tolist() == [-1, 0, 1, -1, -1]
    assert dataloader.batch_size == 4
    with pytest.raises(ValueError, match=r"Base task \(test_task\) labels missing from "
                                         r"DictDataset\(name=test_dataset"):
        model.make_slice_dataloader(dataset("train", label="bad_labels"), snorkel_like_S(DATA))
    with pytest.raises(ValueError, match=r"Num. columns in S matrix \(3\) does not match num. "
                                         r"slice_names \(2: \['f', 'g'\]\)"):
        model.make_slice_dataloader(dataset("train"), np.ones((5, 3), int))
    with pytest.raises(ValueError, match=r"S has slice fields \['f'\], but the slices are "
                                         r"\['f', 'g'\]"):
        model.make_slice_dataloader(dataset("train"), np.rec.fromarrays([[0] * 5], names=["f"]))
    # A plain 0/1 matrix in slice_names order gives the same labels.
    plain = model.make_slice_dataloader(dataset("train"),
                                        np.stack([snorkel_like_S(DATA)[s] for s in SLICES], 1))
    for name, labels in Y_dict.items():
        np.testing.assert_array_equal(plain.dataset.Y_dict[name], labels)


def test_constructor_errors():
    with pytest.raises(ValueError, match="num_classes must be an int >= 2, got 1"):
        make_model(num_classes=1)
    with pytest.raises(ValueError, match="slice_names repeat \\['f'\\]"):
        make_model(slice_names=["f", "f"])


def test_head_dim_other_than_the_representation_width_is_an_error():
    # Snorkel's Linear(head_dim, head_dim) fails on such a body; it must not be ignored.
    model = make_model()
    model.init({"test_data": np.zeros((2, 2), np.float32)})  # head_dim 10 = the body's
    assert model.params["test_task_slice:f_pred_transform"]["kernel"].shape == (10, 10)
    narrow = SliceAwareClassifier(nn.Sequential([nn.Dense(10), nn.relu]), head_dim=16,
                                  slice_names=SLICES, input_data_key="test_data",
                                  task_name="test_task")
    with pytest.raises(ValueError, match=r"head_dim=16, but the base architecture's "
                                         r"representation is 10 wide \(shape \(2, 10\)\); "
                                         r"the slice heads are as wide as it: pass head_dim=10"):
        narrow.init({"test_data": np.zeros((2, 2), np.float32)})


def test_scores_pipeline():
    model = make_model(scorer=jaxmtl.Scorer(metrics=["f1"]))
    valid_dl = model.make_slice_dataloader(dataset("valid"), snorkel_like_S(DATA), batch_size=4)
    scores = model.score([valid_dl])
    for label in ["test_task", "test_task_slice:f_pred", "test_task_slice:g_ind"]:
        assert f"{label}/test_dataset/valid/f1" in scores
    slice_scores = model.score_slices([valid_dl])
    assert sorted(slice_scores) == [
        "model/all/valid/f1", "test_task/test_dataset/valid/f1",
        "test_task_slice:base_pred/test_dataset/valid/f1",
        "test_task_slice:f_pred/test_dataset/valid/f1",
        "test_task_slice:g_pred/test_dataset/valid/f1"]
    frame = model.score_slices([valid_dl], as_dataframe=True)
    assert sorted(frame["label"]) == ["model", "test_task", "test_task_slice:base_pred",
                                      "test_task_slice:f_pred", "test_task_slice:g_pred"]


def test_slice_label_remap_matches_names_exactly():
    model = SliceAwareClassifier(nn.Dense(4), 4, ["pred"], task_name="predict")
    remap = model.slice_label_remap(["predict", "predict_slice:pred_pred",
                                     "predict_slice:pred_ind", "predict_slice:base_ind",
                                     "other_slice:pred_pred"])
    assert remap == {"predict_slice:pred_pred": "predict", "predict_slice:pred_ind": None,
                     "predict_slice:base_ind": None}


# --- trained models ----------------------------------------------------------------------

def synthetic(n: int, seed: int, num_classes: int):
    """Points in [-1, 1]^2; a small slice (x0 > 0.6) whose labels follow another rule."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, size=(n, 2)).astype(np.float32)
    in_slice = X[:, 0] > 0.6
    if num_classes == 2:
        Y = np.where(in_slice, X[:, 1] < 0.0, X[:, 1] > 0.0).astype(int)
    else:
        Y = np.digitize(np.where(in_slice, -X[:, 1], X[:, 1]), [-0.33, 0.33])
    return X, Y, np.stack([in_slice, X[:, 1] > 0.8], axis=1).astype(int)


@pytest.fixture(scope="module", params=[2, 3], ids=["binary", "3-class"])
def trained(request):
    num_classes = request.param
    model = SliceAwareClassifier(nn.Sequential([nn.Dense(16), nn.relu]), 16, ["s", "top"],
                                 input_data_key="x", task_name="t", num_classes=num_classes)
    loaders = []
    for split, seed, n in [("train", 0, 480), ("valid", 1, 300)]:
        X, Y, S = synthetic(n, seed, num_classes)
        loaders.append(model.make_slice_dataloader(
            jaxmtl.DictDataset("syn", split, {"x": X}, {"t": Y}), S, batch_size=32,
            shuffle=split == "train", seed=0))
    jaxmtl.Trainer(n_epochs=3, lr=0.02, seed=0, progress_bar=False).fit(model, loaders)
    return model, loaders, num_classes


def test_score_slices_scores_the_master_head_on_each_slices_rows(trained):
    model, loaders, num_classes = trained
    valid = loaders[1]
    scores = model.score_slices([valid])
    preds = model.predict(valid, return_preds=True)["preds"]["t"]
    golds = valid.dataset.Y_dict["t"]
    metric = "f1" if num_classes == 2 else "f1_macro"
    assert set(model.base_task.scorer.metric_names) == {"accuracy", metric}
    for slice_name in ["s", "top", "base"]:
        rows = valid.dataset.Y_dict[f"t_slice:{slice_name}_ind"] == 1
        expected = float(np.mean(preds[rows] == golds[rows]))
        assert scores[f"t_slice:{slice_name}_pred/syn/valid/accuracy"] == pytest.approx(expected)
    assert scores["t/syn/valid/accuracy"] == pytest.approx(float(np.mean(preds == golds)))
    # Trained: far above chance overall.
    assert scores["t/syn/valid/accuracy"] > 0.8
    assert model.score([valid])["t_slice:base_ind/syn/valid/f1"] == 1.0


def test_save_and_load_into_a_fresh_model_predicts_the_same(trained, tmp_path):
    model, loaders, num_classes = trained
    model.save(tmp_path / "slice.msgpack")
    fresh = SliceAwareClassifier(nn.Sequential([nn.Dense(16), nn.relu]), 16, ["s", "top"],
                                 input_data_key="x", task_name="t", num_classes=num_classes)
    fresh.load(tmp_path / "slice.msgpack")
    np.testing.assert_array_equal(fresh.predict(loaders[1])["probs"]["t"],
                                  model.predict(loaders[1])["probs"]["t"])


# -m slow (two inits and fits of 7 and 11 tasks: ~13 s alone): by default
# test_signatures.py's test_compiled_programs_do_not_grow_with_the_number_of_tasks checks the
# same bound for tasks that share a signature, as slice tasks do.
@pytest.mark.slow
def test_compiled_programs_do_not_grow_with_the_number_of_slices():
    counts = {}
    for n_slices in (2, 4):
        names = [f"s{i}" for i in range(n_slices)]
        model = make_model(slice_names=names)
        X = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
        S = (np.random.default_rng(1).uniform(size=(64, n_slices)) < 0.3).astype(int)
        train = model.make_slice_dataloader(dataset("train", X, (X[:, 0] > 0).astype(int)), S,
                                            batch_size=16, shuffle=True, seed=0)
        valid = model.make_slice_dataloader(dataset("valid", X, (X[:, 0] > 0).astype(int)), S,
                                            batch_size=16)
        trainer = jaxmtl.Trainer(n_epochs=1, lr=0.01, seed=0, progress_bar=False)
        fit = count_compiles(lambda: trainer.fit(model, [train]))  # noqa: B023
        score = count_compiles(lambda: model.score_slices([valid]))  # noqa: B023
        counts[n_slices] = (fit, score)
        assert len(model.task_names) == 2 * (n_slices + 1) + 1
    # 4 slices (11 tasks) compile no more programs than 2 slices (7 tasks): one train step
    # for the loader's task set, one evaluation program, not one per task. (The first model
    # also warms up a few shape-generic programs, so the second may need fewer.)
    print("compiles (fit, score) per slice count:", counts)
    assert counts[4][0] <= counts[2][0] and counts[4][1] <= counts[2][1], counts
    assert counts[4][1] <= 2, counts


class Interrupt(Exception):
    pass


class InterruptingLoader(jaxmtl.DictDataLoader):
    """Raises when it is asked for its ``stop_at``-th batch (a crash mid-epoch)."""

    def __init__(self, *args, stop_at=-1, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_at, self.drawn = stop_at, 0

    def batch_at(self, order, index):
        self.drawn += 1
        if self.drawn == self.stop_at:
            raise Interrupt(self.drawn)
        return super().batch_at(order, index)


# -m slow (three checkpointed fits of 7 tasks): by default
# test_trainer_balancers.py's test_uncertainty_state_is_checkpointed_and_resumed checks that
# the balancer state resumes exactly, and test_resume.py the SIGKILL resume.
@pytest.mark.slow
def test_balancer_checkpoint_and_exact_resume_work_on_slice_tasks(tmp_path, caplog):
    X, Y, S = synthetic(160, 0, 2)

    def run(checkpoint_dir, stop_at=-1, resume=False):
        model = make_model()
        train = InterruptingLoader(dataset("train", X, Y), batch_size=32, shuffle=True, seed=0,
                                   stop_at=stop_at)
        model.make_slice_dataloader(train.dataset, S)  # adds the slice labels in place
        trainer = jaxmtl.Trainer(
            n_epochs=2, lr=0.02, seed=0, progress_bar=False, balancer="uncertainty",
            checkpointing=True,
            log_manager_config={"counter_unit": "batches", "evaluation_freq": 2},
            checkpointer_config={"checkpoint_dir": str(checkpoint_dir)})
        trainer.fit(model, [train], resume_from=str(checkpoint_dir) if resume else None)
        return model.variables, trainer.state.balancer_state

    reference, reference_balancer = run(tmp_path / "reference")
    with pytest.raises(Interrupt):
        run(tmp_path / "ck", stop_at=8)  # epoch 2 of 2 (5 batches an epoch)
    with caplog.at_level(logging.WARNING):
        resumed, resumed_balancer = run(tmp_path / "ck", resume=True)
    # Orbax warns about each item on disk without a handler; every item has one.
    assert "could not be restored" not in caplog.text
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    # One log-variance per task: 7 tasks, trained away from their initial zeros.
    log_vars = np.asarray(resumed_balancer.log_vars)
    np.testing.assert_array_equal(log_vars, np.asarray(reference_balancer.log_vars))
    assert log_vars.shape == (7,) and not np.allclose(log_vars, 0.0)


def test_snorkel_sf_applier_output_feeds_make_slice_dataloader():
    """Snorkel's SFApplier (bench extra) output, as in Snorkel's classifier test."""
    snorkel_slicing = pytest.importorskip("snorkel.slicing")
    from types import SimpleNamespace

    @snorkel_slicing.slicing_function()
    def f(x) -> int:
        return x.num > 42

    @snorkel_slicing.slicing_function()
    def g(x) -> int:
        return x.num > 10

    S = snorkel_slicing.SFApplier([f, g]).apply([SimpleNamespace(num=n) for n in DATA],
                                                progress_bar=False)
    dataloader = make_model().make_slice_dataloader(dataset("train"), S)
    Y_dict = dataloader.dataset.Y_dict
    assert len(Y_dict) == 7
    assert Y_dict["test_task_slice:f_ind"].tolist() == [0, 1, 0, 0, 0]
    assert Y_dict["test_task_slice:g_pred"].tolist() == [-1, 0, 1, -1, -1]


DEVICE_RUN = """
import os
os.environ["XLA_FLAGS"] = os.environ.get("JAXMTL_TEST_FAST_COMPILE_FLAG", "") + " --xla_force_host_platform_device_count=2"
import json, sys
import jax, numpy as np
sys.path.insert(0, {tests!r})
from test_slicing_classifier import make_model, dataset, synthetic
import jaxmtl
assert len(jax.local_devices()) == 2
X, Y, S = synthetic(150, 0, 3)
results = {{}}
for parallel in ("single", "pmap", "sharded"):
    model = make_model(num_classes=3)
    train = model.make_slice_dataloader(dataset("train", X, Y), S, batch_size=32, shuffle=True,
                                        seed=0)
    jaxmtl.Trainer(n_epochs=2, lr=0.02, seed=0, progress_bar=False, parallel=parallel).fit(
        model, [train])
    scores = model.score_slices([train])
    results[parallel] = {{"params": [np.asarray(x).ravel().tolist()
                                     for x in jax.tree.leaves(model.params)],
                         "scores": scores}}
print(json.dumps(results))
"""


@pytest.mark.slow  # three fits in a subprocess with 2 forced CPU devices
def test_slice_model_trains_the_same_on_two_devices():
    import json
    import subprocess
    import sys
    from pathlib import Path

    code = DEVICE_RUN.format(tests=str(Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    single = results["single"]
    for parallel in ("pmap", "sharded"):
        for a, b in zip(single["params"], results[parallel]["params"], strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=parallel)
        assert results[parallel]["scores"] == pytest.approx(single["scores"], abs=1e-6)
