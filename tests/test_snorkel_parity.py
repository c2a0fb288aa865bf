"""What a Snorkel script relies on: per-task inputs, per-task ops, Snorkel's loss form,
seeds, errors that name the mistake (issue 11)."""

from __future__ import annotations

import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmtl

N_TRAIN, N_VALID = 240, 120


def _points(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, 2)).astype(np.float32)


def _labels(task: str, X: np.ndarray) -> np.ndarray:
    if task == "circle":
        return (X[:, 0] ** 2 + X[:, 1] ** 2 < 0.5).astype(int)
    return (np.abs(X).max(axis=1) < 0.6).astype(int)


def disjoint_loaders(seed: int = 0, loader_seed: int | None = 0,
                     tasks: tuple[str, ...] = ("circle", "square")) -> list:
    """One dataset per task, each with only its own input key (the tutorial's layout)."""
    loaders = []
    for i, task in enumerate(tasks):
        for split, n in (("train", N_TRAIN), ("valid", N_VALID)):
            X = _points(n, seed + 10 * i + (split == "valid"))
            dataset = jaxmtl.DictDataset(f"{task}_dataset", split, {f"{task}_data": X},
                                         {f"{task}_task": _labels(task, X)})
            loaders.append(jaxmtl.DictDataLoader(dataset, 32, shuffle=split == "train",
                                                 seed=loader_seed))
    return loaders


def tutorial_tasks(loss_func=None, tasks=("circle", "square")) -> list[jaxmtl.Task]:
    """Both tasks name their body op "base_mlp", each reading its own input key."""
    pool = {"base_mlp": nn.Sequential([nn.Dense(16), nn.relu]),
            **{f"{t}_head": nn.Dense(2) for t in tasks}}
    return [
        jaxmtl.Task(f"{t}_task", pool,
                    [jaxmtl.Operation("base_mlp", [("_input_", f"{t}_data")]),
                     jaxmtl.Operation(f"{t}_head", ["base_mlp"])],
                    jaxmtl.Scorer(metrics=["accuracy"]), loss_func)
        for t in tasks
    ]


@pytest.fixture(scope="module")
def trained():
    loaders = disjoint_loaders()
    model = jaxmtl.MultitaskClassifier(tutorial_tasks())
    trainer = jaxmtl.Trainer(n_epochs=8, lr=0.05, seed=0, progress_bar=False)
    trainer.fit(model, loaders)
    return model, trainer, loaders


def test_disjoint_inputs_train_score_and_predict(trained, tmp_path):
    model, _, loaders = trained
    scores = model.score(loaders)
    assert scores["circle_task/circle_dataset/valid/accuracy"] > 0.85
    assert scores["square_task/square_dataset/valid/accuracy"] > 0.85
    # The shared module has one set of weights; each task has its own body node.
    assert sorted(model.params) == ["base_mlp", "circle_head", "square_head"]
    assert model.graph.task_nodes["square_task"] == ("base_mlp@square_task", "square_head")

    path = tmp_path / "model.msgpack"
    model.save(path)
    fresh = jaxmtl.MultitaskClassifier(tutorial_tasks())
    fresh.load(path)
    assert fresh.score(loaders) == scores
    # One task alone, on its own dataset.
    square_valid = loaders[3]
    results = fresh.predict(square_valid, return_preds=True)
    assert list(results["probs"]) == ["square_task"]
    expected = model.predict(square_valid)["probs"]["square_task"]
    np.testing.assert_allclose(results["probs"]["square_task"], expected, rtol=1e-6)
    # Score on a fresh, untrained model initialises it from the loaders it is given.
    untrained = jaxmtl.MultitaskClassifier(tutorial_tasks())
    assert set(untrained.score([square_valid])) >= {"square_task/square_dataset/valid/accuracy"}


def test_modules_get_the_same_weights_whichever_loader_creates_them():
    loaders = disjoint_loaders()
    forward = jaxmtl.MultitaskClassifier(tutorial_tasks())
    forward.init_from_loaders(loaders, seed=5)
    backward = jaxmtl.MultitaskClassifier(tutorial_tasks())
    backward.init_from_loaders(loaders[::-1], seed=5)
    for a, b in zip(jax.tree.leaves(forward.params), jax.tree.leaves(backward.params),
                    strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # test_model.py checks the scalar form's loss terms row by row by default
def test_scalar_loss_func_trains_like_the_per_example_form():
    loaders = disjoint_loaders()
    params = []
    for loss_func in (None, jaxmtl.cross_entropy):
        model = jaxmtl.MultitaskClassifier(tutorial_tasks(loss_func))
        jaxmtl.Trainer(n_epochs=2, lr=0.05, seed=0, progress_bar=False).fit(model, loaders)
        params.append(model.params)
    for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def _weighted_cross_entropy(logits, labels):
    """torch's F.cross_entropy(weight=[1, 10]): sum(w[y] * ce) / sum(w[y])."""
    weights = jnp.asarray([1.0, 10.0])[labels]
    return jnp.sum(weights * jaxmtl.cross_entropy(logits, labels, "none")) / jnp.sum(weights)


def test_a_scalar_loss_that_is_not_a_mean_of_rows_is_refused():
    """Row by row, a class-weighted mean (torch's weight=) or a sum trains as the plain
    mean: the weights cancel. fit refuses it before the first step, saying what to write;
    plain means (F.cross_entropy's form) and per-row losses pass."""
    from jaxmtl.training.preflight import check_scalar_losses

    loaders = disjoint_loaders()
    widths = {"circle_task": 2, "square_task": 2}
    for loss_func in (None, jaxmtl.cross_entropy, lambda x, y: jaxmtl.cross_entropy(x, y) * 3):
        check_scalar_losses(jaxmtl.MultitaskClassifier(tutorial_tasks(loss_func)), loaders,
                            widths)
    summed = functools.partial(jaxmtl.cross_entropy, reduction="sum")
    with pytest.raises(ValueError, match=r"^Task 'circle_task': loss_func returns a scalar that is "
                       r"not the mean of its rows' losses \(.* on 8 rows, their mean .*\): "
                       r"a weighted mean \(torch's weight=\) or a sum\?"):
        check_scalar_losses(jaxmtl.MultitaskClassifier(tutorial_tasks(summed)), loaders, widths)
    model = jaxmtl.MultitaskClassifier(tutorial_tasks(_weighted_cross_entropy))
    with pytest.raises(ValueError, match="Return per-row losses"):
        jaxmtl.Trainer(n_epochs=1, seed=0, progress_bar=False).fit(model, loaders)


def test_fit_keeps_the_arrays_the_user_holds():
    loaders = disjoint_loaders()
    model = jaxmtl.MultitaskClassifier(tutorial_tasks())
    X = {"circle_data": _points(4, 0), "square_data": _points(4, 1)}
    initial = model.init(X)
    before = jax.tree.map(np.array, initial)
    held_params = model.params
    trainer = jaxmtl.Trainer(n_epochs=1, lr=0.05, seed=0, progress_bar=False)
    trainer.fit(model, loaders)
    trainer.fit(model, loaders)
    for held, copy in zip(jax.tree.leaves(initial), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(held), copy)  # readable, unchanged
    assert all(not leaf.is_deleted() for leaf in jax.tree.leaves(held_params))
    assert not np.allclose(model.params["base_mlp"]["layers_0"]["kernel"],
                           before["params"]["base_mlp"]["layers_0"]["kernel"])


def test_hard_label_outside_the_head_is_an_error():
    X = _points(40, 0)
    labels = _labels("circle", X) + 1  # the 1-indexed mistake: labels 1 and 2, K = 2
    dataset = jaxmtl.DictDataset("circle_dataset", "train", {"circle_data": X},
                                 {"circle_task": labels})
    model = jaxmtl.MultitaskClassifier(tutorial_tasks(tasks=("circle",)))
    trainer = jaxmtl.Trainer(n_epochs=1, progress_bar=False, seed=0)
    with pytest.raises(ValueError, match=r"Task 'circle_task', dataset 'circle_dataset' "
                                         r"\(train\): label 2 \(row \d+\) is outside the "
                                         r"head's K = 2 classes"):
        trainer.fit(model, [jaxmtl.DictDataLoader(dataset, 8)])
    assert trainer.state is None  # no step ran


@pytest.mark.parametrize("model_seed, trainer_seeds, same", [
    (None, (1, 2), False),  # the Trainer's seed drives init
    (None, (1, 1), True),
    (7, (1, 2), True),      # an explicit model seed wins
])
def test_trainer_seed_seeds_initialisation(model_seed, trainer_seeds, same):
    loaders = disjoint_loaders()
    initial = []
    for trainer_seed in trainer_seeds:
        model = jaxmtl.MultitaskClassifier(tutorial_tasks(), seed=model_seed)
        model.init_from_loaders(loaders, seed=trainer_seed)
        initial.append(np.asarray(model.params["base_mlp"]["layers_0"]["kernel"]))
    assert np.array_equal(*initial) == same


def test_fit_initialises_from_the_trainer_seed_and_keeps_existing_weights():
    loaders = disjoint_loaders()
    model = jaxmtl.MultitaskClassifier(tutorial_tasks())
    reference = jaxmtl.MultitaskClassifier(tutorial_tasks())
    reference.init_from_loaders(loaders, seed=3)
    trainer = jaxmtl.Trainer(n_epochs=0, seed=3, progress_bar=False)
    trainer.fit(model, loaders)
    np.testing.assert_array_equal(model.params["circle_head"]["kernel"],
                                  reference.params["circle_head"]["kernel"])
    jaxmtl.Trainer(n_epochs=0, seed=4, progress_bar=False).fit(model, loaders)
    np.testing.assert_array_equal(model.params["circle_head"]["kernel"],
                                  reference.params["circle_head"]["kernel"])


def test_wrong_input_key_names_the_op_the_task_and_the_keys():
    X = _points(16, 0)
    dataset = jaxmtl.DictDataset("circle_dataset", "train", {"dat": X},
                                 {"circle_task": _labels("circle", X)})
    model = jaxmtl.MultitaskClassifier(tutorial_tasks(tasks=("circle",)))
    with pytest.raises(KeyError, match=r"Op 'base_mlp' \(module 'base_mlp'\) of task "
                                       r"'circle_task' reads input \('_input_', "
                                       r"'circle_data'\), which this batch does not have; "
                                       r"its X_dict keys are \['dat'\]"):
        jaxmtl.Trainer(n_epochs=1, progress_bar=False).fit(
            model, [jaxmtl.DictDataLoader(dataset, 8)])


def test_labels_that_match_no_task_are_warned_about(caplog):
    X = _points(16, 0)
    typo = jaxmtl.DictDataset("circle_dataset", "train", {"circle_data": X},
                              {"circle_tsk": _labels("circle", X)})
    model = jaxmtl.MultitaskClassifier(tutorial_tasks(tasks=("circle",)))
    with caplog.at_level(logging.WARNING, logger="jaxmtl"):
        jaxmtl.Trainer(n_epochs=1, progress_bar=False).fit(
            model, [jaxmtl.DictDataLoader(typo, 8)])
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "labels ['circle_tsk'] match no task of the model" in messages
    assert "No 'train' dataloader labels any task of the model" in messages


class _ModeProbe(nn.Module):
    """Records the mode it was called in as its output (1 = training)."""

    keyword: str

    @nn.compact
    def __call__(self, x, **kwargs):
        flag = kwargs[self.keyword]
        training = (not flag) if self.keyword == "deterministic" else flag
        dense = nn.Dense(2)(x)
        return dense * 0 + (1.0 if training else 0.0)


class Deterministic(_ModeProbe):
    keyword: str = "deterministic"

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        return super().__call__(x, deterministic=deterministic)


class Training(_ModeProbe):
    keyword: str = "training"

    @nn.compact
    def __call__(self, x, training: bool = False):
        return super().__call__(x, training=training)


@pytest.mark.parametrize("module", [Deterministic(), Training()], ids=["deterministic",
                                                                       "training"])
def test_flax_train_eval_keywords_are_set(module):
    graph = jaxmtl.build_graph([jaxmtl.Task(
        "t", {"probe": module}, [jaxmtl.Operation("probe", [("_input_", "x")])])])
    X = {"x": np.ones((3, 2), np.float32)}
    variables = jaxmtl.init_variables(graph, X, jax.random.PRNGKey(0))
    for train, expected in ((True, 1.0), (False, 0.0)):
        outputs, _ = jaxmtl.apply_ops(graph, variables, X, ["t"], train=train)
        np.testing.assert_array_equal(outputs["probe"], np.full((3, 2), expected))


def test_snorkel_positional_order_and_device():
    scorer = jaxmtl.Scorer(metrics=["accuracy", "f1"])
    pool = {"lin": nn.Dense(2)}
    task = jaxmtl.Task("t", pool, [jaxmtl.Operation("lin", [("_input_", "x")])], scorer)
    assert task.scorer is scorer
    with pytest.raises(ValueError, match="Task 't': scorer is function, expected a Scorer"):
        jaxmtl.Task("t", pool, [jaxmtl.Operation("lin", [("_input_", "x")])],
                    jaxmtl.cross_entropy)
    model = jaxmtl.MultitaskClassifier([task], device=-1)
    assert model.parallel.devices[0].platform == "cpu"
    with pytest.raises(ValueError, match="device=99 is not one of the"):
        jaxmtl.MultitaskClassifier([task], device=99)


def test_logits_of_rank_three_are_named():
    graph = jaxmtl.build_graph([jaxmtl.Task(
        "t", {"lin": nn.Dense(2)}, [jaxmtl.Operation("lin", [("_input_", "x")])])])
    X = {"x": np.ones((3, 4, 2), np.float32)}
    variables = jaxmtl.init_variables(graph, X, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"Task 't': its last op 'lin' returned logits of "
                                         r"shape \(3, 4, 2\); expected \[B, K\]"):
        jaxmtl.task_loss_terms(graph, variables, X, {"t": np.zeros(3, np.int32)})


def test_one_trainer_seed_makes_the_run_reproducible():
    params = []
    for _ in range(2):
        loaders = disjoint_loaders(loader_seed=None)  # each loader draws its own seed
        model = jaxmtl.MultitaskClassifier(tutorial_tasks())
        jaxmtl.Trainer(n_epochs=1, lr=0.05, seed=11, progress_bar=False).fit(model, loaders)
        params.append(model.params)
    for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_progress_bar_shows_the_loss_at_every_epoch_end(capsys):
    loaders = disjoint_loaders()
    model = jaxmtl.MultitaskClassifier(tutorial_tasks())
    trainer = jaxmtl.Trainer(n_epochs=2, lr=0.05, seed=0)
    trainer.fit(model, loaders)
    err = capsys.readouterr().err
    for epoch in range(2):
        final = [line for line in err.replace("\r", "\n").splitlines()
                 if line.startswith(f"Epoch {epoch}: 100%")]
        assert final and "loss=" in final[-1], final
    shown = float(final[-1].split("loss=")[1].split(",")[0])
    np.testing.assert_allclose(shown, trainer.metrics["model/all/train/loss"], rtol=1e-3)


class _TwoOutputs(nn.Module):
    @nn.compact
    def __call__(self, x):
        hidden = nn.Dense(4)(x)
        return hidden, 2 * hidden


def test_a_head_reading_a_tuple_is_named():
    # nn.Dense would read the tuple as one stacked [2, B, 4] array and train on it.
    pool = {"enc": _TwoOutputs(), "head": nn.Dense(2)}
    graph = jaxmtl.build_graph([jaxmtl.Task(
        "t", pool, [jaxmtl.Operation("enc", [("_input_", "x")]),
                    jaxmtl.Operation("head", ["enc"])])])
    X = {"x": np.ones((3, 5), np.float32)}
    with pytest.raises(ValueError, match=r"Op 'head' \(module 'head'\) of task 't' is a task "
                                         r"head and reads the whole output of op 'enc', "
                                         r"which is a tuple of 2; .* \('enc', index_or_key\)"):
        jaxmtl.init_variables(graph, X, jax.random.PRNGKey(0))
    picked = jaxmtl.build_graph([jaxmtl.Task(
        "t", pool, [jaxmtl.Operation("enc", [("_input_", "x")]),
                    jaxmtl.Operation("head", [("enc", 1)])])])
    variables = jaxmtl.init_variables(picked, X, jax.random.PRNGKey(0))
    outputs, _ = jaxmtl.apply_ops(picked, variables, X, ["t"])
    assert outputs["head"].shape == (3, 2)
