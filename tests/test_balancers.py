"""Tests for jaxmtl.training.balancers: each method against a hand / numpy computation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmtl.training.balancers import (
    BALANCER_NAMES,
    balanced_grads,
    make_balancer,
    merge_shared,
    min_norm_weights,
    pcgrad_coefficients,
    per_task_grads,
    project_to_simplex,
    shared_mask,
    split_shared,
)

STATEFUL = ("uncertainty", "dwa", "gradnorm", "famo", "imtl", "db_mtl")
KEY = jax.random.PRNGKey(0)


def build(name: str, num_tasks: int, **config):
    if name in STATEFUL:
        config.setdefault("num_tasks", num_tasks)
    return make_balancer(name, **config)


@functools.cache
def jitted_update(name: str, num_tasks: int, **config):
    """One compiled update per (method, T, config), shared by the tests."""
    balancer = build(name, num_tasks, **config)
    return balancer, jax.jit(balancer.update)


def run(name, losses, grads=None, state=None, rng=KEY, mask=None, **config):
    losses = jnp.asarray(losses, jnp.float32)
    balancer, update = jitted_update(name, losses.shape[0], **config)
    if state is None:
        # One task's slice of the gradients stands in for the parameters (db_mtl's
        # buffer takes their shapes).
        state = balancer.init(None if grads is None else jax.tree.map(lambda g: g[0], grads))
    if not balancer.needs_task_grads:
        grads = None
    return update(losses, grads, state, None, rng, mask)


# ----------------------------------------------------------------------------- registry


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: equal, uncertainty, dwa, rlw, gradnorm"):
        make_balancer("nash")


def test_bad_config_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['temp'\]"):
        make_balancer("dwa", num_tasks=2, temp=2.0)
    with pytest.raises(ValueError, match=r"missing required config key\(s\) \['num_tasks'\]"):
        make_balancer("famo")
    with pytest.raises(ValueError, match="temperature=-1.0"):
        make_balancer("dwa", num_tasks=2, temperature=-1.0)
    with pytest.raises(ValueError, match=r"normalization='l1', expected one of"):
        make_balancer("mgda", normalization="l1")


def test_default_is_equal_and_names_complete():
    assert BALANCER_NAMES == ("equal", "uncertainty", "dwa", "rlw", "gradnorm", "pcgrad",
                              "cagrad", "mgda", "famo", "nash_mtl", "imtl", "aligned_mtl",
                              "upgrad", "db_mtl")
    assert not make_balancer().needs_task_grads
    for name in BALANCER_NAMES:
        expected = name in ("gradnorm", "pcgrad", "cagrad", "mgda", "nash_mtl", "imtl",
                            "aligned_mtl", "upgrad", "db_mtl")
        assert build(name, 2).needs_task_grads == expected, name


def test_gradient_method_without_grads_errors():
    balancer = make_balancer("pcgrad")
    with pytest.raises(ValueError, match="task_grads=None"):
        balancer.update(jnp.ones(2), None, balancer.init(None), None, KEY)


# ----------------------------------------------------------------------------- equal


def test_equal_is_plain_sum_bit_for_bit():
    rng = np.random.default_rng(0)
    losses = jnp.asarray(rng.uniform(0.1, 3.0, 5), jnp.float32)
    grads = {"w": jnp.asarray(rng.normal(size=(5, 7, 3)), jnp.float32),
             "b": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}
    balancer = make_balancer("equal")
    combined, weights, _ = jax.jit(balancer.update)(losses, grads, balancer.init(None), None,
                                                    None)
    np.testing.assert_array_equal(weights, np.ones(5, np.float32))
    assert jnp.sum(weights * losses) == jnp.sum(losses)
    for key in grads:
        np.testing.assert_array_equal(combined[key], jnp.sum(grads[key], axis=0))


# ----------------------------------------------------------------------------- PCGrad


@pytest.mark.parametrize("order", [[0, 1], [1, 0]])
def test_pcgrad_two_conflicting_gradients(order):
    g = np.array([[1.0, 0.0], [-1.0, 1.0]], np.float32)
    orders = jnp.array([order, order])
    coef = pcgrad_coefficients(jnp.asarray(g @ g.T), orders)
    # g1.g2 = -1: g1 - (-1/|g2|^2) g2 = (0.5, 0.5); g2 - (-1/|g1|^2) g1 = (0, 1).
    np.testing.assert_allclose(np.asarray(coef) @ g, [[0.5, 0.5], [0.0, 1.0]], atol=1e-6)
    combined, weights, _ = run("pcgrad", [1.0, 1.0], {"p": jnp.asarray(g)})
    np.testing.assert_allclose(combined["p"], [0.5, 1.5], atol=1e-6)
    np.testing.assert_allclose(weights, [2.0, 1.5], atol=1e-6)


def test_pcgrad_order_matters_for_three_tasks():
    g = np.array([[1, 0, 0], [-1, 1, 0], [-1, 0, 1]], np.float32)
    gram = jnp.asarray(g @ g.T)
    rest = [[1, 0, 2], [2, 0, 1]]
    # g1 against g2 then g3: g1 + g2/2 = (.5,.5,0); its dot with g3 is -.5 -> + g3/4.
    coef = pcgrad_coefficients(gram, jnp.array([[0, 1, 2]] + rest))
    np.testing.assert_allclose(coef[0], [1.0, 0.5, 0.25], atol=1e-6)
    np.testing.assert_allclose(np.asarray(coef[0]) @ g, [0.25, 0.5, 0.25], atol=1e-6)
    # g3 then g2: g1 + g3/2 = (.5,0,.5); its dot with g2 is -.5 -> + g2/4.
    coef = pcgrad_coefficients(gram, jnp.array([[0, 2, 1]] + rest))
    np.testing.assert_allclose(np.asarray(coef[0]) @ g, [0.25, 0.25, 0.5], atol=1e-6)


def numpy_pcgrad(g: np.ndarray, orders: np.ndarray) -> np.ndarray:
    projected = []
    for i in range(len(g)):
        gi = g[i].astype(np.float64).copy()
        for j in orders[i]:
            if j != i and gi @ g[j] < 0:
                gi -= (gi @ g[j]) / (g[j] @ g[j]) * g[j]
        projected.append(gi)
    return np.sum(projected, axis=0)


def test_pcgrad_random_orders_from_rng():
    g = np.random.default_rng(3).normal(size=(4, 6)).astype(np.float32)
    rng = jax.random.PRNGKey(7)
    orders = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, 4))(
        jax.random.split(rng, 4)))
    combined, _, _ = run("pcgrad", np.ones(4), {"p": jnp.asarray(g)}, rng=rng)
    np.testing.assert_allclose(combined["p"], numpy_pcgrad(g, orders), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- MGDA


@pytest.mark.parametrize("g, alpha", [
    ([[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5]),
    ([[2.0, 0.0], [0.0, 1.0]], [0.2, 0.8]),
    ([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [0.5, 0.5, 0.0]),  # g3 inside the hull's cone
])
def test_mgda_known_min_norm_points(g, alpha):
    g = np.asarray(g, np.float32)
    combined, weights, _ = run("mgda", np.ones(len(g)), {"p": jnp.asarray(g)})
    np.testing.assert_allclose(weights, alpha, atol=1e-5)
    np.testing.assert_allclose(combined["p"], np.asarray(alpha) @ g, atol=1e-5)


def test_mgda_matches_grid_search_and_normalization():
    g = np.random.default_rng(1).normal(size=(3, 4))
    gram = g @ g.T
    steps = np.linspace(0, 1, 401)
    a, b = np.meshgrid(steps, steps)
    keep = a + b <= 1
    grid = np.stack([a[keep], b[keep], 1 - a[keep] - b[keep]], 1)
    best = grid[np.argmin(np.einsum("ni,ij,nj->n", grid, gram, grid))]
    alpha = min_norm_weights(jnp.asarray(gram, jnp.float32))
    np.testing.assert_allclose(alpha, best, atol=5e-3)
    # "l2": solve on unit gradients, then weight the raw ones: (2,0),(0,1) -> (.5, .5).
    _, weights, _ = run("mgda", [1.0, 1.0], {"p": jnp.array([[2.0, 0.0], [0.0, 1.0]])},
                        normalization="l2")
    np.testing.assert_allclose(weights, [0.5, 0.5], atol=1e-5)


def test_project_to_simplex():
    np.testing.assert_allclose(project_to_simplex(jnp.array([0.5, 0.2, 0.9])),
                               [0.3, 0.0, 0.7], atol=1e-6)
    np.testing.assert_allclose(
        project_to_simplex(jnp.array([0.3, 5.0, -1.0]), jnp.array([True, False, True])),
        [1.0, 0.0, 0.0], atol=1e-6)


# ----------------------------------------------------------------------------- CAGrad


def numpy_cagrad(g: np.ndarray, c: float) -> np.ndarray:
    """Reference: the dual by brute force on a fine grid of the 2-task simplex."""
    gram = g @ g.T
    b = np.full(2, 0.5)
    mean_norm = np.sqrt(b @ gram @ b)
    w1 = np.linspace(0, 1, 200_001)
    grid = np.stack([w1, 1 - w1], 1)
    objective = grid @ gram @ b + c * mean_norm * np.sqrt(
        np.einsum("ni,ij,nj->n", grid, gram, grid))
    w = grid[np.argmin(objective)]
    gw = w @ g
    d = b @ g + c * mean_norm / (np.linalg.norm(gw) + 1e-8) * gw
    return d / (1 + c ** 2)


@pytest.mark.parametrize("seed", range(4))
def test_cagrad_matches_grid_reference(seed):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(2, 5)) * rng.uniform(0.1, 10)
    if seed % 2:  # strongly conflicting pair
        g[1] = -1.3 * g[0] + 0.1 * rng.normal(size=5)
    combined, _, _ = run("cagrad", [1.0, 1.0], {"p": jnp.asarray(g, jnp.float32)})
    expected = numpy_cagrad(g, 0.5)
    np.testing.assert_allclose(combined["p"], expected, rtol=2e-3,
                               atol=2e-3 * np.linalg.norm(expected))


def test_cagrad_c_zero_is_mean():
    g = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
    combined, _, _ = run("cagrad", [1.0, 1.0], {"p": g}, c=0.0)
    np.testing.assert_allclose(combined["p"], [0.0, 0.5], atol=1e-6)


# ----------------------------------------------------------------------------- uncertainty


@pytest.mark.parametrize("variant, a, b", [("standard", 1.0, 1.0),
                                           ("classification", 1.0, 0.5),
                                           ("regression", 0.5, 0.5)])
def test_uncertainty_loss_weights_and_step(variant, a, b):
    losses = np.array([0.7, 2.0, 0.1], np.float32)
    log_vars = np.array([0.3, -0.5, 1.2], np.float32)
    balancer = make_balancer("uncertainty", num_tasks=3, variant=variant, learning_rate=0.01)
    expected = np.sum(a * np.exp(-log_vars) * losses + b * log_vars)
    np.testing.assert_allclose(balancer.weighted_loss(jnp.asarray(losses),
                                                      jnp.asarray(log_vars)), expected,
                               rtol=1e-6)
    state = balancer.init(None)._replace(log_vars=jnp.asarray(log_vars))
    _, weights, new_state = jax.jit(balancer.update)(losses, None, state, None, None)
    np.testing.assert_allclose(weights, a * np.exp(-log_vars), rtol=1e-6)
    # Adam's first step is -lr * g / (|g| + eps), g = d/ds = -a exp(-s) L + b.
    grad = -a * np.exp(-log_vars) * losses + b
    np.testing.assert_allclose(new_state.log_vars, log_vars - 0.01 * np.sign(grad), atol=1e-5)


def test_uncertainty_external_training_leaves_log_vars():
    balancer = make_balancer("uncertainty", num_tasks=2, learning_rate=None)
    state = balancer.init(None)
    _, _, new_state = balancer.update(jnp.array([1.0, 2.0]), None, state, None, None)
    np.testing.assert_array_equal(new_state.log_vars, state.log_vars)
    grad = jax.grad(balancer.weighted_loss, argnums=1)(jnp.array([1.0, 2.0]), state.log_vars)
    np.testing.assert_allclose(grad, [0.0, -1.0], atol=1e-6)


# ----------------------------------------------------------------------------- DWA


def dwa_formula(newest, older, temperature=2.0):
    ratio = np.asarray(newest) / np.asarray(older)
    e = np.exp(ratio / temperature)
    return len(ratio) * e / e.sum()


def test_dwa_weights_from_loss_history():
    history = [[2.0, 1.0, 4.0], [1.0, 0.9, 1.0], [0.5, 0.5, 0.5]]
    state = None
    weights_seen = []
    for losses in history:
        _, weights, state = run("dwa", losses, state=state)
        weights_seen.append(np.asarray(weights))
    np.testing.assert_array_equal(weights_seen[0], np.ones(3))
    np.testing.assert_array_equal(weights_seen[1], np.ones(3))
    np.testing.assert_allclose(weights_seen[2], dwa_formula(history[1], history[0]),
                               rtol=1e-6)
    _, weights, _ = run("dwa", [1.0, 1.0, 1.0], state=state)
    np.testing.assert_allclose(weights, dwa_formula(history[2], history[1]), rtol=1e-6)


def test_dwa_period_averages_windows():
    losses = [[2.0, 1.0], [4.0, 3.0], [1.0, 1.0], [2.0, 3.0]]
    state = None
    for step_losses in losses:
        _, _, state = run("dwa", step_losses, state=state, period=2)
    _, weights, _ = run("dwa", [1.0, 1.0], state=state, period=2)
    np.testing.assert_allclose(weights, dwa_formula([1.5, 2.0], [3.0, 2.0]), rtol=1e-6)


# ----------------------------------------------------------------------------- RLW


def test_rlw_softmax_of_normal_draws_deterministic_per_rng():
    rng = jax.random.PRNGKey(42)
    _, weights, _ = run("rlw", np.ones(4), rng=rng)
    _, again, _ = run("rlw", np.ones(4), rng=rng)
    _, other, _ = run("rlw", np.ones(4), rng=jax.random.PRNGKey(43))
    draws = np.asarray(jax.random.normal(rng, (4,)), np.float64)
    np.testing.assert_allclose(weights, np.exp(draws) / np.exp(draws).sum(), rtol=1e-5)
    np.testing.assert_allclose(np.sum(weights), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(weights, again)
    assert not np.allclose(weights, other)
    mask = jnp.array([True, False, True, True])
    _, masked, _ = run("rlw", np.ones(4), rng=rng, mask=mask)
    keep = np.asarray(mask)
    np.testing.assert_allclose(masked[keep], np.exp(draws[keep]) / np.exp(draws[keep]).sum(),
                               rtol=1e-5)
    assert masked[1] == 0.0


# ----------------------------------------------------------------------------- FAMO


def test_famo_one_logit_step_matches_paper_formula():
    beta, gamma = 0.025, 0.01
    first, second = np.array([1.0, 2.0, 0.5]), np.array([0.5, 1.9, 0.45])
    _, weights, state = run("famo", first, optimizer="sgd")
    np.testing.assert_allclose(weights, (1 / first) / np.sum(1 / first), rtol=1e-6)
    _, weights, state = run("famo", second, state=state, optimizer="sgd")
    # xi_1 = xi_0 - beta (J_z^T delta + gamma xi_0), xi_0 = 0 so z = 1/3.
    delta = np.log(first + 1e-8) - np.log(second + 1e-8)
    z = np.full(3, 1 / 3)
    logits = -beta * (z * (delta - z @ delta) + gamma * 0.0)
    np.testing.assert_allclose(state.logits, logits, rtol=1e-5, atol=1e-9)
    z = np.exp(logits) / np.exp(logits).sum()
    expected = (z / second) / np.sum(z / second)
    np.testing.assert_allclose(weights, expected, rtol=1e-5)
    np.testing.assert_allclose(np.sum(weights), 1.0, rtol=1e-6)


def test_famo_adam_first_step_is_signed():
    first, second = np.array([1.0, 2.0]), np.array([0.5, 1.9])
    _, _, state = run("famo", first)
    _, _, state = run("famo", second, state=state)
    delta = np.log(first) - np.log(second)
    grad = 0.5 * (delta - delta.mean())
    np.testing.assert_allclose(state.logits, -0.025 * np.sign(grad), rtol=1e-4)


# ----------------------------------------------------------------------------- GradNorm


def numpy_gradnorm(shared_grads, head_grads, losses_seq, alpha, lr):
    """Algorithm 1 of Chen et al. 2018 with plain SGD on the weights."""
    weights = np.ones(len(losses_seq[0]))
    initial = np.asarray(losses_seq[0], np.float64)
    outputs = []
    for losses in losses_seq:
        norms = np.linalg.norm(shared_grads, axis=1)
        scaled = weights * norms
        ratio = np.asarray(losses) / initial
        target = scaled.mean() * (ratio / ratio.mean()) ** alpha
        grad = np.sign(scaled - target) * norms
        outputs.append((weights @ shared_grads, weights @ head_grads, weights.copy()))
        stepped = weights - lr * grad
        weights = stepped * weights.sum() / stepped.sum()
    return outputs, weights


def test_gradnorm_first_step_by_hand():
    grads = {"shared": jnp.array([[3.0, 4.0], [1.0, 0.0]])}
    _, weights, state = run("gradnorm", [1.0, 1.0], grads, optimizer="sgd", learning_rate=0.1)
    np.testing.assert_array_equal(weights, [1.0, 1.0])
    # Norms (5, 1), mean 3, ratios 1 -> targets 3: grad (+5, -1); w = (.5, 1.1) * 2/1.6.
    np.testing.assert_allclose(state.weights, [0.625, 1.375], rtol=1e-6)


def test_gradnorm_matches_numpy_on_shared_leaves():
    rng = np.random.default_rng(5)
    shared = rng.normal(size=(3, 4))
    head = rng.normal(size=(3, 2))
    grads = {"encoder": jnp.asarray(shared, jnp.float32), "head": jnp.asarray(head, jnp.float32)}
    losses_seq = [[1.0, 2.0, 0.5], [0.8, 1.9, 0.2], [0.5, 1.5, 0.2]]
    expected, final = numpy_gradnorm(shared, head, losses_seq, alpha=1.5, lr=0.05)
    state = None
    for losses, (enc, hd, w) in zip(losses_seq, expected, strict=True):
        combined, weights, state = run("gradnorm", losses, grads, state=state, alpha=1.5,
                                       learning_rate=0.05, optimizer="sgd",
                                       shared=("encoder",))
        np.testing.assert_allclose(weights, w, rtol=1e-5)
        np.testing.assert_allclose(combined["encoder"], enc, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(combined["head"], hd, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.weights, final, rtol=1e-5)


# ----------------------------------------------------------------------------- all methods


def example_grads(num_tasks: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"encoder": {"kernel": jnp.asarray(rng.normal(size=(num_tasks, 3, 2)), jnp.float32)},
            "head": jnp.asarray(rng.normal(size=(num_tasks, 2)), jnp.float32)}


@pytest.mark.parametrize("name", BALANCER_NAMES)
def test_jit_finite_and_state_is_array_pytree(name):
    grads = example_grads(3)
    state = None
    for losses in ([1.0, 2.0, 0.5], [0.9, 1.5, 0.6]):
        combined, weights, state = run(name, losses, grads, state=state)
        assert weights.shape == (3,) and bool(jnp.all(jnp.isfinite(weights)))
        if combined is not None:
            assert jax.tree.structure(combined) == jax.tree.structure(grads)
            assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(combined))
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(state))


@pytest.mark.parametrize("name", [n for n in BALANCER_NAMES if n != "rlw"])
def test_absent_task_gets_zero_weight_and_does_not_affect_others(name):
    """Task 1 is absent (NaN loss and gradients): same result as a 2-task run without it."""
    grads = example_grads(3, seed=1)
    garbage = jax.tree.map(lambda x: x.at[1].set(jnp.nan), grads)
    subset = jax.tree.map(lambda x: x[jnp.array([0, 2])], grads)
    mask = jnp.array([True, False, True])
    state3 = state2 = None
    for losses in ([1.0, 2.0, 0.5], [0.8, 1.5, 0.45], [0.6, 1.0, 0.44]):
        c3, w3, state3 = run(name, [losses[0], np.nan, losses[2]], garbage, state=state3,
                             mask=mask)
        c2, w2, state2 = run(name, [losses[0], losses[2]], subset, state=state2)
        assert w3[1] == 0.0
        # CAGrad's iterative float32 solver on a 3-task (one masked) vs a 2-task problem
        # ends ~1e-5 apart on jax 0.10.2 (CPU): weights 1.2e-5, gradients 5.5e-5 relative.
        # 2e-4 still catches a wrong weight (a masked task leaking in moves them by >1e-2).
        rtol, atol = (2e-4, 2e-5) if name == "cagrad" else (1e-5, 1e-6)
        np.testing.assert_allclose(w3[np.array([0, 2])], w2, rtol=rtol, atol=1e-7)
        if c3 is not None:
            for a, b in zip(jax.tree.leaves(c3), jax.tree.leaves(c2), strict=True):
                np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- helpers


def quadratic_task_losses(params, x):
    """[3] losses of a toy model with a shared encoder and one head per task."""
    hidden = jnp.tanh(x @ params["encoder"]["kernel"])
    outs = hidden @ params["heads"]  # [B, 3]
    return jnp.mean((outs - jnp.arange(3.0)) ** 2, axis=0)


@pytest.fixture(scope="module")
def toy_problem():
    rng = np.random.default_rng(0)
    params = {"encoder": {"kernel": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)},
              "heads": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    return params, x


def test_per_task_grads_equals_jacrev(toy_problem):
    params, x = toy_problem
    losses, grads = per_task_grads(quadratic_task_losses, params, x)
    jac = jax.jacrev(quadratic_task_losses)(params, x)
    np.testing.assert_allclose(losses, quadratic_task_losses(params, x), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(jac), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["equal", "dwa", "pcgrad"])
def test_balanced_grads(toy_problem, name):
    params, x = toy_problem
    balancer = build(name, 3)
    state = balancer.init(params)
    step = jax.jit(functools.partial(balanced_grads, balancer, quadratic_task_losses))
    out = step(params, state, rng=KEY, loss_args=(x,))
    losses, task_grads = per_task_grads(quadratic_task_losses, params, x)
    expected, weights, _ = balancer.update(losses, task_grads, state, params, KEY)
    np.testing.assert_allclose(out.weights, weights, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(out.grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if name == "equal":
        plain = jax.grad(lambda p: jnp.sum(quadratic_task_losses(p, x)))(params)
        for a, b in zip(jax.tree.leaves(out.grads), jax.tree.leaves(plain), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_balanced_grads_under_a_device_axis(toy_problem):
    """axis_name: per-device loss shares and task grads are summed before balancing."""
    params, x = toy_problem
    balancer = make_balancer("mgda")
    state = balancer.init(params)

    def share(p, x_part):  # this device's share of the mean over all 8 rows
        return quadratic_task_losses(p, x_part) / 2

    split = jax.jit(jax.vmap(lambda xs: balanced_grads(balancer, share, params, state,
                                                       loss_args=(xs,), axis_name="devices"),
                             axis_name="devices"))(x.reshape(2, 4, 4))
    whole = jax.jit(lambda x: balanced_grads(balancer, quadratic_task_losses, params, state,
                                             loss_args=(x,)))(x)
    np.testing.assert_allclose(split.weights[0], whole.weights, rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(split.grads), jax.tree.leaves(whole.grads), strict=True):
        np.testing.assert_allclose(a[0], b, rtol=1e-4, atol=1e-6)


def test_shared_selection_by_names_and_predicate(toy_problem):
    params, _ = toy_problem
    by_name = shared_mask(params, ["encoder"])
    assert by_name == {"encoder": {"kernel": True}, "heads": False}
    by_path = shared_mask(params, lambda path: path[-1] == "kernel")
    assert by_path == by_name
    shared, specific = split_shared(params, ["encoder"])
    assert jax.tree.leaves(shared) == jax.tree.leaves(params["encoder"])
    assert len(jax.tree.leaves(specific)) == 1
    merged = merge_shared(shared, specific)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    with pytest.raises(ValueError, match="shared='encoder'"):
        shared_mask(params, "encoder")


def test_shared_only_projection_leaves_heads_summed():
    grads = {"encoder": jnp.array([[1.0, 0.0], [-1.0, 1.0]]), "head": jnp.array([[1.0], [2.0]])}
    combined, _, _ = run("pcgrad", [1.0, 1.0], grads, shared=("encoder",))
    np.testing.assert_allclose(combined["encoder"], [0.5, 1.5], atol=1e-6)
    np.testing.assert_allclose(combined["head"], [3.0], atol=1e-6)


def test_trainer_applies_pcgrad_as_computed_by_hand():
    """One Trainer step (SGD, both tasks in one step) = the hand-computed PCGrad update."""
    from conftest import linear_data, make_task

    import jaxmtl

    X, Y = linear_data(8, 0)
    # Opposite labels on the same inputs: the tasks' gradients on the shared layer conflict.
    loaders = [jaxmtl.DictDataLoader(jaxmtl.DictDataset(f"d{t}", "train", {"data": X},
                                                        {f"task{t}": labels}), batch_size=8)
               for t, labels in [(1, Y), (2, 1 - Y)]]
    model = jaxmtl.MultitaskClassifier([make_task("task1"), make_task("task2", ("A", "C"))])
    model.init({"data": X}, seed=0)
    before = jax.device_get(model.params)
    jaxmtl.Trainer(n_epochs=1, lr=0.1, optimizer="sgd",
                   optimizer_config={"sgd_config": {"momentum": 0.0}}, grad_clip=None,
                   batch_scheduler="mixed", balancer="pcgrad", seed=0,
                   progress_bar=False).fit(model, loaders)

    def hand_loss(params, head, labels):  # Dense -> relu -> Dense, mean cross-entropy
        hidden = jax.nn.relu(X @ params["linear1A"]["kernel"] + params["linear1A"]["bias"])
        logits = hidden @ params[head]["kernel"] + params[head]["bias"]
        return -jnp.mean(jax.nn.log_softmax(logits)[np.arange(8), labels])

    g1 = jax.grad(hand_loss)(before, "linear2B", Y)
    g2 = jax.grad(hand_loss)(before, "linear2C", 1 - Y)
    flat1, flat2 = (np.concatenate([np.ravel(g["linear1A"][k]) for k in ("kernel", "bias")])
                    for g in (g1, g2))
    dot = float(flat1 @ flat2)
    assert dot < 0  # a conflict, so the projection changes the update
    # Algorithm 1 with two tasks: each gradient loses its component along the other.
    pc1 = flat1 - dot / float(flat2 @ flat2) * flat2
    pc2 = flat2 - dot / float(flat1 @ flat1) * flat1
    shared = pc1 + pc2
    n_kernel = before["linear1A"]["kernel"].size
    expected = {
        "linear1A": {"kernel": before["linear1A"]["kernel"]
                     - 0.1 * shared[:n_kernel].reshape(before["linear1A"]["kernel"].shape),
                     "bias": before["linear1A"]["bias"] - 0.1 * shared[n_kernel:]},
        # Heads are not shared: each gets its own task's gradient unchanged.
        "linear2B": jax.tree.map(lambda p, g: p - 0.1 * g, before["linear2B"], g1["linear2B"]),
        "linear2C": jax.tree.map(lambda p, g: p - 0.1 * g, before["linear2C"], g2["linear2C"]),
    }
    for path, want in jax.tree_util.tree_leaves_with_path(expected):
        got = model.params[path[0].key][path[1].key]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
    # The plain sum would have moved the shared bias elsewhere (the test can tell).
    plain = before["linear1A"]["bias"] - 0.1 * (g1["linear1A"]["bias"] + g2["linear1A"]["bias"])
    assert np.max(np.abs(plain - expected["linear1A"]["bias"])) > 1e-3
