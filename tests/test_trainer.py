"""Trainer: convergence, determinism, compile count, optimizer maths, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import count_compiles, make_task

from jaxmtl import (
    DictDataLoader,
    DictDataset,
    MultitaskClassifier,
    Trainer,
    TrainerConfig,
    TrainState,
    build_graph,
    init_variables,
    make_optimizer,
    train_step,
)


def two_task_model(seed=0):
    return MultitaskClassifier([make_task("task1"), make_task("task2", ("A", "C"))], seed=seed)


def test_two_tasks_converge(two_task_loaders):
    model = two_task_model()
    trainer = Trainer(n_epochs=10, lr=0.05, seed=1, progress_bar=False)
    trainer.fit(model, two_task_loaders)
    scores = model.score([dl for dl in two_task_loaders if dl.dataset.split == "valid"])
    assert scores["task1/d1/valid/accuracy"] > 0.95
    assert scores["task2/d2/valid/accuracy"] > 0.95
    # Evaluation runs once per epoch (Snorkel's default cadence) and fills trainer.metrics.
    assert trainer.metrics["task1/d1/valid/accuracy"] == pytest.approx(scores["task1/d1/valid/accuracy"])
    assert trainer.metrics["model/all/train/lr"] == pytest.approx(0.05)
    assert 0 < trainer.metrics["task2/d2/train/loss"] < 0.69
    assert int(trainer.state.step) == 10 * 38


def train_params(loaders, seed, **overrides):
    model = two_task_model()
    config = dict(n_epochs=2, lr=0.02, seed=seed, progress_bar=False)
    config.update(overrides)
    Trainer(**config).fit(model, loaders)
    return model.params


@pytest.mark.slow  # test_snorkel_parity.py's one-seed run is bit-identical by default
def test_same_seed_same_params(two_task_loaders):
    first = train_params(two_task_loaders, seed=5)
    second = train_params(two_task_loaders, seed=5)
    other = train_params(two_task_loaders, seed=6)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b)
               for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(other), strict=True))


def test_no_recompilation_after_first_epoch(two_task_loaders):
    # Loaders' last batches are partial (600 = 18*32 + 24): padded, so shapes never change.
    train_params(two_task_loaders, seed=0, n_epochs=1)  # eager set-up programs, once a process
    one_epoch = count_compiles(lambda: train_params(two_task_loaders, seed=0, n_epochs=1))
    three_epochs = count_compiles(lambda: train_params(two_task_loaders, seed=0, n_epochs=3))
    assert one_epoch > 0
    assert three_epochs == one_epoch


def test_adam_step_with_l2_and_clipping_matches_numpy():
    graph = build_graph([make_task("t")])
    X = {"data": jnp.asarray(np.random.default_rng(0).normal(size=(4, 2)), jnp.float32)}
    Y = {"t": jnp.array([0, 1, 1, -1])}
    mask = jnp.array([True, True, True, True])
    variables = init_variables(graph, X, jax.random.PRNGKey(0))
    config = TrainerConfig(lr=0.1, l2=0.01, grad_clip=0.05)
    state = TrainState.create(variables, make_optimizer(config, config.lr), jax.random.PRNGKey(0))

    def loss(params):
        from jaxmtl import task_loss_terms, total_loss
        terms, _ = task_loss_terms(graph, {"params": params}, X, Y, mask)
        return total_loss(graph, terms)

    grads = jax.grad(loss)(state.params)
    new_state, metrics = train_step(graph, state, X, Y, mask)
    leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
    norm = np.sqrt(sum((g**2).sum() for g in leaves))
    scale = min(1.0, 0.05 / norm)
    for g, p, new_p in zip(leaves, jax.tree.leaves(state.params), jax.tree.leaves(new_state.params), strict=True):
        d = g * scale + 0.01 * np.asarray(p, np.float64)  # torch Adam weight_decay
        m, v = 0.1 * d, 0.001 * d**2
        m_hat, v_hat = m / 0.1, v / 0.001
        expected = np.asarray(p, np.float64) - 0.1 * m_hat / (np.sqrt(v_hat) + 1e-8)
        np.testing.assert_allclose(new_p, expected, rtol=1e-4, atol=1e-6)
    assert int(new_state.step) == 1
    np.testing.assert_allclose(metrics["terms"]["t"][1], 3.0)


def test_batch_without_labels_leaves_state_unchanged():
    graph = build_graph([make_task("t")])
    X = {"data": jnp.ones((2, 2))}
    variables = init_variables(graph, X, jax.random.PRNGKey(0))
    tx = make_optimizer(TrainerConfig(), 0.1)
    state = TrainState.create(variables, tx, jax.random.PRNGKey(0))
    new_state, _ = train_step(graph, state, X, {"t": jnp.array([-1, -1])}, jnp.array([True, True]))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new_state), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("optimizer", ["sgd", "adamax", optax.adam(1e-2)])
def test_other_optimizers_reduce_loss(two_task_loaders, optimizer):
    model = two_task_model()
    train = [dl for dl in two_task_loaders if dl.dataset.split == "train"]
    X, Y = train[0].batch_at(train[0].order(0), 0)
    model.init(X)
    before = model.calculate_loss(X, Y)[0]["task1"]
    Trainer(n_epochs=2, lr=0.05, seed=0, optimizer=optimizer, progress_bar=False).fit(model, train)
    after = model.calculate_loss(X, Y)[0]["task1"]
    assert float(after) < 0.8 * float(before)


def test_config_accepts_nested_dicts_and_config_object():
    trainer = Trainer(config={"n_epochs": 3}, optimizer_config={"adam_config": {"eps": 1e-6}})
    assert trainer.config.n_epochs == 3
    assert trainer.config.optimizer_config.adam_config.eps == 1e-6
    assert Trainer(config=TrainerConfig(lr=0.5)).config.lr == 0.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"optimizer": "rmsprop"}, "Unrecognized optimizer option 'rmsprop'"),
        ({"lr_scheduler": "bad"}, "Unrecognized lr scheduler option 'bad'"),
        ({"batch_scheduler": "bad"}, "Unrecognized batch scheduler option 'bad'"),
        ({"log_writer": "bad"}, "Unrecognized writer option 'bad'"),
        ({"not_a_field": 1}, r"unknown config key\(s\) \['not_a_field'\]"),
        ({"lr_scheduler_config": {"warmup_unit": "days"}}, "Unrecognized warmup_unit 'days'"),
        ({"log_manager_config": {"counter_unit": "bad"}}, "Unrecognized counter_unit 'bad'"),
        ({"lr": -1.0}, "TrainerConfig.lr must be >= 0"),
    ],
)
def test_bad_config_raises_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Trainer(**kwargs)


def test_dataloader_split_errors():
    X = np.zeros((4, 2), np.float32)
    valid = DictDataLoader(DictDataset("d", "valid", {"data": X}, {"task1": np.zeros(4, int)}))
    odd = DictDataLoader(DictDataset("d", "dev", {"data": X}, {"task1": np.zeros(4, int)}))
    trainer = Trainer(progress_bar=False)
    with pytest.raises(ValueError, match="Cannot find any dataloaders with split matching train split: train"):
        trainer.fit(two_task_model(), [valid])
    with pytest.raises(ValueError, match="Dataloader splits must be one of"):
        trainer.fit(two_task_model(), [odd])


def fit_with_metrics(loaders, **overrides):
    model = two_task_model()
    config = dict(n_epochs=2, lr=0.02, seed=3, progress_bar=False,
                  log_manager_config={"counter_unit": "batches", "evaluation_freq": 5})
    config.update(overrides)
    trainer = Trainer(**config)
    trainer.fit(model, loaders)
    return model.params, trainer.metrics, trainer


@pytest.mark.parametrize("scheduler", ["shuffled", "proportional", "sequential"])
def test_fused_steps_match_per_step(two_task_loaders, scheduler):
    params, metrics, _ = fit_with_metrics(two_task_loaders, batch_scheduler=scheduler)
    fused_params, fused_metrics, trainer = fit_with_metrics(
        two_task_loaders, batch_scheduler=scheduler, steps_per_call=16)
    assert int(trainer.state.step) == 2 * 38  # no-op padding steps do not count
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(fused_params), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    assert fused_metrics.keys() == metrics.keys()
    for key, value in metrics.items():
        assert fused_metrics[key] == pytest.approx(value, rel=1e-5), key


def test_fused_steps_config_errors():
    with pytest.raises(ValueError, match="steps_per_call must be an int >= 1"):
        Trainer(steps_per_call=0)
    with pytest.raises(ValueError, match="steps_per_call=4 does not support batch_scheduler='mixed'"):
        Trainer(steps_per_call=4, batch_scheduler="mixed")


def test_modules_outside_the_batch_tasks_do_not_move():
    graph = build_graph([make_task("task1"), make_task("task2", ("A", "C"))])
    X = {"data": jnp.asarray(np.random.default_rng(0).normal(size=(4, 2)), jnp.float32)}
    variables = init_variables(graph, X, jax.random.PRNGKey(0))
    tx = make_optimizer(TrainerConfig(lr=0.1, l2=0.01), 0.1)
    state = TrainState.create(variables, tx, jax.random.PRNGKey(0))
    mask = jnp.ones(4, bool)
    # Two task2 steps give head linear2C momentum; then a task1 step must not move it.
    for _ in range(2):
        state, _ = train_step(graph, state, X, {"task2": jnp.array([0, 1, 1, 0])}, mask)
    before = jax.tree.map(np.asarray, state)
    state, _ = train_step(graph, state, X, {"task1": jnp.array([0, 1, 1, 0])}, mask)
    np.testing.assert_array_equal(state.params["linear2C"]["kernel"],
                                  before.params["linear2C"]["kernel"])
    # Adam's state per module, as torch's per parameter: linear2C's moments and step count
    # stay; linear2B takes its first step (count 1), the shared body its third.
    (adam,) = [part for part in state.opt_state if isinstance(part, dict)]
    (adam_before,) = [part for part in before.opt_state if isinstance(part, dict)]
    np.testing.assert_array_equal(adam["linear2C"].mu["kernel"],
                                  adam_before["linear2C"].mu["kernel"])
    assert not np.array_equal(adam["linear2B"].mu["kernel"], adam_before["linear2B"].mu["kernel"])
    assert {name: int(part.count) for name, part in adam.items()} == {
        "linear1A": 3, "linear2B": 1, "linear2C": 2}
    # A first Adam step moves each weight by lr * g / (|g| + eps), i.e. by lr (0.1) where the
    # gradient is not 0; a count shared by all modules (3) gave 0.1 * sqrt(1.999) / 1.9.
    moved = np.abs(state.params["linear2B"]["kernel"] - before.params["linear2B"]["kernel"])
    assert np.count_nonzero(moved) >= 4
    np.testing.assert_allclose(moved[moved > 0], 0.1, rtol=1e-4)
    assert not np.array_equal(state.params["linear1A"]["kernel"],
                              before.params["linear1A"]["kernel"])
    assert int(state.step) == 3


def test_second_fit_compiles_nothing(two_task_loaders):
    model = two_task_model()
    trainer = Trainer(n_epochs=1, lr=0.02, seed=0, progress_bar=False)
    trainer.fit(model, two_task_loaders)
    assert count_compiles(lambda: trainer.fit(model, two_task_loaders)) == 0
    assert int(trainer.state.step) == 38  # a new fit starts a fresh optimizer state


@pytest.mark.parametrize("steps_per_call", [1, 4])
def test_batches_without_labels_are_skipped_like_snorkel(steps_per_call):
    from conftest import linear_data

    X, Y = linear_data(96, 0)
    Y[:32] = -1  # the first batch of 32 has no label at all
    dl = DictDataLoader(DictDataset("d", "train", {"data": X}, {"task1": Y}), batch_size=32)
    model = MultitaskClassifier([make_task("task1")])
    trainer = Trainer(n_epochs=2, seed=0, progress_bar=False, steps_per_call=steps_per_call,
                      log_manager_config={"counter_unit": "batches", "evaluation_freq": 1})
    trainer.fit(model, [dl])
    assert int(trainer.state.step) == 2 * 2  # 2 labelled batches per epoch
    assert trainer.metrics["task1/d/train/loss"] > 0


def test_dropout_and_batchnorm_model_trains_and_scores(two_task_loaders):
    import flax.linen as nn

    from jaxmtl import Operation, Task

    class Body(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(16)(x)))
            return nn.Dropout(0.2, deterministic=not train)(x)

    tasks = [Task(name, {"body": Body(), f"head_{name}": nn.Dense(2)},
                  [Operation("body", [("_input_", "data")]), Operation(f"head_{name}", ["body"])])
             for name in ("task1", "task2")]
    model = MultitaskClassifier(tasks)
    Trainer(n_epochs=5, lr=0.02, seed=0, progress_bar=False).fit(model, two_task_loaders)
    stats = model.variables["batch_stats"]["body"]["BatchNorm_0"]
    assert not np.allclose(np.asarray(stats["mean"]), 0.0)  # running means were updated
    scores = model.score([dl for dl in two_task_loaders if dl.dataset.split == "valid"])
    assert scores["task1/d1/valid/accuracy"] > 0.9 and scores["task2/d2/valid/accuracy"] > 0.9
    # Evaluation is deterministic: dropout off, running statistics read-only.
    again = model.score([dl for dl in two_task_loaders if dl.dataset.split == "valid"])
    assert again == scores
