"""model.save / model.load (jaxmtl.persistence): checked, all-or-nothing, atomic; best models."""

import os
import threading

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import make_task
from flax import serialization

import jaxmtl
from jaxmtl import MultitaskClassifier
from jaxmtl.persistence import (
    SAVE_VERSION,
    SavedVariables,
    check_compatible,
    encode_params,
    variables_checksum,
)
from jaxmtl.training.checkpoint import Checkpointer, CheckpointError

METRIC = "task1/ds/valid/accuracy"
BEST = f"best_model_{METRIC.replace('/', '_')}"


def two_tasks(seed=0):
    return MultitaskClassifier([make_task("task1"), make_task("task2", ("A", "C"))], seed=seed)


@pytest.fixture(scope="module")
def model():
    model = two_tasks()
    model.init({"data": np.zeros((1, 2), np.float32)})
    return model


def host(variables):
    return jax.tree.map(np.asarray, variables)


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(x, y)


DROP = object()  # a payload field to remove


def write_payload(path, **changes):
    """A params file whose payload is ``changes`` applied to a valid version-2 payload."""
    variables = {"params": {"linear1A": {"kernel": np.ones((2, 10), np.float32)}}}
    payload = serialization.msgpack_restore(encode_params(variables, "m", ["task1"], ["relu"]))
    payload.update(changes)
    payload = {k: v for k, v in payload.items() if v is not DROP}
    path.write_bytes(serialization.msgpack_serialize(payload))
    return path


# --- round trips ---------------------------------------------------------------------------
def test_roundtrip_version2_with_checksum_and_snorkel_keywords(model, tmp_path):
    path = tmp_path / "m.msgpack"
    model.save(model_path=path)
    payload = serialization.msgpack_restore(path.read_bytes())
    assert payload["version"] == SAVE_VERSION == 2
    assert payload["task_names"] == ["task1", "task2"]
    assert payload["module_pool"] == ["linear1A", "linear2B", "linear2C", "relu"]
    assert payload["checksum"] == variables_checksum(host(model.variables))
    fresh = two_tasks(seed=9)
    fresh.load(model_path=path)
    assert_same(host(model.variables), host(fresh.variables))


def test_version1_files_still_load(model, tmp_path):
    path = tmp_path / "v1.msgpack"
    path.write_bytes(serialization.msgpack_serialize({
        "format": "jaxmtl.params", "version": 1, "model": "m",
        "task_names": ["task1", "task2"], "variables": host(model.variables)}))
    fresh = two_tasks(seed=9)
    fresh.load(path)
    assert_same(host(model.variables), host(fresh.variables))


def test_checksum_catches_a_flipped_byte_in_the_array_data(model, tmp_path):
    path = tmp_path / "m.msgpack"
    model.save(path)
    data = bytearray(path.read_bytes())
    kernel = np.asarray(model.params["linear1A"]["kernel"]).tobytes()
    at = bytes(data).find(kernel)
    assert at > 0
    data[at + 5] ^= 0x01  # one bit of one float: still a valid msgpack file
    path.write_bytes(bytes(data))
    fresh = two_tasks()
    with pytest.raises(ValueError, match=r"m.msgpack: checksum mismatch: the file records "
                                         r"sha256:[0-9a-f]{64}, its variables give sha256:"):
        fresh.load(path)
    assert fresh.variables is None


# --- all-or-nothing checks -----------------------------------------------------------------
def test_file_missing_a_module_is_refused_on_a_fresh_model(tmp_path):
    one = MultitaskClassifier([make_task("task1")])
    one.init({"data": np.zeros((1, 2), np.float32)})
    path = tmp_path / "one.msgpack"
    one.save(path)
    fresh = two_tasks()  # also has task2 and its head linear2C
    with pytest.raises(ValueError) as error:
        fresh.load(path)
    assert str(error.value) == (
        f"{path}: cannot load into this model: saved task names ['task1'] differ from the "
        f"model's ['task1', 'task2']; modules ['linear2C'] of this model's pool have no "
        f"saved variables")
    assert fresh.variables is None


def test_check_compatible_module_rules():
    pool = two_tasks().module_pool  # linear1A, linear2B, linear2C (Dense), relu (function)
    variables = {"params": {name: {"kernel": np.ones((2, 2), np.float32)}
                            for name in ("linear1A", "linear2B")}}
    # A version-1 file (no saved pool): linear2C may own variables -> refused, with a hint.
    v1 = SavedVariables(variables, ["task1", "task2"], None, "f")
    with pytest.raises(ValueError, match=r"f: cannot load into this model: modules "
                                         r"\['linear2C'\] of this model's pool have no saved "
                                         r"variables \(this source does not record"):
        check_compatible(v1, ["task2", "task1"], pool, None)
    # The saving model had linear2C without variables (version 2 records it): accepted.
    check_compatible(v1._replace(module_pool=sorted(pool)), ["task1", "task2"], pool, None)
    # Parameter-free functions (relu) never need saved variables.
    with_c = {"params": {**variables["params"], "linear2C": variables["params"]["linear2B"]}}
    check_compatible(v1._replace(variables=with_c), ["task1", "task2"], pool, None)
    extra = {"params": {**with_c["params"], "other": {"w": np.ones(1, np.float32)}}}
    with pytest.raises(ValueError, match=r"saved modules \['other'\] are not in this model's "
                                         r"module pool \['linear1A', 'linear2B', 'linear2C', "
                                         r"'relu'\]"):
        check_compatible(v1._replace(variables=extra), ["task1", "task2"], pool, None)


def test_initialised_model_checks_every_leaf_shape_and_dtype(model, tmp_path):
    variables = host(model.variables)
    variables["params"]["linear1A"]["kernel"] = variables["params"]["linear1A"]["kernel"].astype(
        np.float16)
    variables["params"]["linear2B"]["bias"] = np.zeros(3, np.float32)
    del variables["params"]["linear2C"]["bias"]
    path = tmp_path / "bad.msgpack"
    path.write_bytes(encode_params(variables, "m", model.task_names, list(model.module_pool)))
    target = two_tasks(seed=5)
    target.init({"data": np.zeros((1, 2), np.float32)})
    before = host(target.variables)
    with pytest.raises(ValueError) as error:
        target.load(path)
    assert str(error.value) == (
        f"{path}: cannot load into this model: saved variables do not match the model's: "
        f"missing ['params/linear2C/bias']; shape or dtype differs: "
        f"['params/linear1A/kernel: expected (2, 10) float32, found (2, 10) float16', "
        f"'params/linear2B/bias: expected (2,) float32, found (3,) float32']")
    assert_same(before, host(target.variables))


@pytest.mark.parametrize("changes, message", [
    ({"version": 3}, r"unknown jaxmtl.params version 3; this jaxmtl reads versions \[1, 2\]"),
    ({"format": "other"}, r"not a jaxmtl params file: format 'other', expected 'jaxmtl.params'"),
    ({"variables": DROP}, r"version 2 file lacks fields \['variables'\]"),
    ({"checksum": DROP, "module_pool": DROP},
     r"version 2 file lacks fields \['module_pool', 'checksum'\]"),
    ({"variables": [1, 2]}, r"'variables' must be a non-empty map \{collection: \{module: "
                            r"...\}\}, got list"),
    ({"variables": {"params": 3}}, r"variables\['params'\] must be a map \{module: ...\}, got int"),
    ({"variables": {"params": {"linear1A": {"kernel": "x"}}}},
     r"variable 'params/linear1A/kernel' must be a numeric array, got str"),
    ({"task_names": "task1"}, r"'task_names' must be a list of names, got 'task1'"),
])
def test_malformed_payloads_raise_value_error(tmp_path, changes, message):
    path = write_payload(tmp_path / "p.msgpack", **changes)
    fresh = MultitaskClassifier([make_task("task1")])
    with pytest.raises(ValueError, match=message):
        fresh.load(path)
    assert fresh.variables is None


def test_load_path_that_is_neither_file_nor_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: not a model.save file nor a checkpoint "
                                         r"directory; expected a best_model_<metric> directory"):
        two_tasks().load(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        two_tasks().load(tmp_path / "absent")


# --- atomic saves -------------------------------------------------------------------------
def test_failing_save_leaves_old_file_and_no_temp_file(model, tmp_path, monkeypatch):
    path = tmp_path / "m.msgpack"
    model.save(path)
    old = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(serialization, "msgpack_serialize", fail)
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    monkeypatch.undo()
    monkeypatch.setattr(os, "fsync", fail)  # fails with the temp file written
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    assert os.listdir(tmp_path) == ["m.msgpack"]
    assert path.read_bytes() == old


def test_concurrent_saves_to_one_path_leave_a_valid_file(model, tmp_path):
    path = tmp_path / "m.msgpack"
    errors = []

    def save_many():
        try:
            for _ in range(15):
                model.save(path)
        except BaseException as error:  # a shared temp file: FileNotFoundError on replace
            errors.append(error)

    threads = [threading.Thread(target=save_many) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert os.listdir(tmp_path) == ["m.msgpack"]
    fresh = two_tasks(seed=9)
    fresh.load(path)
    assert_same(host(model.variables), host(fresh.variables))


# --- checkpointer directories -------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint_dir(model, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("ckpt"))
    checkpointer = Checkpointer(checkpoint_dir=directory, checkpoint_metric=f"{METRIC}:max",
                                checkpoint_clear=False, async_save=False)
    checkpointer.checkpoint(1, model, {METRIC: 0.5})
    checkpointer.close()
    return directory


@pytest.mark.parametrize("relative", [BEST, f"{BEST}/0", "checkpoints/0"])
def test_load_checkpointer_directories_into_a_fresh_model(model, checkpoint_dir, relative):
    fresh = two_tasks(seed=9)
    fresh.load(os.path.join(checkpoint_dir, relative))
    assert_same(host(model.variables), host(fresh.variables))


def test_load_checkpoint_dir_root_says_which_to_pass(checkpoint_dir):
    with pytest.raises(ValueError, match=rf"a checkpoint_dir, not one checkpoint; pass one of "
                                         rf"its best-model directories \['{BEST}'\] or a step "
                                         rf"directory checkpoints/<n>"):
        two_tasks().load(checkpoint_dir)


def test_checkpoint_that_does_not_fit_is_refused(checkpoint_dir):
    other = MultitaskClassifier([make_task("task1")])  # no linear2C in its pool
    with pytest.raises(ValueError, match=r"saved modules \['linear2C'\] are not in this "
                                         r"model's module pool"):
        other.load(os.path.join(checkpoint_dir, BEST))
    assert other.variables is None


def test_load_best_model_in_a_new_process_on_a_fresh_model(model, checkpoint_dir, tmp_path):
    # A new Checkpointer over the same directory has tracked nothing in this process.
    checkpointer = Checkpointer(checkpoint_dir=checkpoint_dir, checkpoint_metric=f"{METRIC}:max")
    fresh = two_tasks(seed=9)
    assert checkpointer.load_best_model(fresh) is fresh
    assert_same(host(model.variables), host(fresh.variables))
    checkpointer.close()
    empty = Checkpointer(checkpoint_dir=str(tmp_path), checkpoint_metric=f"{METRIC}:max")
    with pytest.raises(CheckpointError, match=rf"No best model of {METRIC} in .*{BEST}, and the "
                                              rf"model is uninitialised"):
        empty.load_best_model(two_tasks())


def test_load_survives_an_unused_parameter_free_flax_module(tmp_path):
    # nn.Dropout owns no variables; a version-2 file records that the saving model had it.
    def task():
        return jaxmtl.Task(
            name="t", module_pool={"dense": nn.Dense(2), "drop": nn.Dropout(0.5, deterministic=True)},
            op_sequence=[jaxmtl.Operation("dense", [("_input_", "data")]),
                         jaxmtl.Operation("drop", ["dense"])])

    saved = MultitaskClassifier([task()])
    saved.init({"data": np.zeros((1, 2), np.float32)})
    saved.save(tmp_path / "m")
    fresh = MultitaskClassifier([task()])
    fresh.load(tmp_path / "m")
    assert_same(host(saved.variables), host(fresh.variables))
