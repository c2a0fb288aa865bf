"""Task families: one compiled program per batch signature, not per task set."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import count_compiles

import jaxmtl
from jaxmtl.signatures import family_of, task_families
from jaxmtl.training import Trainer
from jaxmtl.training.runners import PerStepRunner

BODY = nn.Sequential([nn.Dense(8), nn.relu])


def head_task(name: str, width: int = 2, dropout: bool = False, **kwargs) -> jaxmtl.Task:
    """Shared ``body`` -> (own dropout) -> own ``head_{name}`` Dense(width)."""
    pool = {"body": BODY, f"head_{name}": nn.Dense(width)}
    ops = [jaxmtl.Operation("body", [("_input_", "x")], name="body")]
    last = "body"
    if dropout:
        pool[f"drop_{name}"] = nn.Dropout(0.5)
        ops.append(jaxmtl.Operation(f"drop_{name}", [last], name=f"drop_{name}"))
        last = f"drop_{name}"
    ops.append(jaxmtl.Operation(f"head_{name}", [last], name=f"head_{name}"))
    return jaxmtl.Task(name=name, module_pool=pool, op_sequence=ops, **kwargs)


def deep_task(name: str) -> jaxmtl.Task:
    """A different structure: the body, then two layers of its own."""
    pool = {"body": BODY, f"mid_{name}": nn.Dense(4), f"out_{name}": nn.Dense(2)}
    ops = [jaxmtl.Operation("body", [("_input_", "x")], name="body"),
           jaxmtl.Operation(f"mid_{name}", ["body"], name=f"mid_{name}"),
           jaxmtl.Operation(f"out_{name}", [f"mid_{name}"], name=f"out_{name}")]
    return jaxmtl.Task(name=name, module_pool=pool, op_sequence=ops)


def loaders_for(tasks, split="train", n=40, batch_size=16, soft=()):
    loaders = []
    for t, task in enumerate(tasks):
        rng = np.random.default_rng(100 * t + (split == "valid"))
        x = rng.normal(size=(n, 4)).astype(np.float32)
        width = task.module_pool[task.op_sequence[-1].module_name].features
        y = (x[:, t % 4] > 0).astype(np.int64) + (x[:, 0] > 1) * (width > 2)
        if task.name in soft:
            y = np.eye(width, dtype=np.float32)[y] * 0.8 + 0.2 / width
        else:
            y[::7] = -1  # unlabelled rows are masked out
        ds = jaxmtl.DictDataset(f"d{t}", split, {"x": x}, {task.name: y})
        loaders.append(jaxmtl.DictDataLoader(ds, batch_size=batch_size,
                                             shuffle=split == "train"))
    return loaders


def fit(tasks, loaders, shared=True, monkeypatch=None, **config):
    monkeypatch.setattr(PerStepRunner, "share_family_programs", shared)
    model = jaxmtl.MultitaskClassifier(tasks)
    trainer = Trainer(**{"n_epochs": 2, "lr": 1e-2, "seed": 0, "progress_bar": False,
                         "batch_scheduler": "shuffled", **config})
    trainer.fit(model, loaders)
    return model, trainer


def test_families_group_isomorphic_tasks_and_split_the_rest():
    tasks = [head_task("a"), head_task("b"), head_task("c", width=3), head_task("d", width=3),
             head_task("e", width=3, loss_weight=2.0), deep_task("f"),
             head_task("g", dropout=True), head_task("h", dropout=True)]
    model = jaxmtl.MultitaskClassifier(tasks)
    families = task_families(model.graph)
    assert [f.tasks for f in families] == [("a", "b"), ("c", "d", "e"), ("g", "h")]
    heads = families[1]
    assert heads.slots == ("head_c",) and heads.members == (("head_c", "head_d", "head_e"),)
    # The dropout nodes differ per member: each keeps its own node's dropout stream.
    drop = families[2]
    assert drop.members == (("drop_g", "drop_h"), ("head_g", "head_h"))
    graph = model.graph
    assert drop.fold_indices[1] == (graph.node_index("drop_g"), graph.node_index("drop_h"))
    assert drop.fold_indices[0] == (graph.node_index("body"),) * 2
    assert family_of(families, "f") is None


def test_families_need_same_parameter_shapes():
    tasks = [head_task("a"), head_task("b"), head_task("c")]
    model = jaxmtl.MultitaskClassifier(tasks)
    model.init({"x": np.zeros((2, 4), np.float32)})
    params = dict(model.params)
    params["head_c"] = {"kernel": np.zeros((8, 2), np.float16), "bias": np.zeros(2, np.float16)}
    families = task_families(model.graph, {"params": params})
    assert [f.tasks for f in families] == [("a", "b")]


# SGD with momentum, L2 and clipping: -m slow (the same optax transformation as Adam's;
# test_trainer.py checks L2 and clipping against numpy).
@pytest.mark.parametrize("config", [
    {},
    pytest.param({"optimizer": "sgd", "optimizer_config": {"sgd_config": {"momentum": 0.9}},
                  "l2": 0.01, "grad_clip": 0.5}, marks=pytest.mark.slow),
])
def test_family_steps_equal_per_task_set_programs(monkeypatch, config):
    # Soft labels, masked rows, loss weights, a structurally different task, two head
    # widths, per-task dropout: the shared programs train the same weights as one
    # program per task set. (Five tasks, two families: the width-3 family is also the
    # dropout family, so the reference compiles five per-task-set programs, not seven.)
    tasks = [head_task("a"), head_task("b", loss_weight=0.5),
             head_task("c", width=3, dropout=True), head_task("d", width=3, dropout=True),
             deep_task("e")]
    loaders = loaders_for(tasks, soft=("b",))
    shared, trainer = fit(tasks, loaders, True, monkeypatch, **config)
    programs = trainer.compiled_steps
    assert sorted(f.tasks for f in programs.families) == [("a", "b"), ("c", "d")]
    reference, _ = fit(tasks, loaders, False, monkeypatch, **config)
    assert set(shared.params) == set(reference.params)
    for got, want in zip(jax.tree.leaves(shared.params), jax.tree.leaves(reference.params),
                         strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    # Trained, not just left alone: every head moved from its initial weights.
    initial = jaxmtl.MultitaskClassifier(tasks)
    initial.init_from_loaders(loaders, seed=0)
    for name in ("head_a", "head_b", "head_c", "head_d", "out_e"):
        assert not np.allclose(shared.params[name]["kernel"], initial.params[name]["kernel"])
    valid = loaders_for(tasks, "valid")
    assert shared.score(valid) == pytest.approx(reference.score(valid), rel=1e-6)
    for task, dl in zip(tasks, valid, strict=True):
        batch_x, batch_y = dl.batch_at(dl.order(0), 0)
        got = shared.calculate_loss(batch_x, batch_y)
        want = reference.calculate_loss(batch_x, batch_y)
        assert got[1] == want[1]
        assert got[0][task.name] == pytest.approx(want[0][task.name], rel=1e-5)


class TrainFlagBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.BatchNorm(use_running_average=not train)(x)


def test_batch_norm_statistics_reach_the_member(monkeypatch):
    def bn_task(name):
        pool = {"body": BODY, f"bn_{name}": TrainFlagBatchNorm(), f"head_{name}": nn.Dense(2)}
        ops = [jaxmtl.Operation("body", [("_input_", "x")], name="body"),
               jaxmtl.Operation(f"bn_{name}", ["body"], name=f"bn_{name}"),
               jaxmtl.Operation(f"head_{name}", [f"bn_{name}"], name=f"head_{name}")]
        return jaxmtl.Task(name=name, module_pool=pool, op_sequence=ops)

    tasks = [bn_task("a"), bn_task("b")]
    loaders = loaders_for(tasks)
    shared, _ = fit(tasks, loaders, True, monkeypatch)
    reference, _ = fit(tasks, loaders, False, monkeypatch)
    assert [f.tasks for f in task_families(shared.graph, shared.variables)] == [("a", "b")]
    for got, want in zip(jax.tree.leaves(shared.variables),
                         jax.tree.leaves(reference.variables), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    means = [shared.variables["batch_stats"][f"bn_{t}"]["BatchNorm_0"]["mean"] for t in "ab"]
    assert not np.allclose(means[0], means[1])  # each member updated its own statistics
    assert not np.allclose(means[0], 0.0)


def _many(n_tasks):
    tasks = [head_task(f"t{t}") for t in range(n_tasks)]
    return tasks, loaders_for(tasks, n=32), loaders_for(tasks, "valid", n=32)


def test_compiled_programs_do_not_grow_with_the_number_of_tasks(monkeypatch):
    counts = {}
    for n_tasks in (2, 8):
        tasks, train, valid = _many(n_tasks)
        model = jaxmtl.MultitaskClassifier(tasks)
        trainer = Trainer(n_epochs=1, seed=0, progress_bar=False)
        fit_compiles = count_compiles(lambda: trainer.fit(model, train))  # noqa: B023
        programs = trainer.compiled_steps
        # One train program for every task: the general step never ran.
        assert programs.general._cache_size() == 0
        assert [p._cache_size() for p in programs.families.values()] == [1]
        score_compiles = count_compiles(lambda: model.score(valid))  # noqa: B023
        predict_compiles = count_compiles(lambda: model.predict(valid[-1]))  # noqa: B023
        first, last = (dl.batch_at(dl.order(0), 0) for dl in (valid[0], valid[-1]))
        model.calculate_loss(*first)
        loss_compiles = count_compiles(lambda: model.calculate_loss(*last))  # noqa: B023
        counts[n_tasks] = (fit_compiles, score_compiles, predict_compiles, loss_compiles)
    # (The first model warms up a few shape-generic programs, so T=8 may need fewer.)
    assert all(big <= small for big, small in zip(counts[8], counts[2], strict=True))
    assert counts[8][2:] == (0, 0)  # predict and calculate_loss reuse the family programs


def test_fused_steps_switch_per_family_and_equal_per_task_set_programs(monkeypatch):
    tasks = [head_task("a"), head_task("b"), head_task("c"), head_task("d", width=3),
             head_task("e", width=3), deep_task("f")]
    loaders = loaders_for(tasks, soft=("c",))
    fused, trainer = fit(tasks, loaders, True, monkeypatch, steps_per_call=5)
    (groups,) = trainer.compiled_steps.by_layout
    # a and b share a branch; c (soft labels) has its own signature; d+e; f alone.
    assert [(g.family.tasks if g.family else None, g.loader) for g in groups] == [
        (("a", "b", "c"), -1), (("a", "b", "c"), -1), (("d", "e"), -1), (None, 5)]
    # The reference is the per-step run with its family programs, which train the same
    # weights as one program per task set (test_family_steps_equal_per_task_set_programs).
    reference, _ = fit(tasks, loaders, True, monkeypatch)
    for got, want in zip(jax.tree.leaves(fused.params), jax.tree.leaves(reference.params),
                         strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_optimizer_that_labels_modules_by_name_trains_through_the_general_step(monkeypatch):
    import optax

    # Member b's view renames head_b to head_a, whose label differs: the view's optimizer
    # state would not be b's, so b's family trains one program per task set instead.
    def labels(params):
        return {name: jax.tree.map(lambda _, n=name: "fast" if n == "head_a" else "slow", p)
                for name, p in params.items()}

    tx = optax.multi_transform({"fast": optax.sgd(0.1), "slow": optax.adam(0.01)}, labels)
    tasks = [head_task("a"), head_task("b")]
    loaders = loaders_for(tasks)
    shared, trainer = fit(tasks, loaders, True, monkeypatch, optimizer=tx)
    assert trainer.compiled_steps.families == {}
    reference, _ = fit(tasks, loaders, False, monkeypatch, optimizer=tx)
    for got, want in zip(jax.tree.leaves(shared.params), jax.tree.leaves(reference.params),
                         strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
