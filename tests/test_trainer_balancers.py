"""Balancers, the "mixed" scheduler, gradient accumulation and bf16 inside the Trainer."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_task

from jaxmtl import (
    MultitaskClassifier,
    Trainer,
    TrainerConfig,
    TrainState,
    build_graph,
    init_variables,
    make_optimizer,
    train_step,
)
from jaxmtl.training.balancers import BALANCER_NAMES, make_balancer
from jaxmtl.training.batch_schedulers import MixedScheduler


def fit(loaders, **overrides):
    model = MultitaskClassifier([make_task("task1"), make_task("task2", ("A", "C"))])
    config = dict(n_epochs=2, lr=0.02, seed=0, progress_bar=False)
    config.update(overrides)
    trainer = Trainer(**config)
    trainer.fit(model, loaders)
    return model, trainer


def valid_scores(model, loaders):
    return model.score([dl for dl in loaders if dl.dataset.split == "valid"])


def max_relative_difference(params, reference):
    """max over leaves of max|a - b| / max|b|: how far ``params`` are from ``reference``."""
    return max(float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
               for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference), strict=True))


@pytest.fixture(scope="module")
def equal_mixed_params(two_task_loaders):
    """Parameters of the plain summed loss, "mixed" scheduler, 4 epochs at lr 0.05."""
    model, _ = fit(two_task_loaders, batch_scheduler="mixed", n_epochs=4, lr=0.05)
    return model.params


def test_mixed_scheduler_gives_every_loader_each_step(two_task_loaders):
    train = [dl for dl in two_task_loaders if dl.dataset.split == "train"]
    scheduler = MixedScheduler(0)
    assert scheduler.epoch_length(train) == 19
    steps = list(scheduler.get_batches(train, 0))
    assert len(steps) == 19
    assert all(dls == tuple(train) and len(batches) == 2 for batches, dls in steps)


def test_equal_balancer_object_matches_plain_sum(two_task_loaders, equal_mixed_params):
    balanced, trainer = fit(two_task_loaders, batch_scheduler="mixed",
                            balancer=make_balancer("equal"), n_epochs=4, lr=0.05)
    assert int(trainer.state.step) == 4 * 19
    for a, b in zip(jax.tree.leaves(equal_mixed_params), jax.tree.leaves(balanced.params),
                    strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


# By default one loss-weighting and one gradient method; every method with -m slow (each
# method's math is checked against references in test_balancers.py).
@pytest.mark.parametrize("name", [
    name if name in ("uncertainty", "pcgrad") else pytest.param(name, marks=pytest.mark.slow)
    for name in BALANCER_NAMES if name != "equal"])
def test_every_balancer_trains_both_tasks(two_task_loaders, equal_mixed_params, name):
    model, trainer = fit(two_task_loaders, batch_scheduler="mixed", balancer=name,
                         n_epochs=4, lr=0.05)
    scores = valid_scores(model, two_task_loaders)
    assert scores["task1/d1/valid/accuracy"] > 0.85, scores
    assert scores["task2/d2/valid/accuracy"] > 0.85, scores
    # The balancer was applied: accuracy alone would pass with it ignored. Measured: every
    # method ends 7-50 % (relative) away from the plain sum's parameters.
    assert max_relative_difference(model.params, equal_mixed_params) > 0.01
    leaves = jax.tree.leaves(trainer.state.balancer_state)
    assert all(np.all(np.isfinite(np.asarray(leaf, np.float64))) for leaf in leaves)


def test_balancer_with_one_task_per_step_is_that_tasks_gradient(two_task_loaders, caplog):
    with caplog.at_level(logging.WARNING, logger="jaxmtl"):
        model, _ = fit(two_task_loaders, balancer="pcgrad", n_epochs=3, lr=0.05)
    # ... which the fit says, with what to do instead.
    warned = [r.getMessage() for r in caplog.records if "reduces to the plain" in r.getMessage()]
    assert len(warned) == 1 and "batch_scheduler='mixed'" in warned[0], warned
    assert valid_scores(model, two_task_loaders)["model/all/valid/accuracy"] > 0.85
    # One task per step: PCGrad has nothing to project, so it trains as the plain loss.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxmtl"):
        plain, _ = fit(two_task_loaders, n_epochs=3, lr=0.05)
    assert not [r for r in caplog.records if "reduces to the plain" in r.getMessage()]
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(model.params), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_uncertainty_state_is_checkpointed_and_resumed(two_task_loaders, tmp_path):
    common = dict(batch_scheduler="mixed", balancer="uncertainty", checkpointing=True,
                  log_manager_config={"counter_unit": "batches", "evaluation_freq": 10},
                  checkpointer_config={"checkpoint_dir": str(tmp_path), "checkpoint_clear": False})
    _, full = fit(two_task_loaders, **common)
    model = MultitaskClassifier([make_task("task1"), make_task("task2", ("A", "C"))])
    resumed = Trainer(n_epochs=2, lr=0.02, seed=0, progress_bar=False, **common)
    resumed.fit(model, two_task_loaders, resume_from=str(tmp_path))  # from step 30 of 38
    np.testing.assert_array_equal(resumed.state.balancer_state.log_vars,
                                  full.state.balancer_state.log_vars)
    assert not np.allclose(np.asarray(full.state.balancer_state.log_vars), 0.0)


def test_unknown_balancer_lists_valid_names():
    with pytest.raises(ValueError, match="Unrecognized balancer 'nope'.*'pcgrad'"):
        Trainer(balancer="nope")
    with pytest.raises(ValueError, match="Unrecognized precision 'fp8'"):
        Trainer(precision="fp8")
    with pytest.raises(ValueError, match="grad_accumulation_steps must be an int >= 1"):
        Trainer(grad_accumulation_steps=0)


def test_gradient_accumulation_applies_the_mean_every_k_steps():
    graph = build_graph([make_task("t")])
    rng = np.random.default_rng(0)
    batches = [({"data": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)},
                {"t": jnp.array([0, 1, 1, 0])}, jnp.ones(4, bool)) for _ in range(2)]
    variables = init_variables(graph, batches[0][0], jax.random.PRNGKey(0))
    config = TrainerConfig(lr=0.1, grad_clip=None, optimizer="sgd",
                           optimizer_config={"sgd_config": {"momentum": 0.0}},
                           grad_accumulation_steps=2)
    state = TrainState.create(variables, make_optimizer(config, 0.1), jax.random.PRNGKey(0))
    first, _ = train_step(graph, state, *batches[0])
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(first.params), strict=True):
        np.testing.assert_array_equal(a, b)  # no update after the first of two steps
    second, _ = train_step(graph, first, *batches[1])

    def loss(params, batch):
        from jaxmtl import task_loss_terms, total_loss
        terms, _ = task_loss_terms(graph, {"params": params}, *batch)
        return total_loss(graph, terms)

    mean_grad = jax.tree.map(lambda a, b: (a + b) / 2,
                             *[jax.grad(loss)(state.params, batch) for batch in batches])
    expected = optax.apply_updates(state.params, jax.tree.map(lambda g: -0.1 * g, mean_grad))
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(second.params), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # test_precision.py checks the traced dtype and fp32 state by default
def test_bf16_compute_keeps_fp32_params_and_trains(two_task_loaders):
    model, trainer = fit(two_task_loaders, precision="bf16", n_epochs=4, lr=0.05)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(model.params))
    scores = valid_scores(model, two_task_loaders)
    assert scores["model/all/valid/accuracy"] > 0.9
    assert isinstance(trainer.metrics["model/all/train/loss"], float)
    # bf16 was used (an ignored setting would give the fp32 run's parameters exactly), and
    # only its rounding differs: measured 2.1 % (relative) after 76 steps.
    fp32, _ = fit(two_task_loaders, n_epochs=4, lr=0.05)
    difference = max_relative_difference(model.params, fp32.params)
    assert 1e-3 < difference < 0.1


def test_balancer_for_tasks_fills_num_tasks_and_shared():
    from jaxmtl.training.balancers import balancer_for_tasks

    task_modules = {"a": {"body", "head_a"}, "b": {"body", "head_b"}, "c": {"body", "head_c"}}
    dwa = balancer_for_tasks("dwa", {"temperature": 3.0}, task_modules)
    state = dwa.init({"body": jnp.zeros(2)})
    assert {np.shape(leaf)[-1] for leaf in jax.tree.leaves(state) if np.ndim(leaf)} == {3}
    # "shared" = the body only: PCGrad then leaves the heads' gradients as they are.
    pcgrad = balancer_for_tasks("pcgrad", {}, task_modules)
    grads = {"body": jnp.array([[1.0, 0.0], [-1.0, 1.0], [0.0, 0.0]]),
             "head_a": jnp.array([[2.0], [3.0], [4.0]])}
    combined, _, _ = pcgrad.update(jnp.ones(3), grads, pcgrad.init(None), None,
                                   jax.random.PRNGKey(0))
    np.testing.assert_allclose(combined["head_a"], [9.0])
    with pytest.raises(ValueError, match="Unknown balancer 'nope'"):
        balancer_for_tasks("nope", {}, task_modules)


def test_mgda_upper_bound_weights_come_from_representation_gradients():
    import flax.linen as nn

    from jaxmtl import Operation, Task, task_loss_terms
    from jaxmtl.model import apply_ops
    from jaxmtl.training.balancers import min_norm_weights
    from jaxmtl.training.step import train_step_on

    body = nn.Sequential([nn.Dense(8), nn.tanh])
    tasks = [Task(t, {"body": body, f"head_{t}": nn.Dense(2)},
                  [Operation("body", [("_input_", "x")]), Operation(f"head_{t}", ["body"])])
             for t in ("a", "b")]
    graph = build_graph(tasks)
    rng = np.random.default_rng(0)
    X = {"x": jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)}
    Y = {"a": jnp.asarray(rng.integers(0, 2, 16)), "b": jnp.asarray(rng.integers(0, 2, 16))}
    mask = jnp.ones(16, bool)
    variables = init_variables(graph, X, jax.random.PRNGKey(0))
    balancer = make_balancer("mgda", upper_bound=True)
    state = TrainState.create(variables, make_optimizer(TrainerConfig(lr=0.1), 0.1),
                              jax.random.PRNGKey(0), balancer=balancer)
    # Jitted, as the Trainer runs it: one compile instead of an eager op-by-op step.
    new_state, metrics = jax.jit(lambda s, b: train_step_on(graph, s, b))(
        state, ((X, Y, mask),))

    Z = apply_ops(graph, variables, X, ["a", "b"], until="body")[0]["body"]

    def head_loss(z, task):
        terms, _ = task_loss_terms(graph, variables, X, {task: Y[task]}, mask,
                                   overrides={"body": z})
        return terms[task][0] / terms[task][1]

    grads = jnp.stack([jax.jit(jax.grad(head_loss), static_argnums=1)(Z, t).ravel()
                       for t in ("a", "b")])
    expected = min_norm_weights(grads @ grads.T)
    np.testing.assert_allclose(metrics["weights"], expected, rtol=1e-4, atol=1e-6)
    assert 0 < float(metrics["weights"][0]) < 1  # a real trade-off, not a corner

    def weighted(params):
        terms, _ = task_loss_terms(graph, {"params": params}, X, Y, mask)
        return sum(w * terms[t][0] / terms[t][1] for w, t in zip(expected, ("a", "b"),
                                                                  strict=True))

    tx = make_optimizer(TrainerConfig(lr=0.1), 0.1)
    updates, _ = tx.update(jax.jit(jax.grad(weighted))(variables["params"]),
                           tx.init(variables["params"]), variables["params"])
    want = optax.apply_updates(variables["params"], updates)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(new_state.params), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_mgda_upper_bound_trains_through_the_trainer(two_task_loaders):
    model, _ = fit(two_task_loaders, batch_scheduler="mixed", balancer="mgda",
                   balancer_config={"upper_bound": True}, n_epochs=6, lr=0.1)
    assert valid_scores(model, two_task_loaders)["model/all/valid/accuracy"] > 0.85
    with pytest.raises(ValueError, match="upper_bound=True solves on the representation"):
        make_balancer("mgda", upper_bound=True, shared=["body"])
