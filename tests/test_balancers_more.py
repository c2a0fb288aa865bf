"""nash_mtl, imtl, aligned_mtl, upgrad and db_mtl against hand (numpy/scipy) computations."""

from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from jax.flatten_util import ravel_pytree

from jaxmtl.training.balancers import (
    aligned_weights,
    balanced_grads,
    imtl_weights,
    make_balancer,
    nash_weights,
    upgrad_weights,
)

NEW_METHODS = ("nash_mtl", "imtl", "aligned_mtl", "upgrad", "db_mtl")
STATEFUL = ("imtl", "db_mtl")
KEY = jax.random.PRNGKey(0)


def build(name: str, num_tasks: int, **config):
    if name in STATEFUL:
        config.setdefault("num_tasks", num_tasks)
    return make_balancer(name, **config)


@functools.cache
def jitted(name: str, num_tasks: int, **config):
    balancer = build(name, num_tasks, **config)
    return balancer, jax.jit(balancer.update)


def two_part_grads(shared: np.ndarray, head: np.ndarray) -> dict:
    """Per-task gradients with a shared "encoder" leaf [T, D] and a "head" leaf [T, 2]."""
    return {"encoder": jnp.asarray(shared, jnp.float32), "head": jnp.asarray(head, jnp.float32)}


def run(name, losses, grads, state=None, mask=None, **config):
    config.setdefault("shared", ("encoder",))  # the "head" leaf is task-specific
    losses = jnp.asarray(losses, jnp.float32)
    balancer, update = jitted(name, losses.shape[0], **config)
    if state is None:
        state = balancer.init(jax.tree.map(lambda g: g[0], grads))
    return update(losses, grads, state, None, KEY, mask)


def random_grads(num_tasks: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(num_tasks, dim)) * rng.uniform(0.2, 5.0, size=(num_tasks, 1))


HEAD = np.arange(6.0).reshape(3, 2) - 2.0


# ----------------------------------------------------------------------------- nash_mtl


def test_nash_orthogonal_gradients_get_inverse_norms():
    g = np.diag([2.0, 0.5, 4.0])  # orthogonal: alpha_t = 1 / ||g_t||
    weights = nash_weights(jnp.asarray(g @ g.T, jnp.float32))
    np.testing.assert_allclose(weights, [0.5, 2.0, 0.25], rtol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_nash_matches_scipy_root_of_bargaining_equation(seed):
    g = random_grads(3, 6, seed)
    gram = g @ g.T
    reference = scipy.optimize.fsolve(lambda a: gram @ a - 1.0 / a,
                                      1.0 / np.sqrt(np.diag(gram)), xtol=1e-12)
    np.testing.assert_allclose(gram @ reference * reference, 1.0, atol=1e-9)
    combined, weights, _ = run("nash_mtl", [1.0, 2.0, 3.0], two_part_grads(g, HEAD))
    # eps=1e-6 ridge on the unit-diagonal matrix: relative bias ~1e-6 (float32 solve).
    np.testing.assert_allclose(weights, reference, rtol=2e-5)
    # The reference code back-propagates sum_t alpha_t L_t: heads weighted too.
    np.testing.assert_allclose(combined["encoder"], reference @ g, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(combined["head"], reference @ HEAD, rtol=1e-4, atol=1e-5)


def test_nash_dependent_gradients_stay_finite():
    g = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])  # opposite, and a zero gradient
    weights = nash_weights(jnp.asarray(g @ g.T, jnp.float32))
    assert weights[2] == 0.0
    assert np.all(np.isfinite(weights)) and weights[0] > 100 and weights[1] > 100


# ----------------------------------------------------------------------------- imtl


def numpy_imtl_g(g: np.ndarray) -> np.ndarray:
    """The paper's closed form: alpha_{2:T} = g_1 U^T (D U^T)^-1, alpha_1 = 1 - sum."""
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    D = g[:1] - g[1:]
    U = u[:1] - u[1:]
    rest = g[0] @ U.T @ np.linalg.inv(D @ U.T)
    return np.concatenate([[1.0 - rest.sum()], rest])


@pytest.mark.parametrize("num_tasks", [2, 3, 4])
def test_imtl_g_matches_paper_closed_form(num_tasks):
    g = random_grads(num_tasks, 7, num_tasks)
    alpha = numpy_imtl_g(g)
    np.testing.assert_allclose(imtl_weights(jnp.asarray(g @ g.T, jnp.float32)), alpha,
                               rtol=1e-4, atol=1e-6)
    combined = alpha @ g  # equal projections on every unit gradient
    projections = (g / np.linalg.norm(g, axis=1, keepdims=True)) @ combined
    np.testing.assert_allclose(projections, projections[0], rtol=1e-9)


def test_imtl_identical_gradients_share_weight():
    g = np.array([[1.0, 2.0], [1.0, 2.0]])
    np.testing.assert_allclose(imtl_weights(jnp.asarray(g @ g.T)), [0.5, 0.5], rtol=1e-5)


def test_imtl_loss_scales_and_hybrid_update_by_hand():
    g = random_grads(3, 5, 7)
    losses = np.array([0.5, 2.0, 1.2])
    lr = 0.1
    grads = two_part_grads(g, HEAD)
    combined, weights, state = run("imtl", losses, grads, optimizer="sgd", learning_rate=lr)
    alpha = numpy_imtl_g(g)  # s = 0: scale factors 1
    np.testing.assert_allclose(weights, alpha, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(combined["encoder"], alpha @ g, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(combined["head"], HEAD.sum(0), rtol=1e-6)
    # IMTL-L: d/ds (exp(s) L - s) = exp(s) L - 1 at s = 0.
    s = -lr * (losses - 1.0)
    np.testing.assert_allclose(state.loss_scales, s, rtol=1e-6)

    combined, weights, state = run("imtl", losses, grads, state=state, optimizer="sgd",
                                   learning_rate=lr)
    factor = np.exp(s)
    alpha = numpy_imtl_g(factor[:, None] * g)  # IMTL-G on the scaled gradients
    np.testing.assert_allclose(weights, alpha * factor, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(combined["encoder"], (alpha * factor) @ g, rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(combined["head"], factor @ HEAD, rtol=1e-5)
    np.testing.assert_allclose(state.loss_scales, s - lr * (factor * losses - 1.0),
                               rtol=1e-5)


# ----------------------------------------------------------------------------- aligned_mtl


def numpy_aligned(g: np.ndarray) -> np.ndarray:
    """B = sqrt(l_min) V diag(l^-1/2) V^T over the eigenpairs of G G^T; weights B 1."""
    eigenvalues, vectors = np.linalg.eigh(g @ g.T)
    keep = eigenvalues > eigenvalues.max() * len(g) * np.finfo(np.float32).eps
    eigenvalues, vectors = eigenvalues[keep], vectors[:, keep]
    B = np.sqrt(eigenvalues.min()) * (vectors / np.sqrt(eigenvalues)) @ vectors.T
    return B.sum(0)


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_aligned_mtl_matches_eigendecomposition(num_tasks):
    g = random_grads(num_tasks, 8, 10 + num_tasks)
    expected = numpy_aligned(g)
    combined, weights, _ = run("aligned_mtl", np.ones(num_tasks),
                               two_part_grads(g, np.ones((num_tasks, 2))))
    np.testing.assert_allclose(weights, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(combined["encoder"], expected @ g, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(combined["head"], [num_tasks, num_tasks], rtol=1e-6)
    # The aligned gradients B G have every singular value equal to the smallest of G.
    eigenvalues, vectors = np.linalg.eigh(g @ g.T)
    B = np.sqrt(eigenvalues.min()) * (vectors / np.sqrt(eigenvalues)) @ vectors.T
    np.testing.assert_allclose(np.linalg.svd(B @ g, compute_uv=False),
                               np.sqrt(eigenvalues.min()), rtol=1e-6)


def test_aligned_mtl_rank_deficient_keeps_the_span():
    g = np.array([[1.0, 0.0], [2.0, 0.0]])  # rank 1: one eigenvalue kept
    np.testing.assert_allclose(aligned_weights(jnp.asarray(g @ g.T)), numpy_aligned(g),
                               rtol=1e-5)


# ----------------------------------------------------------------------------- upgrad


def exact_box_qp(G: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """argmin_{v >= lower} v^T G v by enumerating the active sets (KKT check)."""
    num = len(lower)
    for size in range(num + 1):
        for held in itertools.combinations(range(num), size):
            free = [k for k in range(num) if k not in held]
            v = lower.copy()
            if free and held:
                v[free] = -np.linalg.solve(G[np.ix_(free, free)],
                                           G[np.ix_(free, list(held))] @ lower[list(held)])
            elif free:
                v[free] = 0.0
            multipliers = G @ v
            if (np.all(v >= lower - 1e-12) and np.all(multipliers[list(held)] >= -1e-12)
                    and np.allclose(multipliers[free], 0.0, atol=1e-9)):
                return v
    raise AssertionError("no KKT point")


def numpy_upgrad(g: np.ndarray, reg_eps: float = 1e-4) -> np.ndarray:
    num = len(g)
    G = g @ g.T
    G = G / np.trace(G) + reg_eps * np.eye(num)
    return sum(exact_box_qp(G, np.eye(num)[i] / num) for i in range(num))


@pytest.mark.parametrize("seed, nearly_opposite", [(0, False), (1, False), (2, True)])
def test_upgrad_matches_exact_qp(seed, nearly_opposite):
    g = random_grads(4, 6, seed)
    if nearly_opposite:  # condition number ~1e4: first-order solvers would not converge
        g[1] = -0.99 * g[0] + 0.01 * np.random.default_rng(seed).normal(size=6)
    expected = numpy_upgrad(g)
    combined, weights, _ = run("upgrad", np.ones(4), two_part_grads(g, np.ones((4, 2))))
    np.testing.assert_allclose(weights, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(combined["encoder"], expected @ g, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(combined["head"], [4.0, 4.0], rtol=1e-6)


def test_upgrad_removes_conflict():
    g = np.array([[1.0, 0.0], [-2.0, 0.5]])
    assert (g @ g.sum(0))[0] < 0  # the plain sum conflicts with task 0
    weights = np.asarray(upgrad_weights(jnp.asarray(g @ g.T, jnp.float32)))
    update = weights @ g
    # Non-negative up to the reg_eps ridge: measured -2.5e-5 here (|update| 0.26).
    assert np.all(g @ update > -1e-4), g @ update
    np.testing.assert_allclose(weights, numpy_upgrad(g), rtol=1e-5)


# ----------------------------------------------------------------------------- db_mtl


def test_db_mtl_ema_and_norm_scaling_by_hand_with_an_absent_task():
    beta, sigma = 0.9, 0.5
    rng = np.random.default_rng(3)
    steps = [(rng.normal(size=(3, 4)), rng.normal(size=(3, 2)), np.array([0.5, 2.0, 1.5]),
              np.array([True, True, True])),
             (rng.normal(size=(3, 4)), rng.normal(size=(3, 2)), np.array([0.4, np.nan, 1.2]),
              np.array([True, False, True])),
             (rng.normal(size=(3, 4)), rng.normal(size=(3, 2)), np.array([0.3, 1.8, 1.0]),
              np.array([True, True, True]))]
    buffer, counts, state = np.zeros((3, 4)), np.zeros(3), None
    for shared, head, losses, mask in steps:
        shared = np.where(mask[:, None], shared, np.nan)  # an absent task's garbage
        grads = two_part_grads(shared, head)
        combined, weights, state = run("db_mtl", losses, grads, state=state,
                                       mask=jnp.asarray(mask), beta=beta, beta_sigma=sigma)
        counts = counts + mask
        log_grads = shared / (np.where(mask, losses, 1.0) + 1e-8)[:, None]
        decay = beta / np.maximum(counts, 1) ** sigma
        buffer = np.where(mask[:, None], log_grads + decay[:, None] * (buffer - log_grads),
                          buffer)
        norms = np.linalg.norm(buffer, axis=1)
        scale = np.where(mask, norms[mask].max() / (norms + 1e-8), 0.0)
        inverse_loss = np.where(mask, 1.0 / (np.where(mask, losses, 1.0) + 1e-8), 0.0)
        np.testing.assert_allclose(weights, scale * inverse_loss, rtol=1e-5)
        np.testing.assert_allclose(combined["encoder"], scale @ buffer, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(combined["head"],
                                   inverse_loss @ np.where(mask[:, None], head, 0.0),
                                   rtol=1e-5, atol=1e-6)
        (encoder_buffer,) = state.grad_buffer  # the shared leaf only
        np.testing.assert_allclose(encoder_buffer, buffer, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(state.steps, counts)


def test_db_mtl_matches_the_paper_by_autodiff_of_log_losses_on_a_two_leaf_encoder():
    """Lin et al. 2023 as the authors' LibMTL code, written independently of jaxmtl's.

    The per-task gradients come from ``jax.grad`` of ``log(L_t + 1e-8)`` (not ``g / L``);
    the EMA, its norm and the maximum-norm scaling act on the shared parameters as one
    flat vector (kernel and bias together, so a per-leaf norm would fail), the EMA step
    size is ``beta / k^sigma`` with k counted from 1, and each head gets the plain
    gradient of its own log loss.
    """
    beta, sigma = 0.8, 0.5
    rng = np.random.default_rng(7)
    params = {"encoder": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                          "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
              "head_a": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
              "head_b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}

    def losses(p, x, y):
        hidden = jnp.tanh(x @ p["encoder"]["kernel"] + p["encoder"]["bias"])
        # Different loss scales (x1 and x50), as DB-MTL's loss-scale balancing assumes.
        return jnp.stack([jnp.mean((hidden @ p["head_a"] - y[:, 0]) ** 2),
                          50.0 * jnp.mean((hidden @ p["head_b"] - y[:, 1]) ** 2)])

    balancer = make_balancer("db_mtl", num_tasks=2, beta=beta, beta_sigma=sigma,
                             shared=("encoder",))
    state = balancer.init(params)
    ema = np.zeros((2, 3 * 4 + 4))
    for k in range(1, 4):
        x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
        y = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
        task_losses = losses(params, x, y)
        combined, _, state = balancer.update(task_losses, jax.jacrev(losses)(params, x, y),
                                             state, params)
        log_grads = [jax.grad(lambda p, x, y, t=t: jnp.log(losses(p, x, y)[t] + 1e-8))(
            params, x, y) for t in range(2)]
        flat = np.stack([np.asarray(ravel_pytree(g["encoder"])[0])
                         for g in log_grads])
        step = beta / k ** sigma
        ema = step * ema + (1 - step) * flat
        norms = np.linalg.norm(ema, axis=1)
        expected_shared = (norms.max() / (norms + 1e-8)) @ ema
        np.testing.assert_allclose(ravel_pytree(combined["encoder"])[0],
                                   expected_shared, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(combined["head_a"], log_grads[0]["head_a"], rtol=2e-5,
                                   atol=1e-7)
        np.testing.assert_allclose(combined["head_b"], log_grads[1]["head_b"], rtol=2e-5,
                                   atol=1e-7)
    # The log removed the x50 loss scale, and the maximum-norm scaling still had work to
    # do (one task's EMA scaled by ~1.16, far outside the tolerances above).
    assert 1.1 < norms.max() / norms.min() < 2.0, norms


def test_db_mtl_config_errors():
    with pytest.raises(ValueError, match=r"beta=1.0, expected a number in \[0, 1\)"):
        make_balancer("db_mtl", num_tasks=2, beta=1.0)
    with pytest.raises(ValueError, match="init\\(params=None\\)"):
        make_balancer("db_mtl", num_tasks=2).init(None)


# ----------------------------------------------------------------------------- all five


def toy_losses(params, x):
    """[3] losses of a shared tanh encoder with one linear head per task."""
    hidden = jnp.tanh(x @ params["encoder"]["kernel"])
    return jnp.mean((hidden @ params["heads"] - jnp.array([0.0, 1.0, -1.0])) ** 2, axis=0)


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    params = {"encoder": {"kernel": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)},
              "heads": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}
    return params, jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)


@pytest.mark.parametrize("name", NEW_METHODS)
def test_four_device_axis_gives_the_one_device_weights(toy, name):
    """Under a device axis the per-task gradients are summed before the solver."""
    params, x = toy
    balancer = build(name, 3, shared=["encoder"])
    state = balancer.init(params)

    def share(p, x_part):  # this device's share of the mean over all 16 rows
        return toy_losses(p, x_part) / 4

    split = jax.jit(jax.vmap(lambda xs: balanced_grads(balancer, share, params, state,
                                                       loss_args=(xs,), axis_name="devices"),
                             axis_name="devices"))(x.reshape(4, 4, 4))
    whole = jax.jit(lambda x: balanced_grads(balancer, toy_losses, params, state,
                                             loss_args=(x,)))(x)
    assert np.all(np.isfinite(whole.weights))
    for device in range(4):
        np.testing.assert_allclose(split.weights[device], whole.weights, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(split.grads), jax.tree.leaves(whole.grads), strict=True):
        np.testing.assert_allclose(a[0], b, rtol=1e-4, atol=1e-6)


def test_representation_gradient_mode_where_the_paper_has_it():
    for name in ("imtl", "aligned_mtl"):
        assert build(name, 2, upper_bound=True).representation_grads
        with pytest.raises(ValueError, match=f"Balancer '{name}': upper_bound=True solves on "
                                             "the representation gradients, so shared must "
                                             "be None, got \\['body'\\]"):
            build(name, 2, upper_bound=True, shared=["body"])
    for name in ("nash_mtl", "upgrad", "db_mtl"):
        with pytest.raises(ValueError, match=r"unknown config key\(s\) \['upper_bound'\]"):
            build(name, 2, upper_bound=True)


@pytest.mark.parametrize("name, solver", [("imtl", imtl_weights),
                                          ("aligned_mtl", aligned_weights)])
def test_upper_bound_weights_come_from_representation_gradients(name, solver):
    import flax.linen as nn

    from jaxmtl import (
        Operation,
        Task,
        TrainerConfig,
        TrainState,
        build_graph,
        init_variables,
        make_optimizer,
        task_loss_terms,
    )
    from jaxmtl.model import apply_ops
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
    balancer = build(name, 2, upper_bound=True)
    state = TrainState.create(variables, make_optimizer(TrainerConfig(lr=0.1), 0.1),
                              jax.random.PRNGKey(0), balancer=balancer)
    # Jitted, as the Trainer runs it: one compile instead of an eager op-by-op step.
    _, metrics = jax.jit(lambda s, b: train_step_on(graph, s, b))(state, ((X, Y, mask),))

    Z = apply_ops(graph, variables, X, ["a", "b"], until="body")[0]["body"]

    def head_loss(z, task):
        terms, _ = task_loss_terms(graph, variables, X, {task: Y[task]}, mask,
                                   overrides={"body": z})
        return terms[task][0] / terms[task][1]

    grads = jnp.stack([jax.jit(jax.grad(head_loss), static_argnums=1)(Z, t).ravel()
                       for t in ("a", "b")])
    expected = solver(grads @ grads.T)
    np.testing.assert_allclose(metrics["weights"], expected, rtol=1e-4, atol=1e-6)
    assert float(jnp.min(jnp.abs(expected))) > 1e-3


PMAP_RUN = """
import os, sys
os.environ["XLA_FLAGS"] = os.environ.get("JAXMTL_TEST_FAST_COMPILE_FLAG", "") + " --xla_force_host_platform_device_count=4"
import jax, numpy as np, jaxmtl
from conftest import linear_data, make_task
out = {}
for name in sys.argv[1:]:
    params = {}
    for parallel in ("pmap", "single"):
        loaders = []
        for task, seed in [("task1", 0), ("task2", 1)]:
            X, Y = linear_data(64, seed)
            ds = jaxmtl.DictDataset("d_" + task, "train", {"data": X}, {task: Y})
            loaders.append(jaxmtl.DictDataLoader(ds, batch_size=32, shuffle=True, seed=seed))
        model = jaxmtl.MultitaskClassifier([make_task("task1"), make_task("task2", ("A", "C"))])
        trainer = jaxmtl.Trainer(n_epochs=2, lr=0.05, seed=0, progress_bar=False,
                                 parallel=parallel, batch_scheduler="mixed", balancer=name)
        trainer.fit(model, loaders)
        assert trainer.parallel.n_devices == (4 if parallel == "pmap" else 1)
        params[parallel] = jax.tree.leaves(jax.tree.map(np.asarray, model.params))
    out[name] = max(float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
                    for a, b in zip(params["pmap"], params["single"]))
print(out)
"""


@pytest.mark.slow
def test_new_balancers_on_four_pmap_devices_match_one_device():
    """Trainer, 4 forced CPU devices (pmap) vs 1: 4 steps of every new method."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-c", PMAP_RUN, *NEW_METHODS],
                            cwd=Path(__file__).parent, capture_output=True, text=True,
                            timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    differences = eval(result.stdout.strip().splitlines()[-1])
    assert set(differences) == set(NEW_METHODS)
    for name, difference in differences.items():
        assert difference < 1e-5, (name, difference)


@pytest.mark.parametrize("name", ["db_mtl", pytest.param("imtl", marks=pytest.mark.slow)])
def test_state_is_checkpointed_and_resumed(two_task_loaders, tmp_path, name):
    """db_mtl's gradient buffer and imtl's loss scales (and Adam state) resume exactly."""
    from conftest import make_task

    from jaxmtl import MultitaskClassifier, Trainer

    common = dict(n_epochs=2, lr=0.02, seed=0, progress_bar=False, batch_scheduler="mixed",
                  balancer=name, checkpointing=True,
                  log_manager_config={"counter_unit": "batches", "evaluation_freq": 10},
                  checkpointer_config={"checkpoint_dir": str(tmp_path),
                                       "checkpoint_clear": False})

    def model():
        return MultitaskClassifier([make_task("task1"), make_task("task2", ("A", "C"))])

    full = Trainer(**common)
    full.fit(model(), two_task_loaders)
    resumed = Trainer(**common)
    resumed.fit(model(), two_task_loaders, resume_from=str(tmp_path))  # from step 30 of 38
    leaves = jax.tree.leaves(full.state.balancer_state)
    assert any(np.size(leaf) and np.any(np.asarray(leaf) != 0) for leaf in leaves)
    for a, b in zip(jax.tree.leaves(resumed.state.balancer_state), leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.shape(a) == np.shape(b)
