"""Per-module optimisers and frozen modules (``TrainerConfig.module_optimizers``)."""

import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_task

from jaxmtl import (
    MultitaskClassifier,
    Operation,
    Task,
    Trainer,
    TrainerConfig,
    TrainState,
    build_graph,
    init_variables,
    make_optimizer,
    task_loss_terms,
    total_loss,
    train_step,
)
from jaxmtl.training.lr_schedules import make_lr_schedule
from jaxmtl.training.module_optimizers import lr_schedule_for
from jaxmtl.training.runners import PerStepRunner

SGD = {"optimizer": "sgd", "optimizer_config": {"sgd_config": {"momentum": 0.0}}}


# --- construction-time validation (no JAX program) --------------------------------------------

@pytest.mark.parametrize("value, message", [
    ({"head": "sgd"}, "TrainerConfig.module_optimizers['head']: expected a dict of overrides "
                      "(keys ['optimizer', 'lr', 'l2', 'optimizer_config']), an "
                      "optax.GradientTransformation or 'frozen', got 'sgd' (str)"),
    ({"head": 0.1}, "TrainerConfig.module_optimizers['head']: expected a dict of overrides "
                    "(keys ['optimizer', 'lr', 'l2', 'optimizer_config']), an "
                    "optax.GradientTransformation or 'frozen', got 0.1 (float)"),
    ({"head": {"momentum": 0.9}}, "TrainerConfig.module_optimizers['head']: unknown key(s) "
                                  "['momentum']; allowed keys are ['l2', 'lr', 'optimizer', "
                                  "'optimizer_config']"),
    ({"head": {"lr": -1.0}}, "TrainerConfig.module_optimizers['head'].lr must be >= 0, got -1.0"),
    ({"head": {"optimizer": "rmsprop"}},
     "Unrecognized optimizer option 'rmsprop' (TrainerConfig.module_optimizers['head']"
     "['optimizer']); expected one of ['sgd', 'adam', 'adamax']"),
    ({"head": {"optimizer_config": {"sgd_config": {"momentum": -1}}}},
     "TrainerConfig.module_optimizers['head']['optimizer_config']: SGDConfig.momentum must "
     "be >= 0, got -1"),
    ([("head", "frozen")], "TrainerConfig.module_optimizers must be a dict of module name -> "
                           "settings, got [('head', 'frozen')]"),
])
def test_invalid_values_are_refused_at_construction(value, message):
    with pytest.raises(ValueError) as raised:
        TrainerConfig(module_optimizers=value)
    assert str(raised.value) == message


def test_overrides_need_an_optimizer_name_under_a_custom_global_optimizer():
    with pytest.raises(ValueError) as raised:
        TrainerConfig(optimizer=optax.sgd(0.1), module_optimizers={"h": {"lr": 0.1}})
    assert str(raised.value) == (
        "TrainerConfig.module_optimizers['h']: ['lr'] do not apply to "
        "TrainerConfig.optimizer, a GradientTransformation; add an optimizer name, e.g. "
        "{'optimizer': 'adam', ...}, or give the module its own GradientTransformation")
    config = TrainerConfig(optimizer=optax.sgd(0.1),
                           module_optimizers={"h": {"optimizer": "sgd", "lr": 0.1}})
    assert config.module_optimizers == {"h": {"optimizer": "sgd", "lr": 0.1}}


def test_valid_values_are_kept_and_copied():
    tx = optax.sgd(0.5)
    overrides = {"lr": 0.1}
    config = TrainerConfig(module_optimizers={"a": "frozen", "b": tx, "c": overrides})
    assert config.module_optimizers == {"a": "frozen", "b": tx, "c": {"lr": 0.1}}
    overrides["lr"] = 5.0  # the frozen config does not see later changes of the caller's dict
    assert config.module_optimizers["c"] == {"lr": 0.1}


# --- one step by hand --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_task():
    """Task "t": linear1A -> relu -> linear2B, one batch of 8 rows, its variables."""
    graph = build_graph([make_task("t")])
    rng = np.random.default_rng(0)
    batch = ({"data": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)},
             {"t": jnp.asarray(rng.integers(0, 2, 8))}, jnp.ones(8, bool))
    variables = init_variables(graph, batch[0], jax.random.PRNGKey(0))

    def loss(params):
        terms, _ = task_loss_terms(graph, {"params": params}, *batch)
        return total_loss(graph, terms)

    return graph, batch, variables, jax.grad(loss)(variables["params"])


def one_step(one_task, **config):
    graph, batch, variables, _ = one_task
    config = TrainerConfig(**config)
    state = TrainState.create(variables, make_optimizer(config, config.lr),
                              jax.random.PRNGKey(0))
    new_state, _ = train_step(graph, state, *batch)
    return variables["params"], new_state


def global_norm(tree):
    return np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64)))
                       for g in jax.tree.leaves(tree)))


@pytest.mark.parametrize("grad_clip", [None, 0.05])
def test_sgd_step_moves_each_module_by_its_own_lr(one_task, grad_clip):
    grads = one_task[3]
    params, state = one_step(one_task, lr=0.01, grad_clip=grad_clip, **SGD,
                             module_optimizers={"linear2B": {"lr": 0.1}})
    # Clipping is global: one norm over every module's gradient (0.05 clips: measured 0.4).
    norm = global_norm(grads)
    scale = 1.0 if grad_clip is None else grad_clip / norm
    assert grad_clip is None or scale < 0.5
    for module, lr in [("linear2B", 0.1), ("linear1A", 0.01)]:
        for name in ("kernel", "bias"):
            expected = params[module][name] - lr * scale * grads[module][name]
            np.testing.assert_allclose(state.params[module][name], expected, rtol=1e-6,
                                       atol=1e-8, err_msg=f"{module}/{name}")


def test_custom_transformation_is_used_as_given(one_task):
    grads = one_task[3]
    params, state = one_step(one_task, lr=0.01, grad_clip=None,
                             module_optimizers={"linear2B": optax.sgd(0.5)})
    head = jax.tree.map(lambda p, g: p - 0.5 * g, params["linear2B"], grads["linear2B"])
    # The body keeps the global Adam: its first step is -lr * g / (|g| + eps), up to optax's
    # float32 bias correction (1 - 0.999 in float32 is 0.00099998713): -lr * sign(g) here.
    adam = optax.adam(0.01)
    body_step, _ = adam.update(grads["linear1A"], adam.init(params["linear1A"]))
    np.testing.assert_allclose(jax.tree.leaves(body_step)[1],
                               -0.01 * np.sign(grads["linear1A"]["kernel"]), rtol=1e-4)
    body = optax.apply_updates(params["linear1A"], body_step)
    for expected, got in [(head, state.params["linear2B"]), (body, state.params["linear1A"])]:
        for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-8)


def test_a_transformation_value_sees_the_whole_tree_with_other_modules_masked():
    """So a partition by path inside one module works: CrossStitch-like units at 10x."""
    by_path = optax.partition(
        {"stitch": optax.sgd(1.0), "rest": optax.sgd(0.1)},
        lambda tree: jax.tree_util.tree_map_with_path(
            lambda path, _: "stitch" if "stitch" in jax.tree_util.keystr(path) else "rest",
            tree))
    config = TrainerConfig(lr=0.01, grad_clip=None, **SGD, module_optimizers={"cs": by_path})
    tx = make_optimizer(config, config.lr)
    params = {"cs": {"stitch_0": jnp.zeros(2), "Dense_0": {"kernel": jnp.zeros(3)}},
              "head": jnp.zeros(1)}
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    np.testing.assert_array_equal(updates["cs"]["stitch_0"], [-1.0, -1.0])
    np.testing.assert_allclose(updates["cs"]["Dense_0"]["kernel"], [-0.1] * 3, rtol=1e-7)
    np.testing.assert_allclose(updates["head"], [-0.01], rtol=1e-7)


def test_overrides_merge_over_the_global_settings():
    """Global SGD with momentum 0.5: "a" keeps the momentum at its own lr, "b" turns it
    off; the second update of a constant gradient 1 is -lr * (1 + momentum)."""
    config = TrainerConfig(lr=0.01, grad_clip=None, optimizer="sgd",
                           optimizer_config={"sgd_config": {"momentum": 0.5}},
                           module_optimizers={
                               "a": {"lr": 0.1},
                               "b": {"optimizer_config": {"sgd_config": {"momentum": 0.0}}}})
    tx = make_optimizer(config, config.lr)
    params = {"a": jnp.zeros(1), "b": jnp.zeros(1), "c": jnp.zeros(1)}
    state = tx.init(params)
    for _ in range(2):
        updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    np.testing.assert_allclose([float(updates[m][0]) for m in "abc"],
                               [-0.1 * 1.5, -0.01, -0.01 * 1.5], rtol=1e-6)


def test_gradient_accumulation_wraps_every_group():
    config = TrainerConfig(lr=0.01, grad_clip=None, **SGD, grad_accumulation_steps=2,
                           module_optimizers={"head": {"lr": 0.1}})
    tx = make_optimizer(config, config.lr)
    params = {"body": jnp.zeros(2), "head": jnp.zeros(2)}
    state = tx.init(params)
    first, state = tx.update({"body": jnp.array([1.0, 2.0]), "head": jnp.array([3.0, 4.0])},
                             state, params)
    second, _ = tx.update({"body": jnp.array([3.0, 0.0]), "head": jnp.array([1.0, 0.0])},
                          state, params)
    assert all(np.all(np.asarray(leaf) == 0) for leaf in jax.tree.leaves(first))
    # The mean of the two gradients, each module at its own lr.
    np.testing.assert_allclose(second["body"], [-0.01 * 2.0, -0.01 * 1.0], rtol=1e-6)
    np.testing.assert_allclose(second["head"], [-0.1 * 2.0, -0.1 * 2.0], rtol=1e-6)


def test_frozen_module_is_left_out_of_the_clip_norm(one_task):
    grads = one_task[3]
    params, state = one_step(one_task, lr=0.01, grad_clip=0.05, **SGD,
                             module_optimizers={"linear1A": "frozen"})
    scale = 0.05 / global_norm(grads["linear2B"])
    assert scale < 0.5
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(state.params["linear1A"][name],
                                      params["linear1A"][name])
        np.testing.assert_allclose(state.params["linear2B"][name],
                                   params["linear2B"][name] - 0.01 * scale
                                   * grads["linear2B"][name], rtol=1e-6, atol=1e-8)


def test_group_lr_replaces_the_base_lr_of_the_schedule():
    """cosine from lr to min_lr: a group with lr 0.1 decays from 0.1 to min_lr (not to
    min_lr * 0.1 / 0.01, as a scaled copy of the global schedule would)."""
    config = TrainerConfig(lr=0.01, grad_clip=None, **SGD, lr_scheduler="cosine",
                           lr_scheduler_config={"min_lr": 0.005}, n_epochs=1,
                           module_optimizers={"head": {"lr": 0.1}})
    schedule, _ = make_lr_schedule(0.01, "cosine", config.lr_scheduler_config, 4, 1)
    tx = make_optimizer(config, schedule, lr_schedule_for(config, 4))
    params = {"body": jnp.zeros(1), "head": jnp.zeros(1)}
    opt_state, moved = tx.init(params), []
    for _ in range(4):
        updates, opt_state = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
        moved.append([-float(updates["body"][0]), -float(updates["head"][0])])
    head = make_lr_schedule(0.1, "cosine", config.lr_scheduler_config, 4, 1)[0]
    np.testing.assert_allclose(np.array(moved),
                               [[float(schedule(t)), float(head(t))] for t in range(4)],
                               rtol=1e-6)
    # By hand: min_lr + (lr - min_lr) * (1 + cos(pi * s / 4)) / 2 with lr 0.1, min_lr 0.005.
    np.testing.assert_allclose(np.array(moved)[:, 1], [0.1, 0.0860876, 0.0525, 0.0189124],
                               rtol=1e-5)


# --- frozen modules in the Trainer ---------------------------------------------------------------

class NormedBody(nn.Module):
    """Dense -> BatchNorm -> relu: has parameters and running statistics."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(8)(x)
        return nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.5)(x))


def normed_model():
    return MultitaskClassifier([
        Task(name, {"body": NormedBody(), f"head_{name}": nn.Dense(2)},
             [Operation("body", [("_input_", "data")]), Operation(f"head_{name}", ["body"])])
        for name in ("task1", "task2")])


def test_frozen_body_keeps_its_parameters_bit_for_bit(two_task_loaders):
    model = normed_model()
    model.init_from_loaders(two_task_loaders, 0)
    before = jax.tree.map(np.array, model.variables)
    trainer = Trainer(n_epochs=3, lr=0.02, seed=0, progress_bar=False,
                      module_optimizers={"body": "frozen"})
    trainer.fit(model, two_task_loaders)
    for a, b in zip(jax.tree.leaves(before["params"]["body"]),
                    jax.tree.leaves(model.params["body"]), strict=True):
        np.testing.assert_array_equal(np.asarray(b), a)
    for head in ("head_task1", "head_task2"):
        assert np.max(np.abs(model.params[head]["kernel"] - before["params"][head]["kernel"])) > 1e-3
    # Documented: only the parameters are frozen; running statistics update in training.
    stats = model.variables["batch_stats"]["body"]["BatchNorm_0"]["mean"]
    assert np.max(np.abs(stats - before["batch_stats"]["body"]["BatchNorm_0"]["mean"])) > 1e-3
    # Adam keeps moments (mu, nu) for the two heads only, plus update counts.
    head_size = sum(np.size(leaf) for head in ("head_task1", "head_task2")
                    for leaf in jax.tree.leaves(model.params[head]))
    leaves = jax.tree.leaves(trainer.state.opt_state)
    assert sum(np.size(leaf) for leaf in leaves if np.ndim(leaf)) == 2 * head_size
    assert all(np.size(leaf) == 1 for leaf in leaves if not np.ndim(leaf))
    # A step count per trained module (Adam's, as torch's per parameter) and the schedule's;
    # nothing for the frozen body.
    scalars = [jax.tree_util.keystr(path) for path, leaf in
               jax.tree_util.tree_leaves_with_path(trainer.state.opt_state) if not np.ndim(leaf)]
    assert len(scalars) == 3, scalars


def test_unknown_module_is_refused_at_fit(two_task_loaders):
    trainer = Trainer(n_epochs=1, seed=0, progress_bar=False,
                      module_optimizers={"head_task3": "frozen", "relu": {"lr": 0.1}})
    with pytest.raises(ValueError) as raised:
        trainer.fit(MultitaskClassifier([make_task("task1"), make_task("task2", ("A", "C"))]),
                    two_task_loaders)
    assert str(raised.value) == (
        "TrainerConfig.module_optimizers names ['head_task3', 'relu'], which are not modules "
        "with parameters of this model; its modules with parameters are ['linear1A', "
        "'linear2B', 'linear2C']")


# --- against a hand-built optax.partition ----------------------------------------------------

MODULE_OPTIMIZERS = {"linear2B": {**SGD, "lr": 0.05}, "linear2C": "frozen"}


def reference_optimizer():
    """``MODULE_OPTIMIZERS`` over the global Adam(0.02), built directly with optax."""
    groups = {"sgd": optax.sgd(0.05), "frozen": optax.set_to_zero(), "adam": optax.adam(0.02)}
    label = {"linear2B": "sgd", "linear2C": "frozen"}
    return optax.partition(groups, lambda params: {
        module: jax.tree.map(lambda _, m=module: label.get(m, "adam"), tree)
        for module, tree in params.items()})


def fit(loaders, **overrides):
    model = MultitaskClassifier([make_task("task1"), make_task("task2", ("A", "C"))])
    config = dict(n_epochs=2, lr=0.02, seed=0, progress_bar=False, grad_clip=None)
    config.update(overrides)
    trainer = Trainer(**config)
    trainer.fit(model, loaders)
    return model, trainer


def assert_head_c_frozen_and_head_b_trained(model, loaders):
    """``linear2C`` (frozen) is bit for bit its initial value; ``linear2B`` moved."""
    initial = MultitaskClassifier([make_task("task1"), make_task("task2", ("A", "C"))])
    initial.init_from_loaders(loaders, 0)
    np.testing.assert_array_equal(model.params["linear2C"]["kernel"],
                                  initial.params["linear2C"]["kernel"])
    assert np.max(np.abs(model.params["linear2B"]["kernel"]
                         - initial.params["linear2B"]["kernel"])) > 1e-3


def assert_trees_close(got, expected, rtol=1e-6, atol=1e-7):
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def per_step_reference(two_task_loaders):
    """The hand-built partition, one task per step: the reference of the per-step and the
    fused settings below and the run the renaming-view test inspects (tests only read it)."""
    return fit(two_task_loaders, optimizer=reference_optimizer())


@pytest.mark.parametrize("setting", [
    dict(),  # one task per step: the heads' family shares one program where it can
    dict(batch_scheduler="mixed", balancer="pcgrad"),
    dict(steps_per_call=2),
])
def test_matches_a_hand_built_partition(two_task_loaders, per_step_reference, setting):
    model, trainer = fit(two_task_loaders, module_optimizers=MODULE_OPTIMIZERS, **setting)
    if not setting:  # the heads are in different groups: no shared family program
        assert len(trainer.compiled_steps.families) == 0
    # The reference: optax.partition by hand, which the Trainer runs one program per task
    # set (a family program's view renames linear2C to linear2B, which a name-based label
    # misreads; see the next test).
    reference_setting = {k: v for k, v in setting.items() if k != "steps_per_call"}
    reference = (fit(two_task_loaders, optimizer=reference_optimizer(), **reference_setting)
                 if reference_setting else per_step_reference)[0]
    assert_trees_close(model.params, reference.params)
    assert_head_c_frozen_and_head_b_trained(model, two_task_loaders)


def test_a_users_name_based_partition_is_never_applied_through_a_renaming_view(
        two_task_loaders, per_step_reference):
    """A hand-built ``optax.partition`` labels modules by name; a shared family program
    would run task2's head under task1's name (both groups stateless for the heads, so the
    optimizer states agree in structure). The Trainer keeps such runs on the general step:
    the frozen head stays bit for bit, and no family program is compiled."""
    model, trainer = per_step_reference
    assert len(trainer.compiled_steps.families) == 0
    assert_head_c_frozen_and_head_b_trained(model, two_task_loaders)


def test_family_program_is_shared_when_the_members_share_a_group(two_task_loaders,
                                                               monkeypatch):
    """Both heads in the default group: task2's batches run task1's family program, on
    the member's view of the per-group state, as one program per task set would."""
    settings = dict(n_epochs=1, module_optimizers={"linear1A": {"lr": 0.05}})
    shared, trainer = fit(two_task_loaders, **settings)
    assert len(trainer.compiled_steps.families) == 1
    monkeypatch.setattr(PerStepRunner, "share_family_programs", False)
    reference, trainer = fit(two_task_loaders, **settings)
    assert len(trainer.compiled_steps.families) == 0
    assert_trees_close(shared.params, reference.params)


def test_checkpoint_and_exact_resume(two_task_loaders, tmp_path):
    common = dict(grad_clip=1.0, checkpointing=True,
                  module_optimizers={"linear2B": {"optimizer": "sgd", "lr": 0.05},
                                     "linear2C": optax.adamax(1e-2), "linear1A": {"lr": 0.01}},
                  log_manager_config={"counter_unit": "batches", "evaluation_freq": 10},
                  checkpointer_config={"checkpoint_dir": str(tmp_path / "ck"),
                                       "checkpoint_clear": False})
    full_model, full = fit(two_task_loaders, **common)
    model = MultitaskClassifier([make_task("task1"), make_task("task2", ("A", "C"))])
    resumed = Trainer(n_epochs=2, lr=0.02, seed=0, progress_bar=False, **common)
    resumed.fit(model, two_task_loaders, resume_from=str(tmp_path / "ck"))  # from step 30
    for a, b in zip(jax.tree.leaves(full.state.opt_state),
                    jax.tree.leaves(resumed.state.opt_state), strict=True):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    for a, b in zip(jax.tree.leaves(full_model.params), jax.tree.leaves(model.params),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    # Trainer.save / load: the settings round-trip (a GradientTransformation is not JSON:
    # the live config's one is kept), and the optimizer state is continued.
    full.save(str(tmp_path / "trainer"))
    loaded = Trainer(module_optimizers=common["module_optimizers"])
    loaded.load(str(tmp_path / "trainer"), full_model)
    assert loaded.config.module_optimizers == common["module_optimizers"]
    assert_trees_close(loaded.loaded_optimizer["opt_state"], full.state.opt_state, 0, 0)


PMAP_RUN = """
import os, sys
os.environ["XLA_FLAGS"] = os.environ.get("JAXMTL_TEST_FAST_COMPILE_FLAG", "") + " --xla_force_host_platform_device_count=2"
import jax, numpy as np
sys.path.insert(0, os.getcwd())
from conftest import linear_data, make_task
import jaxmtl
loaders = []
for task, seed in [("task1", 0), ("task2", 1)]:
    X, Y = linear_data(128, seed)
    loaders.append(jaxmtl.DictDataLoader(jaxmtl.DictDataset("d_" + task, "train", {"data": X},
                                                            {task: Y}), 32, shuffle=True, seed=seed))
params = []
for parallel in ("pmap", "sharded", "single"):
    model = jaxmtl.MultitaskClassifier([make_task("task1"), make_task("task2", ("A", "C"))])
    jaxmtl.Trainer(n_epochs=2, lr=0.02, seed=0, progress_bar=False, parallel=parallel,
                   module_optimizers={"linear2B": {"optimizer": "sgd", "lr": 0.05},
                                      "linear1A": "frozen"}).fit(model, loaders)
    params.append(jax.device_get(model.params))
assert len(jax.devices()) == 2
print(max(float(np.max(np.abs(a - b))) for run in params[:2] for a, b in
          zip(jax.tree.leaves(run), jax.tree.leaves(params[2]), strict=True)))
"""


@pytest.mark.slow  # a subprocess with 2 forced CPU devices (three fits: ~25 s)
def test_pmap_and_sharded_on_two_devices_match_one_device():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-c", PMAP_RUN], cwd=Path(__file__).parent,
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.strip().splitlines()[-1]) < 1e-5


def test_a_group_with_the_global_settings_trains_as_without_groups(two_task_loaders):
    """One task per step (shuffled): the heads take turns being unused, and an unused
    module's Adam moments must stay as they are (``update.keep_modules`` finds them by
    module name, also inside the per-group states)."""
    grouped, _ = fit(two_task_loaders, grad_clip=1.0, module_optimizers={"linear2B": {}})
    plain, _ = fit(two_task_loaders, grad_clip=1.0)
    assert_trees_close(grouped.params, plain.params)
