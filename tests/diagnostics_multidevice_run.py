"""Diagnostics on 2 forced CPU devices (a subprocess of test_diagnostics.py).

Usage: python diagnostics_multidevice_run.py BALANCER[,BALANCER...] OUT.json
For each balancer, trains the same one-step-per-evaluation run with parallel="pmap" and
"single"; writes {balancer: {"pmap": metrics, "single": metrics}} (the diagnostics metrics).
"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("JAXMTL_TEST_FAST_COMPILE_FLAG", "") + " --xla_force_host_platform_device_count=2"

import json  # noqa: E402

import jax  # noqa: E402
from test_diagnostics import fit, one_batch_loaders, three_task_model  # noqa: E402


def main(balancers, out):
    assert len(jax.local_devices()) == 2
    metrics = {}
    for balancer in balancers.split(","):
        metrics[balancer] = {}
        for parallel in ("pmap", "single"):
            trainer = fit(three_task_model(), one_batch_loaders(n=15), n_epochs=2,
                          balancer=balancer, log_task_gradients=True, parallel=parallel)
            assert (trainer.parallel.mode, trainer.parallel.n_devices) == (
                parallel, 2 if parallel == "pmap" else 1)
            metrics[balancer][parallel] = {k: v for k, v in trainer.metrics.items()
                                           if k.startswith("diagnostics/")}
    with open(out, "w") as f:
        json.dump(metrics, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
