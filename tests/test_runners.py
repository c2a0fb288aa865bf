"""Runners: siblings behind one Protocol; the state passes through them, visibly."""

from __future__ import annotations

import inspect

import jax
import numpy as np
import optax
import pytest
from conftest import linear_data, make_task

import jaxmtl
from jaxmtl.parallel import DataParallel
from jaxmtl.training import Trainer
from jaxmtl.training.accumulate import zero_loss_accumulator
from jaxmtl.training.batch_schedulers import make_batch_scheduler
from jaxmtl.training.runners import (
    FusedPrograms,
    FusedRunner,
    PerStepRunner,
    Runner,
    StepPrograms,
    make_runner,
)
from jaxmtl.training.step import TrainState


def loaders():
    out = []
    for t, name in enumerate(("task1", "task2")):
        X, Y = linear_data(40, t)
        Y[::6] = -1
        ds = jaxmtl.DictDataset(f"d{t}", "train", {"data": X}, {name: Y})
        out.append(jaxmtl.DictDataLoader(ds, batch_size=16, shuffle=True, seed=t))
    return out


def fresh(train):
    model = jaxmtl.MultitaskClassifier([make_task("task1"), make_task("task2")])
    model.init_from_loaders(train, seed=0)
    state = TrainState.create(model.variables, optax.adam(1e-2), jax.random.PRNGKey(0))
    return model, state


@pytest.mark.parametrize("steps_per_call", [1, 3])
def test_both_runners_satisfy_the_protocol(steps_per_call):
    train = loaders()
    model, state = fresh(train)
    runner = make_runner(model.graph, DataParallel("single", (jax.devices()[0],)), state,
                         train, steps_per_call)
    assert isinstance(runner, Runner)
    assert type(runner) is (FusedRunner if steps_per_call > 1 else PerStepRunner)
    assert isinstance(runner.compiled, FusedPrograms if steps_per_call > 1 else StepPrograms)
    # Siblings, not a subclass that skips its parent's __init__.
    assert not issubclass(FusedRunner, PerStepRunner)
    assert not issubclass(PerStepRunner, FusedRunner)
    assert runner.compiled.programs() == 0  # nothing compiled before the first step


@pytest.mark.parametrize("steps_per_call", [1, 3])
def test_hand_written_loop_over_a_runner_equals_fit(steps_per_call):
    # The loop the runners module documents, written out: the same weights as fit's.
    train = loaders()
    model, state = fresh(train)
    trainer = Trainer(n_epochs=1, lr=1e-2, seed=0, progress_bar=False,
                      batch_scheduler="sequential", steps_per_call=steps_per_call)
    reference = jaxmtl.MultitaskClassifier([make_task("task1"), make_task("task2")])
    trainer.fit(reference, train)

    state = trainer.state.replace(  # the fit's optimizer, from the initial weights
        step=jax.numpy.zeros((), jax.numpy.int32), params=model.params,
        opt_state=trainer.state.tx.init(model.params))
    runner = make_runner(model.graph, DataParallel("single", (jax.devices()[0],)), state,
                         train, steps_per_call)
    state, accumulator = runner.prepare(state, zero_loss_accumulator(2, 2))
    for dl in train:
        dl.set_epoch(0)
    scheduled = make_batch_scheduler("sequential", 0).get_batches(runner.scheduler_loaders, 0)
    for item, _ in runner.batches(scheduled):
        state, accumulator = runner.step(state, accumulator, item)
    state, accumulator = runner.flush(state, accumulator)
    state = runner.host(state)

    assert int(state.step) == int(trainer.state.step) == 6  # 3 batches per loader
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference.params),
                         strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    counts = np.asarray(runner.host(accumulator)["count"])
    # Active rows per (loader, task): 40 rows, every sixth unlabelled.
    np.testing.assert_array_equal(counts, [[33, 0], [0, 33]])
    assert trainer.compiled_programs() == 1


def test_fit_stays_short():
    # Set-up, evaluation/checkpoint and teardown live in named helpers (issue 13, item 3).
    lines = inspect.getsource(Trainer.fit).splitlines()
    assert len(lines) < 70, f"Trainer.fit has {len(lines)} lines"
