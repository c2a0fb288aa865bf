"""Hand-written JAX/optax training loops: the floor for jaxmtl's framework overhead.

Two variants of the same model, loss and optimizer as jaxmtl's default config (the whole
parameter tree goes through ``clip_by_global_norm(1.0)`` then Adam, as jaxmtl does):

- ``numpy``: one jitted, buffer-donating step per batch; batches are numpy arrays cut on the
  host (``X[rows]``) and transferred by the call, as a user loop without a framework would.
- ``scan``: the data lives on the device; one jitted call per epoch runs ``lax.scan`` over
  the epoch's batches, ``lax.cond`` picking the task's step.

Run by the runner as ``python -m benchmarks.impl_jax --spec '{"variant": "numpy", ...}'``.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import numpy as np

from benchmarks.workload import (
    child_main,
    epoch_plan,
    make_data,
    n_batches,
    predict_stats,
    summarize,
    timed,
    train_accuracy,
)


def jax_info() -> dict[str, Any]:
    """JAX/Flax/optax versions, the default backend and ``jax.devices()``."""
    import flax
    import jax
    import jaxlib
    import optax

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()]}


def init_params(seed: int, d: int, width: int) -> dict[str, Any]:
    """LeCun-normal weights and zero biases (Flax ``Dense``'s defaults) for body and heads."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.PRNGKey(seed), 4)

    def dense(key: Any, fan_in: int, fan_out: int) -> dict[str, Any]:
        w = jax.random.normal(key, (fan_in, fan_out), jnp.float32) / math.sqrt(fan_in)
        return {"w": w, "b": jnp.zeros((fan_out,), jnp.float32)}

    return {"body1": dense(keys[0], d, width), "body2": dense(keys[1], width, width),
            "head_a": dense(keys[2], width, 2), "head_b": dense(keys[3], width, 4)}


def _body(params: dict[str, Any], x: Any) -> Any:
    import jax

    h = jax.nn.relu(x @ params["body1"]["w"] + params["body1"]["b"])
    return jax.nn.relu(h @ params["body2"]["w"] + params["body2"]["b"])


def _masked_mean(losses: Any, mask: Any) -> Any:
    import jax.numpy as jnp

    return jnp.sum(jnp.where(mask, losses, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def loss_a(params: dict[str, Any], x: Any, y: Any, mask: Any) -> Any:
    """Hard-label cross entropy of head_a, masked mean over real rows."""
    import optax

    logits = _body(params, x) @ params["head_a"]["w"] + params["head_a"]["b"]
    return _masked_mean(optax.softmax_cross_entropy_with_integer_labels(logits, y), mask)


def loss_b(params: dict[str, Any], x: Any, y: Any, mask: Any) -> Any:
    """Soft-label cross entropy (``cross_entropy_with_probs``) of head_b, masked mean."""
    import optax

    logits = _body(params, x) @ params["head_b"]["w"] + params["head_b"]["b"]
    return _masked_mean(optax.softmax_cross_entropy(logits, y), mask)


def make_tx(config: dict[str, Any]) -> Any:
    """Global-norm clipping, then Adam: the optax chain jaxmtl's Trainer builds."""
    import optax

    return optax.chain(optax.clip_by_global_norm(config["grad_clip"]),
                       optax.adam(config["lr"]))


def _update(tx: Any, loss_fn: Any, carry: tuple, x: Any, y: Any, mask: Any) -> tuple:
    import jax
    import optax

    params, opt_state = carry
    grads = jax.grad(loss_fn)(params, x, y, mask)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def make_predict(config: dict[str, Any]) -> Any:
    """A jitted function: params, x [B, D] -> (probs_a [B, 2], probs_b [B, 4])."""
    import jax

    def probs(params: dict[str, Any], x: Any) -> tuple[Any, Any]:
        h = _body(params, x)
        return (jax.nn.softmax(h @ params["head_a"]["w"] + params["head_a"]["b"]),
                jax.nn.softmax(h @ params["head_b"]["w"] + params["head_b"]["b"]))

    return jax.jit(probs)


def measure_predict(params: dict[str, Any], X: np.ndarray, hard: np.ndarray,
                    config: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Throughput of predicting both tasks over X in numpy batches of ``predict_batch``.

    Also returns ``task_a_train_accuracy`` (a sanity check that training worked).
    """
    predict = make_predict(config)
    size = config["predict_batch"]

    def run() -> list[np.ndarray]:
        outs = []
        for start in range(0, len(X), size):
            rows = X[start:start + size]
            valid = len(rows)
            if valid < size:
                rows = np.resize(rows, (size, X.shape[1]))
            probs_a, probs_b = predict(params, rows)
            outs.append((np.asarray(probs_a)[:valid], np.asarray(probs_b)[:valid]))
        return outs

    outs = run()  # compile
    probs_a = np.concatenate([a for a, _ in outs])
    return {**predict_stats([timed(run)[0] for _ in range(repeats)], len(X)),
            "task_a_train_accuracy": train_accuracy(probs_a, hard)}


def run_config(config: dict[str, Any], repeats: int, variant: str,
               with_predict: bool) -> dict[str, Any]:
    """Warm-up epoch (compile), then ``repeats`` timed epochs of one variant."""
    import jax

    X, hard, soft = make_data(config["n"], config["d"])
    hard = hard.astype(np.int32)
    bs = config["batch_size"]
    tx = make_tx(config)
    # Parameter and optimizer initialisation count in the warm-up, as they do inside
    # jaxmtl's fit (which initialises the model): start-up is compared whole.
    start = time.perf_counter()
    params = init_params(0, config["d"], config["width"])
    opt_state = jax.block_until_ready(tx.init(params))
    init_s = time.perf_counter() - start

    if variant == "numpy":
        step_a = jax.jit(lambda c, x, y, m: _update(tx, loss_a, c, x, y, m), donate_argnums=0)
        step_b = jax.jit(lambda c, x, y, m: _update(tx, loss_b, c, x, y, m), donate_argnums=0)

        def epoch(carry: tuple, index: int) -> tuple:
            tasks, rows, mask = epoch_plan(config["n"], bs, index)
            for task, r, m in zip(tasks, rows, mask, strict=True):
                if task == 0:
                    carry = step_a(carry, X[r], hard[r], m)
                else:
                    carry = step_b(carry, X[r], soft[r], m)
            return jax.block_until_ready(carry)
    elif variant == "scan":
        data = jax.device_put((X, hard, soft))

        def scan_epoch(carry: tuple, data: tuple, plan: tuple) -> tuple:
            X_d, hard_d, soft_d = data

            def one(carry: tuple, step: tuple) -> tuple:
                task, r, m = step
                x = X_d[r]
                carry = jax.lax.cond(
                    task == 0,
                    lambda c: _update(tx, loss_a, c, x, hard_d[r], m),
                    lambda c: _update(tx, loss_b, c, x, soft_d[r], m),
                    carry,
                )
                return carry, None

            return jax.lax.scan(one, carry, plan)[0]

        scan_jit = jax.jit(scan_epoch, donate_argnums=0)

        def epoch(carry: tuple, index: int) -> tuple:
            plan = jax.device_put(epoch_plan(config["n"], bs, index))
            return jax.block_until_ready(scan_jit(carry, data, plan))
    else:
        raise ValueError(f"unknown variant {variant!r}; expected 'numpy' or 'scan'")

    carry = (params, opt_state)
    seconds = []
    for index in range(1 + repeats):
        elapsed, carry = timed(lambda c=carry, i=index: epoch(c, i))
        seconds.append(elapsed)
    points = 2 * config["n"]
    result = {"config": config, **summarize(seconds[1:], points),
              "warmup_epoch_s": init_s + seconds[0], "init_s": init_s,
              "compile_s": init_s + seconds[0] - statistics.median(seconds[1:]),
              "steps_per_epoch": 2 * n_batches(config["n"], bs)}
    if with_predict:
        result.update(measure_predict(carry[0], X, hard, config, repeats))
    return result


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs every config of ``spec`` (``variant``: "numpy" or "scan")."""
    variant = spec.get("variant", "numpy")
    info = jax_info()
    results = [run_config(config, spec["repeats"], variant,
                          with_predict=spec.get("predict", True))
               for config in spec["configs"]]
    return {"info": info, "results": results, "variant": variant}


if __name__ == "__main__":
    child_main("jax", run)
