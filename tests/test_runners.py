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


def _specs(tree):
    return jax.tree.map(lambda leaf: (tuple(leaf.shape), str(leaf.dtype)), tree)


def test_abstract_state_has_the_shapes_of_the_created_state():
    """``abstract_variables`` and ``TrainState.abstract``: the shapes and dtypes the
    initialisation and ``create`` give, without creating anything."""
    train = loaders()
    model = jaxmtl.MultitaskClassifier([make_task("task1"), make_task("task2")])
    variables = model.abstract_variables(train, fallback_seed=0)
    assert model.variables is None  # nothing created
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    abstract = TrainState.abstract(variables, tx, jax.random.PRNGKey(0))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(abstract))
    model.init_from_loaders(train, seed=0)
    state = TrainState.create(model.variables, tx, jax.random.PRNGKey(0))
    assert _specs(variables) == _specs(model.variables)
    assert _specs(abstract) == _specs(state)
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    assert set(variables["params"]) == {"linear1A", "linear2B"}


def test_the_step_compiles_while_the_model_initialises(monkeypatch):
    """A first fit queues its step's compile (from the state's shapes) before the model's
    initialisation runs, and the loop's call uses that program: the fit compiles exactly
    as many programs as a fit that compiles nothing ahead (a spec placed otherwise than
    the loop's arrays would compile the step twice)."""
    from conftest import count_compiles

    import jaxmtl.initialisation as initialisation
    import jaxmtl.training.runners as runners
    events = []
    real_compile = runners.compile_in_background
    real_init = jaxmtl.MultitaskClassifier.init_from_loaders
    monkeypatch.setattr(runners, "compile_in_background",
                        lambda jobs, **kw: events.append(("compile", len(jobs)))
                        or real_compile(jobs, **kw))
    monkeypatch.setattr(jaxmtl.MultitaskClassifier, "init_from_loaders",
                        lambda self, *a, **kw: events.append("init") or real_init(self, *a, **kw))

    def run():
        # Each run compiles (or loads) its own initialisation: equal graphs share it.
        initialisation.init_program.cache_clear()
        model = jaxmtl.MultitaskClassifier([make_task("task1"), make_task("task2")])
        trainer = Trainer(n_epochs=1, lr=1e-2, seed=0, progress_bar=False)
        trainer.fit(model, loaders())
        return model, trainer

    run()  # the process's one-off programs (eager set-up ops) compile here, not below
    events.clear()
    fits = []
    early = count_compiles(lambda: fits.append(run()))
    (model, trainer), = fits
    # Two loaders of one task family: one program, queued once, before the init.
    assert events == [("compile", 1), "init"]
    assert trainer.compiled_programs() == 1
    monkeypatch.setattr(runners, "compile_in_background", lambda jobs, **kw: None)
    late = count_compiles(lambda: fits.append(run()))
    reference, _ = fits[1]
    assert early == late
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(reference.params),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_no_abstract_variables_beyond_the_compiled_init_loaders():
    """Past ``COMPILED_INIT_LOADERS`` loaders that create modules the early compile is
    skipped (None): tracing every head's initialisation cost what the overlap saved."""
    from jaxmtl.classifier import COMPILED_INIT_LOADERS

    n = COMPILED_INIT_LOADERS + 1
    tasks = [make_task(f"task{i}", ("A", f"H{i}")) for i in range(n)]
    train = []
    for i in range(n):
        X, Y = linear_data(16, i)
        train.append(jaxmtl.DictDataLoader(
            jaxmtl.DictDataset(f"d{i}", "train", {"data": X}, {f"task{i}": Y}), batch_size=8))
    model = jaxmtl.MultitaskClassifier(tasks)
    assert model.abstract_variables(train, fallback_seed=0) is None
    variables = model.abstract_variables(train[:COMPILED_INIT_LOADERS], fallback_seed=0)
    assert set(variables["params"]) == {"linear1A", *(f"linear2H{i}" for i in range(n - 1))}
    assert model.variables is None


def test_background_jobs_lower_at_once_and_compile_after_the_event():
    import threading

    from jaxmtl.training.compile_ahead import compile_in_background

    events, lowered = [], threading.Event()

    class Lowered:
        def compile(self):
            events.append("compile")

    class Program:
        def lower(self, *args, **kwargs):
            events.append(("lower", args, kwargs))
            lowered.set()
            return Lowered()

    after = threading.Event()
    executor = compile_in_background([(Program(), (1,), {"shape": 2})], after=after)
    assert lowered.wait(10)
    executor.shutdown(wait=False)
    assert events == [("lower", (1,), {"shape": 2})]  # and waits
    after.set()
    executor.shutdown(wait=True)
    assert events == [("lower", (1,), {"shape": 2}), "compile"]


def test_a_failed_initialisation_leaves_no_compile_thread_waiting(monkeypatch):
    """The steps' compile waits for the model's; when the initialisation raises, the
    wait ends all the same (a thread left waiting would block the interpreter's exit)."""
    import threading

    def broken(self, *args, **kwargs):
        raise RuntimeError("init failed")

    monkeypatch.setattr(jaxmtl.MultitaskClassifier, "init_from_loaders", broken)
    model = jaxmtl.MultitaskClassifier([make_task("task1"), make_task("task2")])
    with pytest.raises(RuntimeError, match="init failed"):
        Trainer(n_epochs=1, seed=0, progress_bar=False).fit(model, loaders())
    for thread in threading.enumerate():
        if thread.name.startswith("jaxmtl-compile-ahead"):
            thread.join(timeout=60)
            assert not thread.is_alive()
