"""One training run on N forced CPU devices (a subprocess of test_parallel.py).

Usage: python multidevice_run.py N_DEVICES PARALLEL OUT [PROCESS_ID N_PROCESSES PORT]
PARALLEL may list several modes ("single,auto"): one process runs each, writing OUT_MODE.*
(one Python + JAX import for the default run's reference and its 2-device run).
With the last three arguments, this is one of N_PROCESSES processes of a multi-process run
(each with N_DEVICES local devices, coordinator on 127.0.0.1:PORT); process 0 writes.
Writes OUT.npz (final params, logged train losses, predicted probs, calculate_loss) and
OUT.json (scores).
"""

import os
import sys

n_devices, parallel, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
process_id, n_processes, port = (int(a) for a in (sys.argv[4:7] or (0, 1, 0)))
os.environ["XLA_FLAGS"] = os.environ.get("JAXMTL_TEST_FAST_COMPILE_FLAG", "") + f" --xla_force_host_platform_device_count={n_devices}"

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from conftest import linear_data, make_task  # noqa: E402

import jaxmtl  # noqa: E402
import jaxmtl.parallel  # noqa: E402


def main():
    if n_processes > 1:
        jaxmtl.parallel.initialize_multihost(f"127.0.0.1:{port}", n_processes, process_id)
    assert len(jax.local_devices()) == n_devices
    modes = parallel.split(",")
    for mode in modes:
        train_and_write(mode, out if len(modes) == 1 else f"{out}_{mode}")


def train_and_write(parallel, out):
    loaders = []
    for split, n in [("train", 250), ("valid", 90)]:
        for task, seed in [("task1", 0), ("task2", 1)]:
            X, Y = linear_data(n, seed + (10 if split == "valid" else 0))
            ds = jaxmtl.DictDataset(f"d_{task}", split, {"data": X}, {task: Y})
            # 60 rows: not a multiple of 8 (padded per device); 250 = 4 * 60 + 10 (partial).
            loaders.append(jaxmtl.DictDataLoader(ds, batch_size=60, shuffle=split == "train",
                                                 seed=seed))
    model = jaxmtl.MultitaskClassifier([make_task("task1"), make_task("task2", ("A", "C"))])
    trainer = jaxmtl.Trainer(n_epochs=3, lr=0.05, seed=0, progress_bar=False, parallel=parallel,
                             logging=True, log_writer="json",
                             log_writer_config={"log_dir": out + "_logs", "run_name": "run"},
                             log_manager_config={"counter_unit": "batches", "evaluation_freq": 2},
                             checkpointing=True,
                             checkpointer_config={"checkpoint_dir": out + "_checkpoints"})
    trainer.fit(model, loaders)
    expected_devices = 1 if parallel == "single" else n_devices * n_processes
    assert trainer.parallel.n_devices == expected_devices
    if process_id != 0:  # process 0 writes the results (and the logs)
        return
    log = json.load(open(out + "_logs/run/log.json"))
    losses = np.array([v for _, v in log["model/all/train/loss"]])
    valid = loaders[2:]
    probs = model.predict(valid[0])["probs"]["task1"]
    X, Y = valid[1].dataset.X_dict, valid[1].dataset.Y_dict
    loss_dict, count_dict = model.calculate_loss(X, Y)
    leaves = jax.tree_util.tree_flatten_with_path(model.params)[0]
    arrays = {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}
    # Compiled train programs: counted under pmap as under jit (one per call signature).
    np.savez(out + ".npz", losses=losses, probs=probs, loss=np.asarray(loss_dict["task2"]),
             count=np.asarray(count_dict["task2"]),
             programs=np.asarray(trainer.compiled_programs()), **arrays)
    json.dump(model.score(valid), open(out + ".json", "w"))


main()
