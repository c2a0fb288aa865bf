"""Child of ``--devices``: jaxmtl ``Trainer.fit`` over N devices in one parallel mode.

The parent (``benchmarks/devices.py``) starts one such process per (device count, mode),
with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` on a CPU or
``CUDA_VISIBLE_DEVICES=0..N-1`` on a GPU in its environment, so JAX sees exactly N
devices. For every config (global batch size) it runs one ``fit(n_epochs=1 + R)`` with
``TrainerConfig(parallel=mode)`` on a fresh model, times the epochs with
``impl_jaxmtl.EpochClock`` (epoch 0 = warm-up), and records:

- throughput (points of both tasks / epoch seconds: median, best, worst);
- the mode the Trainer actually chose (``trainer.parallel``) and its device count;
- correctness: the last epoch's mean train loss, and, when the 1-device run of the same
  config saved its parameters in ``params_dir`` (it runs first), the relative distance of
  the trained parameters to the 1-device ones (see ``compare_params``).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import numpy as np

from benchmarks.impl_jax import jax_info
from benchmarks.impl_jaxmtl import EpochClock, build_loaders, build_model, make_trainer
from benchmarks.workload import child_main, n_batches, summarize


def flat_params(variables: Any) -> dict[str, np.ndarray]:
    """The model's variables as ``{"path/to/leaf": host array}`` (npz-friendly keys)."""
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
            for path, leaf in leaves}


def reference_path(params_dir: str | None, config: dict[str, Any]) -> str | None:
    """Where the 1-device run of ``config`` keeps its parameters (None: not kept)."""
    if not params_dir:
        return None
    return os.path.join(params_dir, f"b{config['batch_size']}_n{config['n']}_single.npz")


def compare_params(params: dict[str, np.ndarray], path: str | None) -> dict[str, float]:
    """Distance to the 1-device parameters in ``path`` ({} without a reference file).

    ``param_rel_l2_vs_1`` = ||p - p_ref|| / ||p_ref|| over all leaves together;
    ``param_rel_max_vs_1`` = max |p - p_ref| / max |p_ref|.
    """
    if path is None or not os.path.exists(path):
        return {}
    with np.load(path) as ref:
        if set(ref.files) != set(params):
            return {"param_rel_l2_vs_1": float("inf"), "param_rel_max_vs_1": float("inf")}
        diff = np.concatenate([(params[k] - ref[k]).ravel() for k in ref.files])
        base = np.concatenate([ref[k].ravel() for k in ref.files])
        return {"param_rel_l2_vs_1": float(np.linalg.norm(diff) / (np.linalg.norm(base) or 1.0)),
                "param_rel_max_vs_1": float(np.max(np.abs(diff)) / (np.max(np.abs(base)) or 1.0))}


def run_config(config: dict[str, Any], repeats: int, mode: str,
               params_dir: str | None) -> dict[str, Any]:
    """One timed ``fit(n_epochs=1 + repeats)`` with ``parallel=mode`` (module docstring)."""
    import jax

    clock = EpochClock()
    clock.install()
    try:
        call = time.perf_counter()
        model = build_model(config)
        trainer = make_trainer(1 + repeats, config, {"parallel": mode})
        loaders, _, _ = build_loaders(config)
        trainer.fit(model, loaders)
        jax.block_until_ready(trainer.state)
        end = time.perf_counter()
    finally:
        clock.uninstall()
    if len(clock.starts) != 1 + repeats:
        raise RuntimeError(f"EpochClock saw {len(clock.starts)} epochs, expected {1 + repeats}")
    bounds = [*clock.starts, end]
    epochs = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    parallel = trainer.parallel
    result: dict[str, Any] = {
        "config": config,
        **summarize(epochs[1:], 2 * config["n"]),
        "warmup_epoch_s": clock.starts[1] - call,
        "compile_s": clock.starts[1] - call - statistics.median(epochs[1:]),
        "steps_per_epoch": 2 * n_batches(config["n"], config["batch_size"]),
        "parallel_mode": parallel.mode,
        "parallel_devices": parallel.n_devices,
        "per_device_batch": -(-config["batch_size"] // parallel.n_devices),
        "final_train_loss": trainer.metrics.get("model/all/train/loss"),
    }
    params = flat_params(model.variables)
    ref = reference_path(params_dir, config)
    if parallel.mode == "single" and ref is not None:
        np.savez(ref, **params)
    else:
        result.update(compare_params(params, ref))
    return result


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs every config of ``spec`` with ``parallel=spec["parallel"]`` on the visible devices.

    ``spec["n_devices"]`` is the device count the parent arranged; a process that sees
    another count reports an error instead of mislabelled numbers.
    """
    import jax

    import jaxmtl

    expected = int(spec["n_devices"])
    if jax.device_count() != expected:
        return {"error": f"expected {expected} devices, JAX sees {jax.device_count()}: "
                         f"{jax.devices()} (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})",
                "info": jax_info()}
    results = [run_config(config, spec["repeats"], spec["parallel"], spec.get("params_dir"))
               for config in spec["configs"]]
    return {"info": {**jax_info(), "jaxmtl": jaxmtl.__version__,
                     "device_kind": jax.devices()[0].device_kind,
                     "device_count": jax.device_count()},
            "results": results}


if __name__ == "__main__":
    child_main("devices", run)
