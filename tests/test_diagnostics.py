"""Interference diagnostics (``TrainerConfig(log_task_gradients=True)``) in the Trainer."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import LEGACY_CPU_EMITTERS, linear_data, make_task

import jaxmtl
from jaxmtl import MultitaskClassifier, Trainer, TrainerConfig
from jaxmtl.training.accumulate import accumulate_terms, fit_group_step, zero_loss_accumulator
from jaxmtl.training.balancers import BALANCER_NAMES, balancer_for_tasks
from jaxmtl.training.diagnostics import accumulate_diagnostics, zero_diagnostics
from jaxmtl.training.step import train_step_on

TASKS = ("task1", "task2", "task3")
SUFFIXES = {"task1": ("A", "B"), "task2": ("A", "C"), "task3": ("A", "D")}
EVERY_STEP = {"counter_unit": "batches", "evaluation_freq": 1}


def three_task_model():
    """Three tasks sharing linear1A (and the parameter-free relu), each with its head."""
    return MultitaskClassifier([make_task(t, SUFFIXES[t]) for t in TASKS])


def one_batch_loaders(n=16):
    """One train loader per task, each one batch of ``n`` rows: a one-step epoch."""
    loaders = []
    for index, task in enumerate(TASKS):
        X, Y = linear_data(n, index, bias=0.2 * index)
        ds = jaxmtl.DictDataset(f"d_{task}", "train", {"data": X}, {task: Y})
        loaders.append(jaxmtl.DictDataLoader(ds, batch_size=n, shuffle=False))
    return loaders


def fit(model, loaders, **overrides):
    config = dict(n_epochs=1, lr=0.01, seed=0, progress_bar=False, batch_scheduler="mixed",
                  log_manager_config=EVERY_STEP)
    config.update(overrides)
    trainer = Trainer(**config)
    trainer.fit(model, loaders)
    return trainer


def hand_task_grads(params, loaders):
    """Per task, jax.grad of its mean cross-entropy w.r.t. linear1A, by hand (no jaxmtl)."""
    def loss(shared, task, X, Y):
        head = params[f"linear2{SUFFIXES[task][1]}"]
        hidden = jax.nn.relu(X @ shared["kernel"] + shared["bias"])
        logits = hidden @ head["kernel"] + head["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()

    grad = jax.jit(jax.grad(loss), static_argnums=1)  # one compile a task, not one an op
    grads = []
    for dl, task in zip(loaders, TASKS, strict=True):
        X, Y = dl.dataset.X_dict["data"], dl.dataset.Y_dict[task]
        g = grad(params["linear1A"], task, jnp.asarray(X), jnp.asarray(Y))
        grads.append(np.concatenate([np.ravel(g["kernel"]), np.ravel(g["bias"])]))
    return np.stack(grads).astype(np.float64)


@pytest.mark.parametrize("balancer", ["equal", "pcgrad"])
def test_norms_and_cosines_equal_hand_computation(tmp_path, balancer):
    loaders = one_batch_loaders()
    model = three_task_model()
    model.init_from_loaders(loaders, seed=0)
    initial = jax.tree.map(np.asarray, model.params)
    trainer = fit(model, loaders, balancer=balancer, log_task_gradients=True, logging=True,
                  log_writer="json", log_writer_config={"log_dir": str(tmp_path),
                                                     "run_name": "run"})
    grads = hand_task_grads(initial, loaders)
    norms = np.linalg.norm(grads, axis=1)
    metrics = trainer.metrics
    for t, task in enumerate(TASKS):
        np.testing.assert_allclose(metrics[f"diagnostics/grad_norm/{task}"], norms[t],
                                   rtol=1e-5)
    for a in range(3):
        for b in range(a + 1, 3):
            cosine = grads[a] @ grads[b] / (norms[a] * norms[b])
            np.testing.assert_allclose(metrics[f"diagnostics/cosine/{TASKS[a]}/{TASKS[b]}"],
                                       cosine, rtol=1e-4, atol=1e-6)
    cosines = [grads[a] @ grads[b] / (norms[a] * norms[b])
               for a in range(3) for b in range(a + 1, 3)]
    assert metrics["diagnostics/conflict_fraction"] == float(min(cosines) < 0)
    if balancer == "equal":
        assert all(metrics[f"diagnostics/weight/{t}"] == 1.0 for t in TASKS)
    # The JSON log holds every key, at the one evaluation (step 1).
    log_file = tmp_path / "run" / "log.json"
    log = json.loads(log_file.read_text())
    keys = sorted(k for k in log if k.startswith("diagnostics/"))
    assert keys == sorted(k for k in metrics if k.startswith("diagnostics/"))
    assert len(keys) == 3 + 3 + 3 + 1
    assert log["diagnostics/grad_norm/task1"] == [[48, pytest.approx(norms[0], rel=1e-5)]]


def shared_head_loaders(sign, n=32, batch_size=8):
    """One loader whose dataset labels tasks "a" and "b" on the same rows: "b" gets the
    same labels (sign=+1) or the opposite ones (sign=-1)."""
    X, Y = linear_data(n, 0)
    Y_b = Y if sign > 0 else 1 - Y
    ds = jaxmtl.DictDataset("d", "train", {"data": X}, {"a": Y, "b": Y_b})
    return [jaxmtl.DictDataLoader(ds, batch_size=batch_size, shuffle=True, seed=1)]


def shared_head_model():
    """Tasks "a" and "b" run the same linear layer, zero-initialised: every parameter is
    shared, and both classes start at probability 1/2 on every row."""
    head = nn.Dense(2, kernel_init=nn.initializers.zeros)
    tasks = []
    for name in ("a", "b"):
        op = jaxmtl.Operation("head", [("_input_", "data")], name=f"head_{name}")
        tasks.append(jaxmtl.Task(name=name, module_pool={"head": head}, op_sequence=[op]))
    return MultitaskClassifier(tasks)


@pytest.mark.parametrize("sign, fraction, cosine", [(-1, 1.0, -1.0), (1, 0.0, 1.0)])
def test_conflict_fraction_of_opposite_and_aligned_tasks(sign, fraction, cosine):
    # One dataset labelling both tasks: every step holds both (no "mixed" needed); 4
    # steps between the evaluations. At probabilities 1/2, opposite labels give each row
    # exactly opposite logit gradients (p - onehot(y) = -(p - onehot(1 - y))): cosine -1,
    # and their sum, the update, is 0, so every step starts there again.
    trainer = fit(shared_head_model(), shared_head_loaders(sign), batch_scheduler="shuffled",
                  log_manager_config={"counter_unit": "batches", "evaluation_freq": 4},
                  log_task_gradients=True)
    metrics = trainer.metrics
    assert metrics["diagnostics/conflict_fraction"] == fraction
    np.testing.assert_allclose(metrics["diagnostics/cosine/a/b"], cosine, rtol=1e-6)
    np.testing.assert_allclose(metrics["diagnostics/grad_norm/a"],
                               metrics["diagnostics/grad_norm/b"], rtol=1e-6)
    assert metrics["diagnostics/grad_norm/a"] > 0.1


def test_uncertainty_weights_are_the_balancer_states():
    loaders = one_batch_loaders()
    config = dict(balancer="uncertainty", balancer_config={"init_log_var": 0.5},
                  log_task_gradients=True)
    one = fit(three_task_model(), loaders, **config)
    # Step 1 uses the initial state's weights exp(-s) = exp(-0.5).
    for task in TASKS:
        np.testing.assert_allclose(one.metrics[f"diagnostics/weight/{task}"], np.exp(-0.5),
                                   rtol=1e-6)
    log_vars = np.asarray(one.state.balancer_state.log_vars)
    assert not np.allclose(log_vars, 0.5)  # the state moved: step 2's weights differ
    two = fit(three_task_model(), loaders, n_epochs=2, **config)
    for t, task in enumerate(TASKS):
        np.testing.assert_allclose(two.metrics[f"diagnostics/weight/{task}"],
                                   np.exp(-log_vars[t]), rtol=1e-6)


@pytest.mark.parametrize("balancer", ["equal", "pcgrad"])
def test_off_logs_nothing_and_on_trains_bit_identically(balancer):
    loaders = one_batch_loaders()
    off_model, on_model = three_task_model(), three_task_model()
    off = fit(off_model, loaders, n_epochs=3, balancer=balancer)
    on = fit(on_model, loaders, n_epochs=3, balancer=balancer, log_task_gradients=True)
    assert not [key for key in off.metrics if key.startswith("diagnostics/")]
    assert "diagnostics/grad_norm/task1" in on.metrics
    assert "diagnostics" not in off.state.__dict__  # the state itself is unchanged
    for a, b in zip(jax.tree.leaves(off_model.params), jax.tree.leaves(on_model.params),
                    strict=True):
        if LEGACY_CPU_EMITTERS:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        else:
            np.testing.assert_array_equal(a, b)
    assert off.compiled_programs() == on.compiled_programs() == 1


# Every method, by its gradient path: MGDA-UB (representation gradients: the diagnostics
# compute the per-task ones) by default, the others with -m slow (the default run covers
# the plain step and pcgrad above, uncertainty below).
@pytest.mark.parametrize("name, balancer_config", [
    pytest.param(name, {}, marks=pytest.mark.slow) for name in BALANCER_NAMES if name != "equal"
] + [("mgda", {"upper_bound": True})])
def test_every_balancer_logs_finite_diagnostics(name, balancer_config):
    trainer = fit(three_task_model(), one_batch_loaders(), n_epochs=2, balancer=name,
                  balancer_config=balancer_config, log_task_gradients=True)
    diagnostics = {k: v for k, v in trainer.metrics.items() if k.startswith("diagnostics/")}
    assert len(diagnostics) == 10
    assert all(np.isfinite(v) for v in diagnostics.values()), diagnostics
    assert all(trainer.metrics[f"diagnostics/weight/{t}"] > 0 for t in TASKS)


@pytest.mark.parametrize("balancer", [None, "pcgrad"])
def test_off_step_lowers_to_the_plain_step_program(balancer):
    # Off, fit_group_step is train_step_on plus the loss accumulation, op for op: the
    # lowered programs are the same text (no diagnostics op is traced).
    graph = jaxmtl.build_graph([make_task(t, SUFFIXES[t]) for t in TASKS])
    loaders = one_batch_loaders(n=8)
    batches = tuple((dl.dataset.X_dict, dl.dataset.Y_dict, np.ones(8, bool)) for dl in loaders)
    batches = jax.tree.map(jnp.asarray, batches)
    variables = jaxmtl.init_variables(graph, batches[0][0], jax.random.PRNGKey(0))
    task_modules = {n: {op.module_name for op in ops} for n, ops in graph.op_sequences.items()}
    state = jaxmtl.TrainState.create(
        variables, jaxmtl.make_optimizer(TrainerConfig(), 0.01), jax.random.PRNGKey(0),
        balancer=balancer and balancer_for_tasks(balancer, {}, task_modules))
    indices = tuple(jnp.int32(i) for i in range(3))

    def reference(state, accumulator, batches, indices):
        state, metrics = train_step_on(graph, state, batches, skip_inactive=False)
        for terms, index in zip(metrics["batch_terms"], indices, strict=True):
            accumulator = accumulate_terms(graph, accumulator, terms, index)
        return state, accumulator

    reference.__name__ = "fit_group_step"  # the program's name is in its text
    accumulator = zero_loss_accumulator(3, 3)
    off = jax.jit(functools.partial(fit_group_step, graph)).lower(
        state, accumulator, batches, indices).as_text()
    assert off == jax.jit(reference).lower(state, accumulator, batches, indices).as_text()
    on = jax.jit(functools.partial(fit_group_step, graph)).lower(
        state, zero_loss_accumulator(3, 3, diagnostics=True), batches, indices).as_text()
    assert on != off


def test_one_task_per_step_logs_norms_and_weights_only():
    loaders = one_batch_loaders()
    trainer = fit(three_task_model(), loaders, batch_scheduler="sequential",
                  log_manager_config={"counter_unit": "batches", "evaluation_freq": 3},
                  log_task_gradients=True)
    keys = sorted(k for k in trainer.metrics if k.startswith("diagnostics/"))
    assert keys == sorted([f"diagnostics/grad_norm/{t}" for t in TASKS]
                          + [f"diagnostics/weight/{t}" for t in TASKS])


def test_steps_per_call_gives_the_per_step_diagnostics():
    loaders = one_batch_loaders()
    common = dict(n_epochs=2, batch_scheduler="sequential", log_task_gradients=True,
                  log_manager_config={"counter_unit": "batches", "evaluation_freq": 6})
    per_step = fit(three_task_model(), loaders, **common)
    fused = fit(three_task_model(), loaders, steps_per_call=4, **common)
    diagnostics = {k: v for k, v in per_step.metrics.items() if k.startswith("diagnostics/")}
    assert len(diagnostics) == 6
    for key, value in diagnostics.items():
        np.testing.assert_allclose(fused.metrics[key], value, rtol=1e-6, err_msg=key)


def test_exact_resume_with_diagnostics(tmp_path):
    X, Y = linear_data(96, 0)
    loaders = [jaxmtl.DictDataLoader(
        jaxmtl.DictDataset(f"d_{task}", "train", {"data": X + index}, {task: Y}),
        batch_size=16, shuffle=True, seed=index) for index, task in enumerate(TASKS)]
    # 6 steps an epoch, evaluations every 4: a 1-epoch run checkpoints at step 4 (mid-
    # epoch); resumed for 2 epochs it evaluates at steps 8 and 12, as the full run does.
    common = dict(balancer="pcgrad", log_task_gradients=True,
                  log_manager_config={"counter_unit": "batches", "evaluation_freq": 4})
    full_model = three_task_model()
    full = fit(full_model, loaders, n_epochs=2, **common)
    fit(three_task_model(), loaders, n_epochs=1, checkpointing=True,
        checkpointer_config={"checkpoint_dir": str(tmp_path), "checkpoint_clear": False},
        **common)
    resumed_model = three_task_model()
    resumed = Trainer(n_epochs=2, seed=0, lr=0.01, progress_bar=False,
                      batch_scheduler="mixed", **common)
    resumed.fit(resumed_model, loaders, resume_from=str(tmp_path))
    for a, b in zip(jax.tree.leaves(full_model.params), jax.tree.leaves(resumed_model.params),
                    strict=True):
        np.testing.assert_array_equal(b, a)
    diagnostics = {k: v for k, v in full.metrics.items() if k.startswith("diagnostics/")}
    assert len(diagnostics) == 10
    assert {k: resumed.metrics[k] for k in diagnostics} == diagnostics


def test_accumulate_diagnostics_skips_absent_tasks_and_zero_gradients():
    sums = jax.tree.map(jnp.asarray, zero_diagnostics(3))
    grads = {"w": jnp.array([[3.0, 4.0], [0.0, 0.0], [-3.0, -4.0]])}
    mask = jnp.array([True, True, True])
    out = accumulate_diagnostics(sums, grads, jnp.array([0.5, 1.0, 2.0]), mask)
    np.testing.assert_allclose(out["grad_norm_sum"], [5.0, 0.0, 5.0])
    # The zero gradient has cosine 0 with both; tasks 0 and 2 are opposite.
    np.testing.assert_allclose(out["cosine_sum"], [[0, 0, -1], [0, 0, 0], [0, 0, 0]])
    assert float(out["conflict_steps"]) == 1.0 and float(out["paired_steps"]) == 1.0
    out = accumulate_diagnostics(out, grads, jnp.array([0.5, 0.0, 0.0]),
                                 jnp.array([True, False, False]))
    np.testing.assert_allclose(out["task_steps"], [2, 1, 1])
    np.testing.assert_allclose(out["weight_sum"], [1.0, 1.0, 2.0])
    assert float(out["paired_steps"]) == 1.0  # one task: no pair, no cosine


def test_log_task_gradients_must_be_a_bool():
    with pytest.raises(ValueError, match="TrainerConfig.log_task_gradients must be a bool, "
                                         "got 'yes'"):
        TrainerConfig(log_task_gradients="yes")


@pytest.fixture(scope="module")
def two_device_diagnostics(tmp_path_factory):
    """Both balancers' pmap and single-device diagnostics, from one 2-device subprocess."""
    script = Path(__file__).with_name("diagnostics_multidevice_run.py")
    out = tmp_path_factory.mktemp("diagnostics") / "out.json"
    run = subprocess.run([sys.executable, str(script), "equal,pcgrad", str(out)],
                         cwd=script.parent, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(out.read_text())


@pytest.mark.slow  # a 2-device subprocess, ~13 s (pmap equality: test_parallel.py)
@pytest.mark.parametrize("balancer", ["equal", "pcgrad"])
def test_pmap_gives_the_single_device_diagnostics(two_device_diagnostics, balancer):
    # 15 rows on 2 devices: one padded row; per-task gradients are summed across the
    # devices before the norms and cosines, as the balancers do.
    metrics = two_device_diagnostics[balancer]
    assert len(metrics["single"]) == 10
    assert metrics["pmap"].keys() == metrics["single"].keys()
    for key, value in metrics["single"].items():
        np.testing.assert_allclose(metrics["pmap"][key], value, rtol=1e-5, atol=1e-7,
                                   err_msg=key)


# -m slow: two runs of the example. By default the diagnostics values (through the JSON
# writer) are checked by test_norms_and_cosines_equal_hand_computation, and TensorBoard
# event files by test_trainer_logging.py::test_tensorboard_events.
@pytest.mark.slow
def test_balancers_example_writes_diagnostics_to_tensorboard(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import balancers
    from conftest import read_events

    last = balancers.diagnose(str(tmp_path), methods=("equal", "pcgrad"), n_epochs=1)
    for method in ("equal", "pcgrad"):
        (events,) = (tmp_path / method).glob("events.out.tfevents.*")
        tags = {value.tag for event in read_events(events) for value in event.summary.value}
        expected = {"diagnostics/grad_norm/a", "diagnostics/grad_norm/b",
                    "diagnostics/weight/a", "diagnostics/weight/b",
                    "diagnostics/cosine/a/b", "diagnostics/conflict_fraction"}
        assert expected <= tags, tags
    # PCGrad keeps both tasks on the one-unit body: they conflict in most steps.
    assert last["pcgrad"]["diagnostics/conflict_fraction"] > 0.5, last["pcgrad"]
