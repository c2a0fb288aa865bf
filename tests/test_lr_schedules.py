"""Learning-rate schedules: Snorkel's per-update values, checked against hand-computed ones.

Every case uses lr = 0.1 and 2 epochs of 5 batches (T = 10 updates). The expected lists
are what Snorkel's torch schedulers give the optimizer at updates 0..9, worked out by hand
from torch's LambdaLR/ExponentialLR/StepLR semantics (stepped after each update).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmtl.training.config import LRSchedulerConfig
from jaxmtl.training.lr_schedules import make_lr_schedule, resolve_warmup_steps

LR = 0.1
N_BATCHES = 5
N_EPOCHS = 2
RTOL = 1e-6  # float32 schedule values vs float64 hand-computed ones


def _values(lr_scheduler: str, **config: object) -> tuple[np.ndarray, int]:
    schedule, warmup_steps = make_lr_schedule(
        LR, lr_scheduler, LRSchedulerConfig(**config), N_BATCHES, N_EPOCHS
    )
    return np.array([float(schedule(t)) for t in range(N_BATCHES * N_EPOCHS)]), warmup_steps


def _cosine(s: int, decay_steps: int, min_lr: float) -> float:
    return min_lr + (LR - min_lr) * 0.5 * (1 + math.cos(math.pi * s / decay_steps))


CASES = {
    "constant": (
        "constant", {}, 0,
        [0.1] * 10,
    ),
    "constant_warmup": (
        "constant", {"warmup_steps": 4}, 4,
        [0.0, 0.025, 0.05, 0.075] + [0.1] * 6,
    ),
    "constant_ignores_min_lr": (
        "constant", {"min_lr": 0.5}, 0,
        [0.1] * 10,
    ),
    "linear": (
        "linear", {}, 0,
        [0.1 * (10 - t) / 10 for t in range(10)],
    ),
    # Quirk: the linear LambdaLR, built after the warm-up one, resets update 0 to lr.
    "linear_warmup": (
        "linear", {"warmup_steps": 4}, 4,
        [0.1, 0.025, 0.05, 0.075, 0.1, 0.1 * 5 / 6, 0.1 * 4 / 6, 0.05, 0.1 * 2 / 6, 0.1 / 6],
    ),
    "linear_warmup_min_lr": (
        "linear", {"warmup_steps": 4, "min_lr": 0.05}, 4,
        [0.1, 0.025, 0.05, 0.075, 0.1, 0.1 * 5 / 6, 0.1 * 4 / 6, 0.05, 0.05, 0.05],
    ),
    "exponential": (
        "exponential", {"exponential_config": {"gamma": 0.5}}, 0,
        [0.1 * 0.5**t for t in range(10)],
    ),
    # warm-up in epochs: int(0.4 * 5) = 2 updates.
    "exponential_warmup_epochs": (
        "exponential", {"warmup_steps": 0.4, "warmup_unit": "epochs",
                        "exponential_config": {"gamma": 0.5}}, 2,
        [0.0, 0.05] + [0.1 * 0.5**s for s in range(8)],
    ),
    "exponential_warmup_min_lr": (
        "exponential", {"warmup_steps": 2, "min_lr": 0.02,
                        "exponential_config": {"gamma": 0.5}}, 2,
        [0.0, 0.05, 0.1, 0.05, 0.025, 0.02, 0.02, 0.02, 0.02, 0.02],
    ),
    "exponential_default_gamma": (
        "exponential", {}, 0,
        [0.1 * 0.9**t for t in range(10)],
    ),
    "step": (
        "step", {"step_config": {"step_size": 3, "gamma": 0.1}}, 0,
        [0.1] * 3 + [0.01] * 3 + [0.001] * 3 + [0.0001],
    ),
    # warm-up as a fraction: int(0.2 * 2 * 5) = 2 updates.
    "step_warmup_percentage": (
        "step", {"warmup_percentage": 0.2, "step_config": {"step_size": 3, "gamma": 0.1}}, 2,
        [0.0, 0.05, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001],
    ),
    "step_warmup_min_lr": (
        "step", {"warmup_steps": 2, "min_lr": 0.005,
                 "step_config": {"step_size": 3, "gamma": 0.1}}, 2,
        [0.0, 0.05, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.005, 0.005],
    ),
    # Snorkel 0.10's StepLRSchedulerConfig: step_size 5, gamma 0.9.
    "step_default_config": (
        "step", {}, 0,
        [0.1] * 5 + [0.09] * 5,
    ),
    "cosine": (
        "cosine", {}, 0,
        [_cosine(t, 10, 0.0) for t in range(10)],
    ),
    "cosine_warmup_min_lr": (
        "cosine", {"warmup_steps": 2, "min_lr": 0.01}, 2,
        [0.0, 0.05] + [_cosine(s, 8, 0.01) for s in range(8)],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_values_step_by_step(case: str) -> None:
    lr_scheduler, config, expected_warmup, expected = CASES[case]
    values, warmup_steps = _values(lr_scheduler, **config)
    assert warmup_steps == expected_warmup
    np.testing.assert_allclose(values, expected, rtol=RTOL, atol=1e-9)


def test_schedule_is_jittable_and_vmappable() -> None:
    config = LRSchedulerConfig(warmup_steps=4)
    schedule, _ = make_lr_schedule(LR, "linear", config, N_BATCHES, N_EPOCHS)
    counts = jnp.arange(10)
    eager = np.array([float(schedule(t)) for t in range(10)])
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(schedule))(counts)), eager,
                               rtol=RTOL)
    assert jax.jit(schedule)(jnp.int32(3)).dtype == jnp.float32


def test_schedule_drives_optax_optimizer() -> None:
    """optax passes the update count (before the update) to a schedule given as lr."""
    config = LRSchedulerConfig(warmup_steps=2)
    schedule, _ = make_lr_schedule(LR, "constant", config, N_BATCHES, N_EPOCHS)
    optimizer = optax.sgd(schedule)
    params = jnp.zeros(())
    state = optimizer.init(params)
    moves = []
    for _ in range(4):
        updates, state = optimizer.update(jnp.ones(()), state, params)
        moves.append(-float(updates))
    np.testing.assert_allclose(moves, [0.0, 0.05, 0.1, 0.1], rtol=RTOL)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"warmup_steps": 1, "warmup_unit": "batches"}, 1),
        ({"warmup_steps": 1, "warmup_unit": "epochs"}, 3),
        ({"warmup_percentage": 1 / 3}, 1),
        ({"warmup_steps": 2.7}, 2),
        ({"warmup_steps": 2, "warmup_percentage": 0.9}, 2),
        ({}, 0),
    ],
)
def test_warmup_steps_as_snorkel(config: dict, expected: int) -> None:
    """Snorkel's test_warmup: 1 epoch of 3 batches."""
    assert resolve_warmup_steps(LRSchedulerConfig(**config), 3, 1) == expected
    _, warmup_steps = make_lr_schedule(0.01, "constant", LRSchedulerConfig(**config), 3, 1)
    assert warmup_steps == expected


def test_warmup_rounding_to_zero_means_no_warmup() -> None:
    values, warmup_steps = _values("constant", warmup_steps=0.5)
    assert warmup_steps == 0
    np.testing.assert_allclose(values, [0.1] * 10, rtol=RTOL)


def test_warmup_covering_all_updates_is_finite() -> None:
    values, warmup_steps = _values("linear", warmup_percentage=1.0)
    assert warmup_steps == 10
    assert np.all(np.isfinite(values))
    np.testing.assert_allclose(values, [0.1] + [0.1 * t / 10 for t in range(1, 10)],
                               rtol=RTOL)


def test_unknown_scheduler() -> None:
    with pytest.raises(ValueError, match="Unrecognized lr scheduler option 'foo'"):
        make_lr_schedule(LR, "foo", LRSchedulerConfig(), N_BATCHES, N_EPOCHS)


def _sgd_moves(tx: optax.GradientTransformation, params: dict, n: int) -> list[dict]:
    """The parameter moves of ``n`` updates by a gradient of ones (SGD: -move = lr)."""
    state = tx.init(params)
    moves = []
    for _ in range(n):
        updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
        moves.append({name: -float(value) for name, value in updates.items()})
    return moves


def test_gradient_accumulation_keeps_the_schedule_in_batches() -> None:
    """With k = 2, update c (made of batches 2c, 2c+1) applies the rate of batch 2c: the
    one-epoch warm-up lasts 5 batches and the cosine reaches its end at batch 10, as with
    k = 1 (the schedule used to advance once per update: twice as slow). A module group
    with its own lr follows the same clock, and the logged rate is the applied one."""
    from jaxmtl import MultitaskClassifier
    from jaxmtl.training.config import TrainerConfig
    from jaxmtl.training.fit_setup import compile_settings

    config = TrainerConfig(
        n_epochs=N_EPOCHS, lr=LR, optimizer="sgd", grad_clip=None,
        optimizer_config={"sgd_config": {"momentum": 0.0}}, lr_scheduler="cosine",
        lr_scheduler_config={"warmup_steps": 1, "warmup_unit": "epochs"},
        grad_accumulation_steps=2, module_optimizers={"head": {"lr": 2 * LR}})
    settings = compile_settings(config, MultitaskClassifier([]), N_BATCHES)
    moves = _sgd_moves(settings.tx, {"body": jnp.zeros(()), "head": jnp.zeros(())},
                       N_BATCHES * N_EPOCHS)
    by_hand = [LR * s / 5 if s < 5 else _cosine(s - 5, 5, 0.0) for s in range(10)]
    applied = [by_hand[2 * (s // 2)] for s in range(10)]  # the rate of the update's first batch
    for s, move in enumerate(moves):
        expected = applied[s] if s % 2 == 1 else 0.0  # parameters move every 2nd batch
        np.testing.assert_allclose(move["body"], expected, rtol=RTOL, atol=1e-9)
        np.testing.assert_allclose(move["head"], 2 * expected, rtol=RTOL, atol=1e-9)
    logged = [float(settings.lr_schedule(s)) for s in range(10)]
    np.testing.assert_allclose(logged, applied, rtol=RTOL, atol=1e-9)
    assert settings.warmup_steps == 5
