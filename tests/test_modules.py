"""jaxmtl.modules: shapes, gates against hand computations, errors, and training in a model."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmtl
from jaxmtl.modules import (
    CGC,
    PLE,
    CrossStitch,
    DSelectK,
    MMoE,
    SharedBottom,
    gate_weights,
    smooth_step,
)

TASKS = ("a", "b")
X = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (6, 5)))

ARCHITECTURES = {
    "shared": lambda tasks: SharedBottom(tasks, features=(8,)),
    "mmoe": lambda tasks: MMoE(tasks, num_experts=3, expert_features=(8,)),
    "cgc": lambda tasks: CGC(tasks, num_shared_experts=2, num_task_experts=1,
                             expert_features=(8,)),
    "ple": lambda tasks: PLE(tasks, num_levels=2, num_shared_experts=1, num_task_experts=1,
                             expert_features=(8,)),
    "cross_stitch": lambda tasks: CrossStitch(tasks, features=(8, 8)),
    "dselect_k": lambda tasks: DSelectK(tasks, num_experts=4, k=2, expert_features=(8,)),
}


def relu(x):
    return np.maximum(x, 0.0)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def init(module, x=X, seed=0):
    # Jitted: one compile of the whole init (its random initialisers) costs a fraction of
    # an eager, op-by-op one.
    return jax.jit(module.init)(jax.random.PRNGKey(seed), x)


def apply(module, variables, *args, **kwargs):
    """``module.apply`` under jit: one compile instead of an eager, op-by-op run (which
    compiles every primitive on its own; test_mmoe_matches_numpy_and_gates_sum_to_one keeps
    the eager path)."""
    return jax.jit(functools.partial(module.apply, **kwargs))(variables, *args)


def param_shapes(module):
    """The parameters' shapes, traced without compiling anything."""
    return jax.tree.map(lambda a: a.shape,
                        jax.eval_shape(module.init, jax.random.PRNGKey(0), X)["params"])


# ---- shapes ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_output_is_one_representation_per_task(name):
    tasks = ("t0", "t1", "t2")
    module = ARCHITECTURES[name](tasks)
    variables = init(module)
    assert set(variables) == {"params"}  # gates are sown, never stored as variables
    out = apply(module, variables, X)
    assert list(out) == list(tasks)
    assert {task: value.shape for task, value in out.items()} == {t: (6, 8) for t in tasks}
    # Extra leading axes pass through (e.g. [batch, time, in]).
    out3 = apply(module, variables, np.stack([X, X], 1))
    assert out3[tasks[0]].shape == (6, 2, 8)
    np.testing.assert_allclose(out3[tasks[0]][:, 1], out[tasks[0]], rtol=1e-5, atol=1e-6)


def test_parameter_shapes_of_stacked_experts():
    shapes = param_shapes(MMoE(TASKS, 3, (8, 4)))
    assert shapes == {"experts": {"layer_0": {"kernel": (3, 5, 8), "bias": (3, 8)},
                                  "layer_1": {"kernel": (3, 8, 4), "bias": (3, 4)}},
                      "gate": {"kernel": (2, 5, 3), "bias": (2, 3)}}
    shapes = param_shapes(CrossStitch(("a", "b", "c"), (8,)))
    assert shapes == {"tower_0": {"kernel": (3, 5, 8), "bias": (3, 8)}, "stitch_0": (3, 3)}


# ---- outputs and gates against numpy --------------------------------------------------

def test_mmoe_matches_numpy_and_gates_sum_to_one():
    module = MMoE(TASKS, num_experts=3, expert_features=(4,))
    variables = init(module)
    p = jax.tree.map(np.asarray, variables["params"])
    experts = relu(np.einsum("bd,edh->beh", X, p["experts"]["layer_0"]["kernel"])
                   + p["experts"]["layer_0"]["bias"])
    out = module.apply(variables, X)
    gates = gate_weights(module, variables, X)["gates"]
    for t, task in enumerate(TASKS):
        gate = softmax(X @ p["gate"]["kernel"][t] + p["gate"]["bias"][t])
        np.testing.assert_allclose(gates[task], gate, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(gates[task]).sum(-1), np.ones(6), atol=1e-6)
        np.testing.assert_allclose(out[task], np.einsum("be,beh->bh", gate, experts),
                                   rtol=1e-5, atol=1e-6)


def test_cgc_task_gate_sees_only_its_own_and_the_shared_experts():
    module = CGC(TASKS, num_shared_experts=2, num_task_experts=1, expert_features=(4,))
    variables = init(module)
    p = jax.tree.map(np.asarray, variables["params"])

    def experts(tree):
        return relu(np.einsum("bd,edh->beh", X, tree["layer_0"]["kernel"])
                    + tree["layer_0"]["bias"])

    shared = experts(p["shared_experts"])
    own = experts(p["task_experts"])                 # [B, T * m_t, H], task t's at t * m_t + j
    out = apply(module, variables, X)
    gates = gate_weights(module, variables, X)["gates"]
    for t, task in enumerate(TASKS):
        pool = np.concatenate([own[:, t:t + 1], shared], axis=1)  # m_t = 1: [B, 1 + 2, H]
        gate = softmax(X @ p["task_gates"]["kernel"][t] + p["task_gates"]["bias"][t])
        assert gates[task].shape == (6, 3)
        np.testing.assert_allclose(gates[task], gate, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(gates[task]).sum(-1), np.ones(6), atol=1e-6)
        np.testing.assert_allclose(out[task], np.einsum("be,beh->bh", gate, pool),
                                   rtol=1e-5, atol=1e-6)


def test_cgc_level_with_per_task_inputs_matches_numpy():
    # Inside PLE: task t's experts and gate read input t, the shared experts the shared one.
    module = CGC(TASKS, num_shared_experts=1, num_task_experts=2, expert_features=(4,),
                 shared_gate=True)
    inputs = ((X, 2 * X), X - 1)
    variables = init(module, inputs)
    p = jax.tree.map(np.asarray, variables["params"])
    kernel, bias = p["task_experts"]["layer_0"]["kernel"], p["task_experts"]["layer_0"]["bias"]
    shared = relu((X - 1) @ p["shared_experts"]["layer_0"]["kernel"][0]
                  + p["shared_experts"]["layer_0"]["bias"][0])
    outputs, shared_out = apply(module, variables, inputs)
    every = []
    for t, (task, x_t) in enumerate(zip(TASKS, inputs[0], strict=True)):
        own = [relu(x_t @ kernel[2 * t + j] + bias[2 * t + j]) for j in range(2)]
        every += own
        gate = softmax(x_t @ p["task_gates"]["kernel"][t] + p["task_gates"]["bias"][t])
        expected = gate[:, :1] * own[0] + gate[:, 1:2] * own[1] + gate[:, 2:] * shared
        np.testing.assert_allclose(outputs[task], expected, rtol=1e-5, atol=1e-5)
    every.append(shared)
    gate = softmax((X - 1) @ p["shared_gate"]["kernel"] + p["shared_gate"]["bias"])
    np.testing.assert_allclose(shared_out, sum(gate[:, i:i + 1] * e for i, e in enumerate(every)),
                               rtol=1e-5, atol=1e-5)


def test_ple_stacks_cgc_levels_through_the_shared_gate():
    module = PLE(TASKS, num_levels=2, num_shared_experts=2, num_task_experts=1,
                 expert_features=(4,))
    variables = init(module)
    p = variables["params"]
    level_0 = CGC(TASKS, 2, 1, (4,), shared_gate=True)
    level_1 = CGC(TASKS, 2, 1, (4,))
    outputs, shared = apply(level_0, {"params": p["level_0"]}, X)
    expected = apply(level_1, {"params": p["level_1"]},
                             (tuple(outputs[t] for t in TASKS), shared))
    got = apply(module, variables, X)
    for task in TASKS:
        np.testing.assert_allclose(got[task], expected[task], rtol=1e-6)
    gates = jitted_gates(module, variables, X)
    assert sorted(gates) == ["level_0", "level_1"]
    assert "shared_gates" not in gates["level_1"]  # the last level has no shared branch
    assert gates["level_0"]["shared_gates"].shape == (6, 2 * 1 + 2)  # every expert of level 0
    for gate in jax.tree.leaves(gates):
        np.testing.assert_allclose(np.asarray(gate).sum(-1), np.ones(6), atol=1e-6)
    # One level is a CGC with the same weights.
    single = PLE(TASKS, num_levels=1, num_shared_experts=2, num_task_experts=1,
                 expert_features=(4,))
    single_vars = init(single)
    cgc_out = apply(CGC(TASKS, 2, 1, (4,)), {"params": single_vars["params"]["level_0"]}, X)
    np.testing.assert_allclose(apply(single, single_vars, X)["a"], cgc_out["a"], rtol=1e-6)


def test_cross_stitch_starts_near_identity_and_matches_numpy():
    for tasks, self_weight, other in [(("a", "b"), 0.9, 0.1), (("a", "b", "c"), 0.8, 0.1)]:
        module = CrossStitch(tasks, features=(4,), self_weight=self_weight)
        unit = np.asarray(init(module)["params"]["stitch_0"])
        expected = np.full((len(tasks),) * 2, other) + (self_weight - other) * np.eye(len(tasks))
        np.testing.assert_allclose(unit, expected, rtol=1e-6)
        np.testing.assert_allclose(unit.sum(1), np.ones(len(tasks)), rtol=1e-6)
    module = CrossStitch(TASKS, features=(4, 3))
    variables = init(module)
    p = jax.tree.map(np.asarray, variables["params"])
    p["stitch_1"] = np.array([[0.7, 0.3], [-0.2, 1.5]], np.float32)  # any learned values
    towers = relu(np.einsum("bi,tio->tbo", X, p["tower_0"]["kernel"]) + p["tower_0"]["bias"][:, None])
    h = np.einsum("ts,sbo->tbo", p["stitch_0"], towers)
    towers = relu(np.einsum("tbi,tio->tbo", h, p["tower_1"]["kernel"]) + p["tower_1"]["bias"][:, None])
    h = np.einsum("ts,sbo->tbo", p["stitch_1"], towers)
    out = apply(module, {"params": p}, X)
    for t, task in enumerate(TASKS):
        np.testing.assert_allclose(out[task], h[t], rtol=1e-5, atol=1e-6)
    stitch = gate_weights(module, {"params": p}, X)["stitch"]
    np.testing.assert_allclose(stitch[1], p["stitch_1"])


def test_smooth_step_values():
    t = jnp.array([-2.0, -0.5, -0.25, 0.0, 0.25, 0.5, 2.0])
    # -2 t^3 + 1.5 t + 0.5 for gamma = 1: S(-0.25) = 0.03125 - 0.375 + 0.5 = 0.15625
    np.testing.assert_allclose(smooth_step(t, 1.0),
                               [0, 0, 0.15625, 0.5, 0.84375, 1, 1], atol=1e-7)
    # C^1: the slope is 3/(2 gamma) at 0 and 0 at the ends of the cubic region.
    slope = jax.vmap(jax.grad(lambda v: smooth_step(v, 2.0)))(jnp.array([-1.0, 0.0, 1.0]))
    np.testing.assert_allclose(slope, [0.0, 0.75, 0.0], atol=1e-6)


def jitted_gates(module, variables, x):
    """``gate_weights`` under jit (one compile; test_mmoe_matches_numpy_and_gates_sum_to_one
    and the cross-stitch test call it eagerly)."""
    return jax.jit(lambda v, x: gate_weights(module, v, x))(variables, x)


def _saturated_dselect_k(num_experts, k, z_bias, w_bias):
    """A DSelectK whose selectors ignore x: z = z_bias, selector weights = softmax(w_bias)."""
    module = DSelectK(("a",), num_experts=num_experts, k=k, expert_features=(4,))
    variables = init(module)
    p = jax.tree.map(np.asarray, variables["params"])
    p["selectors"] = {"kernel": np.zeros_like(p["selectors"]["kernel"]),
                      "bias": np.asarray(z_bias, np.float32)[None]}
    p["selector_weights"] = {"kernel": np.zeros_like(p["selector_weights"]["kernel"]),
                             "bias": np.asarray(w_bias, np.float32)[None]}
    return module, {"params": p}


def test_dselect_k_binary_selectors_pick_the_encoded_experts():
    # 4 experts, 2 bits (bit 0 first); selector 0 codes 01 -> expert 1... as z > gamma/2
    # gives bit 1: z = (+3, -3) is code 1, z = (+3, +3) code 3. Weights softmax(0, log 3).
    module, variables = _saturated_dselect_k(4, 2, [3, -3, 3, 3], [0.0, np.log(3.0)])
    gates = np.asarray(jitted_gates(module, variables, X)["gates"]["a"])
    np.testing.assert_allclose(gates, np.tile([0, 0.25, 0, 0.75], (6, 1)), atol=1e-6)
    out = apply(module, variables, X)["a"]
    experts = relu(np.einsum("bd,edh->beh", X, variables["params"]["experts"]["layer_0"]["kernel"])
                   + variables["params"]["experts"]["layer_0"]["bias"])
    np.testing.assert_allclose(out, 0.25 * experts[:, 1] + 0.75 * experts[:, 3], rtol=1e-5,
                               atol=1e-6)
    # Half-way (z = 0): every code equally likely.
    module, variables = _saturated_dselect_k(4, 1, [0, 0], [0.0])
    np.testing.assert_allclose(jitted_gates(module, variables, X)["gates"]["a"],
                               np.full((6, 4), 0.25), atol=1e-6)


def test_dselect_k_folds_unused_codes_so_gates_sum_to_one():
    # 3 experts need 2 bits; code 3 (z = +3, +3) is folded onto expert 3 mod 3 = 0.
    module, variables = _saturated_dselect_k(3, 1, [3, 3], [0.0])
    np.testing.assert_allclose(jitted_gates(module, variables, X)["gates"]["a"],
                               np.tile([1.0, 0, 0], (6, 1)), atol=1e-6)
    for num_experts, k in [(3, 2), (5, 3), (8, 2)]:
        module = DSelectK(TASKS, num_experts=num_experts, k=k, expert_features=(4,))
        variables = init(module, seed=num_experts)
        for gate in jitted_gates(module, variables, X * 50)["gates"].values():
            assert gate.shape == (6, num_experts)
            assert float(np.asarray(gate).min()) >= 0
            np.testing.assert_allclose(np.asarray(gate).sum(-1), np.ones(6), atol=1e-5)


# ---- modes and errors -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["mmoe", "cross_stitch", "dselect_k", "ple", "shared"])
def test_dropout_only_in_training(name):
    module = ARCHITECTURES[name](TASKS).clone(dropout_rate=0.5)
    assert jaxmtl.model.train_keywords(module) == {"train": True}
    variables = init(module)
    eval_out = apply(module, variables, X)
    np.testing.assert_allclose(apply(module, variables, X, train=False)["a"], eval_out["a"])
    train_out = apply(module, variables, X, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
    assert float(jnp.abs(train_out["a"] - eval_out["a"]).max()) > 1e-3


@pytest.mark.parametrize("build, message", [
    (lambda: MMoE("ab"), "MMoE: task_names is 'ab'; expected a sequence of task names"),
    (lambda: MMoE(()), "MMoE: task_names is (); expected a non-empty sequence"),
    (lambda: CGC(("a", "b", "a")), "CGC: task_names ['a', 'b', 'a'] repeats ['a']"),
    (lambda: MMoE(TASKS, num_experts=0), "MMoE: num_experts is 0; expected an int >= 1"),
    (lambda: PLE(TASKS, num_levels=0), "PLE: num_levels is 0; expected an int >= 1"),
    (lambda: DSelectK(TASKS, num_experts=4, k=5), "DSelectK: k is 5; expected at most "
                                                  "num_experts (4)"),
    (lambda: DSelectK(TASKS, num_experts=1, k=1), "DSelectK: num_experts is 1; expected an "
                                                  "int >= 2"),
    (lambda: DSelectK(TASKS, gamma=0.0), "DSelectK: gamma is 0.0; expected a finite float > 0"),
    (lambda: CrossStitch(TASKS, features=()), "CrossStitch: features is (); expected a "
                                              "non-empty sequence of positive layer widths"),
    (lambda: CrossStitch(TASKS, self_weight=1.5), "CrossStitch: self_weight is 1.5; expected "
                                                  "a float in (0, 1]"),
    (lambda: SharedBottom(TASKS, dropout_rate=1.0), "SharedBottom: dropout_rate is 1.0; "
                                                    "expected a float in [0, 1)"),
])
def test_bad_arguments_name_the_field_and_value(build, message):
    with pytest.raises(ValueError) as raised:
        build()
    assert str(raised.value).startswith(message), str(raised.value)


def test_cgc_with_a_wrong_number_of_task_inputs():
    module = CGC(TASKS, 1, 1, (4,))
    with pytest.raises(ValueError, match=r"CGC: got 1 task inputs for task_names \['a', 'b'\]"):
        init(module, ((X,), X))


# ---- in a jaxmtl model ----------------------------------------------------------------

@pytest.fixture(scope="module")
def loaders():
    """Two linear tasks on one 8-feature input: a = x0 + x1 > 0, b = x2 - x3 > 0."""
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", 320), ("valid", 256)):
        X_split = rng.normal(size=(n, 8)).astype(np.float32)
        labels = {"a": (X_split[:, 0] + X_split[:, 1] > 0).astype(int),
                  "b": (X_split[:, 2] - X_split[:, 3] > 0).astype(int)}
        out[split] = [jaxmtl.DictDataLoader(
            jaxmtl.DictDataset("syn", split, {"x": X_split}, {task: labels[task]}),
            batch_size=32, shuffle=split == "train", seed=i) for i, task in enumerate(TASKS)]
    return out


def make_tasks(body: nn.Module) -> list[jaxmtl.Task]:
    return [jaxmtl.Task(task, {"body": body, f"head_{task}": nn.Dense(2)},
                        [jaxmtl.Operation("body", [("_input_", "x")]),
                         jaxmtl.Operation(f"head_{task}", [("body", task)])])
            for task in TASKS]


# CGC: -m slow; [ple] trains CGC levels by default (a PLE is a stack of CGC levels, as
# test_ple_stacks_cgc_levels_through_the_shared_gate checks).
@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name == "cgc"
                                  else name for name in sorted(ARCHITECTURES)])
def test_trains_in_a_two_task_model_with_one_shared_module(loaders, name):
    model = jaxmtl.MultitaskClassifier(make_tasks(ARCHITECTURES[name](TASKS)), seed=0)
    valid = loaders["valid"]
    model.init_from_loaders(valid)
    X_valid = valid[0].dataset.X_dict
    loss_before, _ = model.calculate_loss(X_valid, {"a": valid[0].dataset.Y_dict["a"]})
    jaxmtl.Trainer(n_epochs=4, lr=1e-2, seed=0, progress_bar=False).fit(
        model, loaders["train"])
    loss_after, _ = model.calculate_loss(X_valid, {"a": valid[0].dataset.Y_dict["a"]})
    scores = model.score(valid)
    # Both tasks read the one "body" entry: one set of weights, trained by both losses.
    assert sorted(model.params) == ["body", "head_a", "head_b"]
    assert set(model.variables) == {"params"}
    assert float(loss_after["a"]) < 0.7 * float(loss_before["a"])
    for task in TASKS:
        assert scores[f"{task}/syn/valid/accuracy"] >= 0.85, (name, scores)
