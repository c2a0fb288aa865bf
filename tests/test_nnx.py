"""Flax NNX modules in the module pool: layout, training, modes, persistence, devices."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import linear_data
from flax import nnx

import jaxmtl
from jaxmtl.initialisation import init_variables
from jaxmtl.model import apply_ops, build_graph

ROOT = Path(__file__).resolve().parents[1]


def loaders(n_train=192, n_valid=96, batch_size=32):
    """task1: x0 + x1 > 0; task2: x0 + x1 > 0.3 (train shuffled, valid in order)."""
    out = []
    for split, seed, n in [("train", 0, n_train), ("valid", 1, n_valid)]:
        for task, offset, bias in [("task1", 0, 0.0), ("task2", 10, 0.3)]:
            X, Y = linear_data(n, seed + offset, bias=bias)
            ds = jaxmtl.DictDataset(f"d_{task}", split, {"data": X}, {task: Y})
            out.append(jaxmtl.DictDataLoader(ds, batch_size=batch_size,
                                             shuffle=split == "train", seed=seed + offset))
    return out


def two_tasks(body, head1, head2, body_is_relu=False):
    """task1 and task2 share ``body`` (then relu) and have their own heads."""
    tasks = []
    for name, head_name, head in [("task1", "head1", head1), ("task2", "head2", head2)]:
        pool = {"body": body, "relu": jax.nn.relu, head_name: head}
        ops = [jaxmtl.Operation("body", [("_input_", "data")]),
               jaxmtl.Operation("relu", ["body"]),
               jaxmtl.Operation(head_name, ["relu"])]
        tasks.append(jaxmtl.Task(name, pool, ops))
    return tasks


def nnx_model(seed=0):
    rngs = nnx.Rngs(seed)
    return jaxmtl.MultitaskClassifier(two_tasks(
        nnx.Linear(2, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)))


def linen_twin(model, X):
    """A Linen model whose initial variables are ``model``'s (an NNX model, uninitialised)."""
    twin = jaxmtl.MultitaskClassifier(two_tasks(nn.Dense(8), nn.Dense(2), nn.Dense(2)))
    twin.init({"data": X})
    model.init({"data": X})
    twin.variables = jax.tree.map(jnp.asarray, model.variables)
    return twin


def assert_trees_equal(a, b, rtol=0.0, atol=0.0):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_issue_example_now_trains():
    body = nnx.Sequential(nnx.Linear(2, 8, rngs=nnx.Rngs(0)), nnx.relu)
    head = nnx.Linear(8, 2, rngs=nnx.Rngs(1))
    ops = [jaxmtl.Operation("body", [("_input_", "data")]), jaxmtl.Operation("head", ["body"])]
    model = jaxmtl.MultitaskClassifier([jaxmtl.Task("task1", {"body": body, "head": head}, ops)])
    dls = loaders()[::2]
    jaxmtl.Trainer(n_epochs=3, lr=0.05, seed=0, progress_bar=False).fit(model, dls)
    # Sequential's layer 0 is stored under the string key "0".
    assert jax.tree.map(jnp.shape, model.params) == {
        "body": {"layers": {"0": {"kernel": (2, 8), "bias": (8,)}}},
        "head": {"kernel": (8, 2), "bias": (2,)}}
    assert model.score(dls[1:])["task1/d_task1/valid/accuracy"] > 0.9
    # The user's module objects keep their own (initial) values.
    np.testing.assert_array_equal(np.asarray(head.kernel[...]),
                                  np.asarray(nnx.Linear(8, 2, rngs=nnx.Rngs(1)).kernel[...]))


def test_shared_nnx_module_trains_like_its_linen_twin():
    dls = loaders()
    model = nnx_model()
    twin = linen_twin(model, dls[0].dataset.X_dict["data"][:4])
    # One "body" entry, the module's own initial values.
    body = model.graph.module_pool["body"]
    np.testing.assert_array_equal(model.params["body"]["kernel"], np.asarray(body.kernel[...]))
    assert sorted(model.params) == ["body", "head1", "head2"]
    for m in (model, twin):
        jaxmtl.Trainer(n_epochs=2, lr=0.05, seed=0, progress_bar=False).fit(m, dls)
    assert_trees_equal(model.variables, twin.variables, rtol=1e-6, atol=1e-7)
    assert not np.allclose(model.params["body"]["kernel"], np.asarray(body.kernel[...]))
    np.testing.assert_allclose(model.score(dls[2:])["model/all/valid/accuracy"],
                               twin.score(dls[2:])["model/all/valid/accuracy"])


def test_gradient_balancer_with_nnx_matches_linen_twin():
    dls = loaders()
    model = nnx_model()
    twin = linen_twin(model, dls[0].dataset.X_dict["data"][:4])
    for m in (model, twin):
        jaxmtl.Trainer(n_epochs=2, lr=0.05, seed=0, progress_bar=False,
                       batch_scheduler="mixed", balancer="pcgrad").fit(m, dls)
    assert_trees_equal(model.variables, twin.variables, rtol=1e-6, atol=1e-7)


def test_linen_and_nnx_mixed_in_one_model():
    dls = loaders()
    model = jaxmtl.MultitaskClassifier(two_tasks(
        nnx.Linear(2, 8, rngs=nnx.Rngs(0)), nn.Dense(2), nnx.Linear(8, 2, rngs=nnx.Rngs(1))))
    jaxmtl.Trainer(n_epochs=3, lr=0.05, seed=0, progress_bar=False).fit(model, dls)
    assert jax.tree.map(jnp.shape, model.params)["head1"] == {"kernel": (8, 2), "bias": (2,)}
    scores = model.score(dls[2:])
    assert scores["task1/d_task1/valid/accuracy"] > 0.9, scores
    assert scores["task2/d_task2/valid/accuracy"] > 0.85, scores


# --- BatchNorm and Dropout --------------------------------------------------------------
def bn_dropout_body(seed=0):
    rngs = nnx.Rngs(seed, dropout=seed + 1)
    return nnx.Sequential(nnx.Linear(2, 8, rngs=rngs), nnx.BatchNorm(8, rngs=rngs),
                          nnx.Dropout(0.5, rngs=rngs))


def bn_model(seed=0):
    return jaxmtl.MultitaskClassifier(two_tasks(
        bn_dropout_body(seed), nnx.Linear(8, 2, rngs=nnx.Rngs(seed + 2)),
        nnx.Linear(8, 2, rngs=nnx.Rngs(seed + 3))))


def test_batchnorm_and_dropout_layout_and_modes():
    body = bn_dropout_body()
    graph = build_graph([jaxmtl.Task("t", {"body": body}, [
        jaxmtl.Operation("body", [("_input_", "x")])])])
    X = np.random.default_rng(0).normal(size=(16, 2)).astype(np.float32)
    variables = init_variables(graph, {"x": X}, jax.random.PRNGKey(0))
    # Params and BatchNorm statistics in their Linen collections; no RNG state stored.
    assert jax.tree.map(jnp.shape, variables) == {
        "params": {"body": {"layers": {"0": {"kernel": (2, 8), "bias": (8,)},
                                       "1": {"scale": (8,), "bias": (8,)}}}},
        "batch_stats": {"body": {"layers": {"1": {"mean": (8,), "var": (8,)}}}}}

    # Evaluation: NNX's eval mode (running averages, no dropout), deterministic.
    evaluated, same = (apply_ops(graph, variables, {"x": X}, ["t"])[0]["body"]
                       for _ in range(2))
    reference = nnx.view(body, deterministic=True, use_running_average=True)(jnp.asarray(X))
    np.testing.assert_allclose(evaluated, reference, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(evaluated, same)

    # Training: batch statistics, momentum 0.99 (hand-computed), and dropout from the key.
    key = jax.random.PRNGKey(5)
    out_a, new_vars = apply_ops(graph, variables, {"x": X}, ["t"], train=True, rng=key)
    out_b, _ = apply_ops(graph, variables, {"x": X}, ["t"], train=True, rng=key)
    out_c, _ = apply_ops(graph, variables, {"x": X}, ["t"], train=True,
                         rng=jax.random.PRNGKey(6))
    kernel = np.asarray(body.layers[0].kernel[...])
    hidden = X @ kernel + np.asarray(body.layers[0].bias[...])
    np.testing.assert_allclose(new_vars["batch_stats"]["body"]["layers"]["1"]["mean"],
                               0.01 * hidden.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new_vars["batch_stats"]["body"]["layers"]["1"]["var"],
                               0.99 + 0.01 * hidden.var(0), rtol=1e-5)
    normalised = (hidden - hidden.mean(0)) / np.sqrt(hidden.var(0) + 1e-5)
    kept = np.asarray(out_a["body"]) != 0
    assert 0.3 < kept.mean() < 0.7
    np.testing.assert_allclose(np.asarray(out_a["body"])[kept], 2 * normalised[kept],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out_a["body"], out_b["body"])  # same key, same masks
    assert not np.array_equal(out_a["body"], out_c["body"])
    assert_trees_equal(new_vars["params"], variables["params"])


def test_batchnorm_dropout_model_fits_saves_and_loads(tmp_path):
    dls = loaders()
    model = bn_model()
    jaxmtl.Trainer(n_epochs=3, lr=0.05, seed=0, progress_bar=False).fit(model, dls)
    stats = model.variables["batch_stats"]["body"]["layers"]["1"]
    assert np.all(np.abs(np.asarray(stats["mean"])) > 0)  # updated in training
    scores = model.score(dls[2:])
    assert scores["model/all/valid/accuracy"] > 0.85, scores

    model.save(tmp_path / "model.msgpack")
    other = bn_model(seed=7)  # other initial values, same structure
    other.load(tmp_path / "model.msgpack")
    assert_trees_equal(other.variables, model.variables)
    assert other.score(dls[2:]) == scores


class Interrupt(Exception):
    pass


class InterruptingLoader(jaxmtl.DictDataLoader):
    def __init__(self, *args, stop_at=-1, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_at, self.drawn = stop_at, 0

    def batch_at(self, order, index):
        self.drawn += 1
        if self.drawn == self.stop_at:
            raise Interrupt(self.drawn)
        return super().batch_at(order, index)


def interrupted_and_resumed(tmp_path, n_train, batch_size, stop_at, with_valid=True):
    """(uninterrupted variables, variables after a stop at loader 0's draw ``stop_at`` and a
    resume from the last checkpoint) of a 2-epoch BatchNorm + Dropout NNX run."""
    def run(checkpoint_dir, stop_at=-1, resume=False):
        dls = loaders(n_train=n_train, batch_size=batch_size)
        dls = dls if with_valid else dls[:2]
        dls[0] = InterruptingLoader(dls[0].dataset, batch_size=batch_size, shuffle=True,
                                    seed=0, stop_at=stop_at)
        model = bn_model()
        trainer = jaxmtl.Trainer(
            n_epochs=2, lr=0.05, seed=0, progress_bar=False, checkpointing=True,
            log_manager_config={"counter_unit": "batches", "evaluation_freq": 4},
            checkpointer_config={"checkpoint_dir": str(checkpoint_dir)})
        trainer.fit(model, dls, resume_from=str(checkpoint_dir) if resume else None)
        return model.variables

    reference = run(tmp_path / "reference")
    with pytest.raises(Interrupt):
        run(tmp_path / "ck", stop_at=stop_at)
    return reference, run(tmp_path / "ck", resume=True)


def test_checkpoint_resume_is_bit_identical_small(tmp_path):
    # 64 rows a task, batches of 16: 8 batches an epoch; stopped at loader 0's 6th draw
    # (epoch 1), resumed from the checkpoint at batch 8.
    reference, resumed = interrupted_and_resumed(tmp_path, 64, 16, 6, with_valid=False)
    assert_trees_equal(resumed, reference)


@pytest.mark.slow  # test_checkpoint_resume_is_bit_identical_small covers it by default
def test_checkpoint_resume_is_bit_identical(tmp_path):
    # 6 + 6 batches an epoch, with valid loaders; stopped in epoch 1 of 2.
    reference, resumed = interrupted_and_resumed(tmp_path, 192, 32, 10)
    assert_trees_equal(resumed, reference)


# --- devices ------------------------------------------------------------------------------
DEVICE_RUN = """
import json, os, sys
os.environ["XLA_FLAGS"] = os.environ.get("JAXMTL_TEST_FAST_COMPILE_FLAG", "") + f" --xla_force_host_platform_device_count={sys.argv[1]}"
import jax, numpy as np
sys.path.insert(0, {tests!r})
import test_nnx
from test_nnx import loaders
import jaxmtl
assert len(jax.local_devices()) == int(sys.argv[1])
out = {}
for parallel in sys.argv[2].split(","):
    model = getattr(test_nnx, sys.argv[3])()
    jaxmtl.Trainer(n_epochs=2, lr=0.05, seed=0, progress_bar=False, parallel=parallel,
                   optimizer=sys.argv[4]).fit(model, loaders(batch_size=40))
    out[parallel] = jax.tree.map(lambda a: np.asarray(a).tolist(), model.variables)
print(json.dumps(out))
"""


def device_run(n_devices, parallel, model="nnx_model", optimizer="adam"):
    """The variables after 2 epochs of ``model()`` (a builder here) on forced CPU devices.

    ``parallel`` may list several modes ("single,pmap"), trained one after the other in
    the one process: then {mode: variables}."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", DEVICE_RUN.replace("{tests!r}", repr(str(ROOT / "tests"))),
         str(n_devices), parallel, model, optimizer], capture_output=True, text=True, timeout=600,
        env=env, cwd=ROOT / "tests")
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    return out if "," in parallel else out[parallel]


@pytest.fixture(scope="module")
def four_device_runs():
    """The one-device ("single": the first device only) and 4-device pmap runs, in ONE
    4-device process (one Python + JAX import)."""
    return device_run(4, "single,pmap")


def test_4_devices_match_one_device_pmap(four_device_runs):
    assert_trees_equal(four_device_runs["pmap"], four_device_runs["single"], rtol=1e-5,
                       atol=1e-6)


# sharded = one device is checked by default in test_parallel.py (BatchNorm, MGDA-UB).
@pytest.mark.slow
def test_4_devices_match_one_device_sharded():
    assert_trees_equal(device_run(4, "sharded"), device_run(1, "single"), rtol=1e-5,
                       atol=1e-6)


# Two subprocess runs (~40 s on 2 busy cores). By default NNX BatchNorm statistics are
# checked on one device above, NNX on 4 pmap devices above, and Linen BatchNorm under the
# sharded mode against one device in test_parallel.py.
@pytest.mark.slow
def test_batchnorm_dropout_sharded_on_2_devices_matches_one_device():
    # SGD: the body's Linear bias, just before BatchNorm, has a gradient of 0 up to float
    # rounding (BatchNorm removes any shift), which Adam's first steps scale up to +-lr
    # whatever its sign: 0.03 apart after one step, for Linen's BatchNorm as well.
    one = device_run(1, "single", "bn_model", "sgd")
    two = device_run(2, "sharded", "bn_model", "sgd")
    assert set(one) == {"params", "batch_stats"}
    assert_trees_equal(two, one, rtol=1e-5, atol=1e-6)
    stats = np.asarray(two["batch_stats"]["body"]["layers"]["1"]["mean"])
    assert np.all(np.abs(stats) > 0)  # statistics were updated, on both devices' rows


def test_batchnorm_trains_in_bf16_with_float32_statistics():
    dls = loaders(n_train=96, n_valid=32)
    model = bn_model()
    model.init({"data": dls[0].dataset.X_dict["data"][:4]})
    initial = jax.tree.map(np.asarray, model.variables)
    trainer = jaxmtl.Trainer(n_epochs=2, lr=0.05, seed=0, progress_bar=False,
                             precision="bf16")
    trainer.fit(model, dls[:2])
    for leaf in jax.tree.leaves((model.variables, trainer.state.opt_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32, leaf.dtype
    loss = trainer.metrics["model/all/train/loss"]
    assert np.isfinite(loss) and 0 < loss < 1.0, loss
    stats = model.variables["batch_stats"]["body"]["layers"]["1"]
    before = initial["batch_stats"]["body"]["layers"]["1"]
    # 12 steps (2 epochs x 2 tasks x 3 batches) of momentum 0.99 from (0, 1): the
    # statistics moved, and the variance kept at least 0.99 ** 12 of its initial 1.
    assert int(trainer.state.step) == 12
    assert np.all(np.asarray(stats["mean"]) != before["mean"])
    assert np.all(np.asarray(stats["var"]) != before["var"])
    assert np.all(np.asarray(stats["var"]) >= 0.99 ** 12 * (1 - 1e-3))
    assert not np.allclose(model.params["body"]["layers"]["0"]["kernel"],
                           initial["params"]["body"]["layers"]["0"]["kernel"])


# --- the NNX quickstart -------------------------------------------------------------------
def quickstart_scores(name):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        return __import__(name).main()
    finally:
        sys.path.remove(str(ROOT / "examples"))


@pytest.mark.slow  # NNX training is checked against Linen twins above; test_examples.py runs the
def test_nnx_quickstart_scores():  # Linen quickstart by default
    scores = quickstart_scores("quickstart_nnx")
    # The Linen quickstart's thresholds (tests/test_examples.py); measured 0.989 / 0.977.
    assert scores["task_a/synthetic_a/valid/accuracy"] > 0.95
    assert scores["task_b/synthetic_b/valid/accuracy"] > 0.95


@pytest.mark.slow
def test_nnx_quickstart_matches_linen_quickstart():
    nnx_scores, linen_scores = quickstart_scores("quickstart_nnx"), quickstart_scores("quickstart")
    for key in ("task_a/synthetic_a/valid/accuracy", "task_b/synthetic_b/valid/accuracy"):
        assert nnx_scores[key] == pytest.approx(linen_scores[key], abs=0.005), key


# --- what the pool accepts ----------------------------------------------------------------
class EquinoxLike:
    """An object holding its weights as attributes (as equinox modules do)."""

    def __init__(self):
        self.weight = jnp.ones((2, 2))

    def __call__(self, x):
        return x @ self.weight


def task_with(module):
    return jaxmtl.Task("t", {"m": module}, [jaxmtl.Operation("m", [("_input_", "x")])])


@pytest.mark.parametrize("module, found", [
    (functools.partial(nn.Dense(2)), "a functools.partial over a Flax Linen module (Dense)"),
    (functools.partial(nnx.Linear(2, 2, rngs=nnx.Rngs(0))),
     "a functools.partial over a Flax NNX module (Linear)"),
    (EquinoxLike(), "a EquinoxLike object whose attribute 'weight' is a jax array of shape "
                    "(2, 2)"),
])
def test_pool_entries_holding_parameters_are_rejected(module, found):
    expected = (f"Task 't': module_pool['m'] is {found}; jaxmtl would run those weights "
                f"without training them. Expected a Flax Linen module, a Flax NNX module, or "
                f"a parameter-free callable")
    with pytest.raises(ValueError) as error:
        task_with(module)
    assert str(error.value).startswith(expected), str(error.value)


def test_function_calling_a_closed_over_module_is_rejected():
    layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"module_pool\['m'\] is a function that calls a Flax "
                                         r"NNX module \(Linear\) it refers to as 'layer'"):
        task_with(lambda x: layer(x))


def test_classifier_rejects_a_pool_changed_after_the_task_was_built():
    task = task_with(jax.nn.relu)
    task.module_pool["m"] = functools.partial(nn.Dense(2))
    with pytest.raises(ValueError, match=r"Task 't': module_pool\['m'\] is a functools.partial"):
        jaxmtl.MultitaskClassifier([task])


@pytest.mark.parametrize("module", [jax.nn.relu, jnp.mean, lambda x: x * 2, jnp.tanh,
                                    functools.partial(jnp.mean, axis=1), np.asarray])
def test_parameter_free_callables_are_accepted(module):
    assert task_with(module).module_pool["m"] is module


def test_two_nnx_objects_under_one_name_are_an_error():
    one, two = (two_tasks(nnx.Linear(2, 8, rngs=nnx.Rngs(0)), nn.Dense(2), nn.Dense(2))
                for _ in range(2))
    with pytest.raises(ValueError, match="an NNX module owns its weights, so tasks that share "
                                         "it must put the same object in their pools"):
        jaxmtl.MultitaskClassifier([one[0], two[1]])


# --- other variable types -----------------------------------------------------------------
class Calls(nnx.Variable):
    """A user variable type (unregistered with Flax: its collection is its class name)."""


class CountingLinear(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(2, 2, rngs=rngs)
        self.calls = Calls(jnp.zeros((), jnp.int32))

    def __call__(self, x):
        self.calls[...] += 1
        return self.linear(x)


def one_op_graph(module):
    return build_graph([jaxmtl.Task("t", {"m": module}, [
        jaxmtl.Operation("m", [("_input_", "x")])])])


def test_user_variable_type_is_its_own_collection_updated_in_training():
    graph = one_op_graph(CountingLinear(nnx.Rngs(0)))
    X = {"x": jnp.ones((3, 2))}
    variables = init_variables(graph, X, jax.random.PRNGKey(0))
    assert jax.tree.map(int, variables["Calls"]) == {"m": {"calls": 0}}
    _, after_eval = apply_ops(graph, variables, X, ["t"])
    _, after_train = apply_ops(graph, variables, X, ["t"], train=True)
    assert int(after_eval["Calls"]["m"]["calls"]) == 0  # evaluation changes nothing
    assert int(after_train["Calls"]["m"]["calls"]) == 1


def test_dropout_without_its_own_stream_gets_the_op_key():
    graph = one_op_graph(nnx.Dropout(0.5))  # no rngs: its __call__ takes them
    X = {"x": jnp.ones((4, 64))}
    variables = init_variables(graph, X, jax.random.PRNGKey(0))
    assert variables == {"params": {}}
    runs = [np.asarray(apply_ops(graph, variables, X, ["t"], train=True,
                                 rng=jax.random.PRNGKey(k))[0]["m"]) for k in (1, 1, 2)]
    assert set(np.unique(runs[0])) == {0.0, 2.0}
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])
    np.testing.assert_array_equal(apply_ops(graph, variables, X, ["t"])[0]["m"], X["x"])


class Labelled(nnx.Module):
    def __init__(self):
        self.tag = nnx.Variable("text")

    def __call__(self, x):
        return x


def test_nnx_variable_that_is_not_an_array_is_rejected():
    with pytest.raises(ValueError, match="NNX module 'm': variable tag \\(Variable\\) holds "
                                         "str; jaxmtl stores NNX variables whose values are "
                                         "numeric arrays"):
        one_op_graph(Labelled())
