"""The pure core: graph merging, init, apply, masked losses (checked against numpy)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_task

import jaxmtl
from jaxmtl import Operation, Task, build_graph, init_variables, task_loss_terms, total_loss
from jaxmtl.model import apply_ops


def np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


@pytest.mark.parametrize(
    "suffixes_b, n_modules, n_ops",
    [(("A", "B"), 3, 4), (("C", "D"), 5, 6), (("A", "D"), 4, 4)],
    ids=["all_overlap", "none_overlap", "partial_overlap"],
)
def test_graph_overlap_counts(suffixes_b, n_modules, n_ops):
    graph = build_graph([make_task("task1", ("A", "B")), make_task("task2", suffixes_b)])
    assert len(graph.module_pool) == n_modules
    assert len(graph.op_names) == n_ops
    variables = init_variables(graph, {"data": jnp.ones((4, 2))}, jax.random.PRNGKey(0))
    # Parameter-free "relu" has no entry; each Dense has exactly one.
    assert sorted(variables["params"]) == sorted(m for m in graph.module_pool if m != "relu")


def test_graph_errors():
    with pytest.raises(ValueError, match="Found duplicate task 'task1'"):
        build_graph([make_task("task1"), make_task("task1")])
    wide = make_task("task2", hidden=20)
    with pytest.raises(ValueError, match=r"^Module name 'linear1A' is used for two different "
                       r"modules: two Denses with features=10 vs 20 \(task 'task2'\); "):
        build_graph([make_task("task1"), wide])


def test_one_op_name_with_other_inputs_runs_per_task():
    # Snorkel's tutorial names both body ops "base_mlp"; each task runs its own.
    graph = build_graph([make_task("task1"), make_task("task3", input_key="other")])
    assert graph.task_nodes["task3"] == ("op1A@task3", "reluA@task3", "op2task3")
    rng = np.random.default_rng(0)
    X = {key: jnp.asarray(rng.normal(size=(3, 2)), jnp.float32) for key in ("data", "other")}
    variables = init_variables(graph, X, jax.random.PRNGKey(0))
    assert sorted(variables["params"]) == ["linear1A", "linear2B"]  # still shared by name
    outputs, _ = apply_ops(graph, variables, X, ["task1", "task3"])
    kernel, bias = (np.asarray(variables["params"]["linear1A"][k]) for k in ("kernel", "bias"))
    np.testing.assert_allclose(outputs["op1A"], np.asarray(X["data"]) @ kernel + bias,
                               rtol=1e-5)
    np.testing.assert_allclose(outputs["op1A@task3"], np.asarray(X["other"]) @ kernel + bias,
                               rtol=1e-5)
    # Identical definitions still run once.
    assert build_graph([make_task("a"), make_task("b")]).task_nodes["b"][:2] == ("op1A", "reluA")


def test_shared_module_has_one_set_of_weights():
    graph = build_graph([make_task("task1", ("A", "B")), make_task("task2", ("A", "C"))])
    variables = init_variables(graph, {"data": jnp.ones((3, 2))}, jax.random.PRNGKey(0))
    X = {"data": jnp.asarray(np.random.default_rng(0).normal(size=(3, 2)), jnp.float32)}
    outputs, _ = apply_ops(graph, variables, X, ["task1", "task2"])
    kernel = np.asarray(variables["params"]["linear1A"]["kernel"])
    bias = np.asarray(variables["params"]["linear1A"]["bias"])
    np.testing.assert_allclose(outputs["op1A"], np.asarray(X["data"]) @ kernel + bias, rtol=1e-5)
    assert set(outputs) == {"_input_", "op1A", "reluA", "op2task1", "op2task2"}


def test_masked_loss_matches_numpy():
    graph = build_graph([make_task("hard"), make_task("soft", ("A", "C"))])
    rng = np.random.default_rng(1)
    X = rng.normal(size=(6, 2)).astype(np.float32)
    hard = np.array([0, 1, -1, 1, 0, 1])
    soft = rng.dirichlet([1, 1], size=6).astype(np.float32)
    soft[1] = -1.0
    mask = np.array([True, True, True, True, True, False])
    variables = init_variables(graph, {"data": X}, jax.random.PRNGKey(0))
    terms, _ = task_loss_terms(graph, variables, {"data": X}, {"hard": hard, "soft": soft}, mask)
    outputs, _ = apply_ops(graph, variables, {"data": X}, ["hard", "soft"])
    hard_logp = np_log_softmax(np.asarray(outputs["op2hard"], np.float64))
    soft_logp = np_log_softmax(np.asarray(outputs["op2soft"], np.float64))
    hard_rows = [0, 1, 3, 4]  # -1 label and padding excluded
    soft_rows = [0, 2, 3, 4]
    expected_hard = -np.mean([hard_logp[i, hard[i]] for i in hard_rows])
    expected_soft = -np.mean([(soft[i] * soft_logp[i]).sum() for i in soft_rows])
    np.testing.assert_allclose(terms["hard"][0] / terms["hard"][1], expected_hard, rtol=1e-5)
    np.testing.assert_allclose(terms["soft"][0] / terms["soft"][1], expected_soft, rtol=1e-5)
    assert float(terms["hard"][1]) == 4 and float(terms["soft"][1]) == 4
    np.testing.assert_allclose(total_loss(graph, terms), expected_hard + expected_soft, rtol=1e-5)


def test_task_without_active_rows_adds_zero_and_nan_safe_gradient():
    def log_loss(logits, labels):  # NaN if it ever saw label -1 (log of a negative prob)
        probs = jax.nn.softmax(logits)
        return -jnp.log(jnp.take_along_axis(probs, labels[:, None], 1)[:, 0] * (labels + 1) / (labels + 1))

    graph = build_graph([make_task("t", loss_func=log_loss)])
    X = {"data": jnp.ones((3, 2))}
    variables = init_variables(graph, X, jax.random.PRNGKey(0))
    Y = {"t": jnp.array([-1, -1, -1])}

    def loss(params):
        terms, _ = task_loss_terms(graph, {"params": params}, X, Y)
        return total_loss(graph, terms)

    value, grads = jax.value_and_grad(loss)(variables["params"])
    assert float(value) == 0.0
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))


def test_loss_weight_scales_task_loss():
    graph = build_graph([make_task("t", loss_weight=2.5)])
    X = {"data": jnp.ones((2, 2))}
    variables = init_variables(graph, X, jax.random.PRNGKey(0))
    terms, _ = task_loss_terms(graph, variables, X, {"t": jnp.array([0, 1])})
    np.testing.assert_allclose(total_loss(graph, terms), 2.5 * terms["t"][0] / 2, rtol=1e-6)


def test_bad_loss_func_shape_is_named():
    graph = build_graph([make_task("t", loss_func=lambda out, y: out)])
    X = {"data": jnp.ones((2, 2))}
    variables = init_variables(graph, X, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"Task 't': loss_func returned shape \(2, 2\)"):
        task_loss_terms(graph, variables, X, {"t": jnp.array([0, 1])})


def test_scalar_loss_func_is_evaluated_per_row():
    # Snorkel's form: a mean over the rows, like F.cross_entropy.
    rng = np.random.default_rng(3)
    X = {"data": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)}
    labels = jnp.array([0, 1, -1, 1, 0])
    mask = jnp.array([True, True, True, True, False])
    per_row = build_graph([make_task("t")])
    scalar = build_graph([make_task("t", loss_func=jaxmtl.cross_entropy)])
    variables = init_variables(per_row, X, jax.random.PRNGKey(0))
    expected, _ = task_loss_terms(per_row, variables, X, {"t": labels}, mask)
    got, _ = task_loss_terms(scalar, variables, X, {"t": labels}, mask)
    logits, _ = apply_ops(per_row, variables, X, ["t"])
    log_probs = np_log_softmax(np.asarray(logits["op2t"]))
    by_hand = -(log_probs[0, 0] + log_probs[1, 1] + log_probs[3, 1])
    np.testing.assert_allclose(got["t"][0], by_hand, rtol=1e-5)
    np.testing.assert_allclose(got["t"][0], expected["t"][0], rtol=1e-6)
    assert float(got["t"][1]) == 3.0


class Noisy(nn.Module):
    """Dropout and BatchNorm, switched by ``train`` as in the Flax examples."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(4)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        return nn.Dropout(0.5, deterministic=not train)(x)


def test_train_flag_dropout_and_batch_stats():
    pool = {"noisy": Noisy(), "head": nn.Dense(2)}
    ops = [Operation("noisy", [("_input_", "x")]), Operation("head", ["noisy"])]
    graph = build_graph([Task("t", pool, ops)])
    X = {"x": jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)}
    variables = init_variables(graph, X, jax.random.PRNGKey(0))
    assert "batch_stats" in variables and "noisy" in variables["batch_stats"]
    eval_a, same_vars = apply_ops(graph, variables, X, ["t"], train=False)
    eval_b, _ = apply_ops(graph, variables, X, ["t"], train=False, rng=jax.random.PRNGKey(5))
    np.testing.assert_array_equal(eval_a["noisy"], eval_b["noisy"])
    assert same_vars is variables
    train_a, updated = apply_ops(graph, variables, X, ["t"], train=True, rng=jax.random.PRNGKey(1))
    train_b, _ = apply_ops(graph, variables, X, ["t"], train=True, rng=jax.random.PRNGKey(2))
    assert np.mean(np.asarray(train_a["noisy"]) == 0) > 0.2  # dropout zeroed entries
    assert not np.array_equal(train_a["noisy"], train_b["noisy"])
    old_mean = np.asarray(variables["batch_stats"]["noisy"]["BatchNorm_0"]["mean"])
    new_mean = np.asarray(updated["batch_stats"]["noisy"]["BatchNorm_0"]["mean"])
    assert not np.allclose(old_mean, new_mean)


class Pair(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x), {"doubled": 2 * x}


def test_tuple_dict_and_whole_outputs_inputs():
    def summarise(outputs):  # gets the whole outputs dict
        return outputs["pair"][1]["doubled"] + outputs["_input_"]["x"]

    pool = {"pair": Pair(), "sum": summarise, "head": nn.Dense(2), "concat": lambda a, b: jnp.concatenate([a, b], -1)}
    ops = [
        Operation("pair", [("_input_", "x")]),
        Operation("sum", []),
        Operation("concat", [("pair", 0), "sum"]),
        Operation("head", ["concat"]),
    ]
    graph = build_graph([Task("t", pool, ops)])
    X = {"x": jnp.arange(4.0).reshape(2, 2)}
    variables = init_variables(graph, X, jax.random.PRNGKey(0))
    outputs, _ = apply_ops(graph, variables, X, ["t"])
    np.testing.assert_allclose(outputs["sum"], 3 * np.arange(4.0).reshape(2, 2))
    assert outputs["concat"].shape == (2, 5) and outputs["head"].shape == (2, 2)


def test_compiled_init_is_one_program_with_init_variables_values():
    from conftest import count_compiles

    from jaxmtl.initialisation import compiled_init_variables, init_program

    init_program.cache_clear()  # an equal graph of an earlier test may have compiled it
    graph = build_graph([make_task("task1", ("A", "B")), make_task("task2", ("C", "D"))])
    X = {"data": jnp.asarray(np.random.default_rng(1).normal(size=(4, 2)), jnp.float32)}
    eager = init_variables(graph, X, jax.random.PRNGKey(3))
    compiled = {}
    n = count_compiles(lambda: compiled.update(
        compiled_init_variables(graph, [(X, graph.task_names)], jax.random.PRNGKey(3))))
    assert n == 1
    assert jax.tree.structure(compiled) == jax.tree.structure(eager)
    for a, b in zip(jax.tree.leaves(compiled), jax.tree.leaves(eager), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # Existing modules are kept as they are; only the missing ones are created.
    kept = {"params": {"linear1A": jax.tree.map(lambda v: v + 1.0,
                                                eager["params"]["linear1A"])}}
    grown = compiled_init_variables(graph, [(X, ["task1"])], jax.random.PRNGKey(3), kept)
    np.testing.assert_array_equal(grown["params"]["linear1A"]["kernel"],
                                  kept["params"]["linear1A"]["kernel"])
    assert sorted(grown["params"]) == ["linear1A", "linear2B"]


def test_one_shot_programs_compile_without_llvm_optimisation_on_the_cpu():
    from jaxmtl.initialisation import one_shot_compiler_options

    options = one_shot_compiler_options()
    assert options == {"xla_backend_optimization_level": 0}  # the suite runs on the CPU
    options["xla_backend_optimization_level"] = 3  # a copy: the next program is unaffected
    assert one_shot_compiler_options() == {"xla_backend_optimization_level": 0}


# --- graph equality: programs kept per graph are shared by equal graphs -------------------
def test_graphs_built_from_equal_tasks_are_equal_and_share_the_init_program():
    from conftest import count_compiles

    from jaxmtl.initialisation import compiled_init_variables

    def graph(**kwargs):
        return build_graph([make_task("t1", **kwargs), make_task("t2", ("A", "C"), **kwargs)])

    first, second = graph(), graph()
    assert first is not second and first == second and hash(first) == hash(second)
    X = {"data": jnp.ones((4, 2))}
    batches = [(X, ("t1", "t2"))]
    want = compiled_init_variables(first, batches, jax.random.PRNGKey(3))
    got = {}
    assert count_compiles(lambda: got.update(
        v=compiled_init_variables(second, batches, jax.random.PRNGKey(3)))) == 0
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got["v"]), strict=True):
        np.testing.assert_array_equal(a, b)
    # A different module configuration is a different graph with a program of its own.
    wider = graph(hidden=11)
    assert wider != first
    assert count_compiles(lambda: got.update(
        v=compiled_init_variables(wider, batches, jax.random.PRNGKey(3)))) == 1
    assert got["v"]["params"]["linear1A"]["kernel"].shape == (2, 11)


def test_graphs_differing_in_any_part_are_unequal():
    base = build_graph([make_task("t1")])
    other_loss = make_task("t1", loss_func=lambda logits, y, mask: 0.0)
    other_weight = make_task("t1", loss_weight=2.0)
    other_name = make_task("t9")
    renamed_op = Task("t1", {"linear1A": nn.Dense(10), "linear2B": nn.Dense(2)},
                      [Operation("linear1A", [("_input_", "data")], name="op1A"),
                       Operation("linear2B", ["op1A"], name="op2t1")])
    for task in (other_loss, other_weight, other_name, renamed_op):
        assert build_graph([task]) != base


def test_a_graph_with_an_unhashable_module_equals_only_itself():
    class Scaled(nn.Module):
        scales: list  # a list field: the Linen dataclass cannot be hashed

        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(x) * self.scales[0]

    def graph():
        return build_graph([Task("t", {"m": Scaled([2.0])},
                                 [Operation("m", [("_input_", "data")])])])

    first, second = graph(), graph()
    assert first == first and first != second
    assert hash(first) != hash(second)


def test_graphs_with_distinct_nnx_modules_are_unequal():
    from flax import nnx

    def graph():
        return build_graph([Task("t", {"m": nnx.Linear(2, 2, rngs=nnx.Rngs(0))},
                                 [Operation("m", [("_input_", "data")])])])

    assert graph() != graph()


def test_a_new_model_of_equal_tasks_initialises_and_scores_without_compiling():
    from conftest import count_compiles, linear_data

    X, Y = linear_data(40, 0)
    loader = jaxmtl.DictDataLoader(jaxmtl.DictDataset("d", "valid", {"data": X}, {"q1": Y}),
                                   batch_size=16)
    first = jaxmtl.MultitaskClassifier([make_task("q1")], seed=5)
    want = first.score([loader])
    second = jaxmtl.MultitaskClassifier([make_task("q1")], seed=5)
    got = {}
    assert count_compiles(lambda: got.update(second.score([loader]))) == 0
    assert got == want
    assert second.eval_programs is first.eval_programs
    # A model with one more task has programs of its own.
    third = jaxmtl.MultitaskClassifier([make_task("q1"), make_task("q2", ("A", "C"))])
    assert third.eval_programs is not first.eval_programs
