"""One process of a 2-process run with logging and checkpointing in the default directory
(a subprocess of test_run_lifecycle.py).

Usage: python default_dir_run.py LOG_DIR PROCESS_ID N_PROCESSES PORT
No checkpoint_dir and no run_name: every process must checkpoint beside process 0's logs,
in the run named by process 0's timestamp. Prints the checkpoint directory and the
best-model kernel sum.
"""

import sys

log_dir, process_id, n_processes, port = sys.argv[1], *(int(a) for a in sys.argv[2:5])

import numpy as np  # noqa: E402
from conftest import linear_data, make_task  # noqa: E402

import jaxmtl  # noqa: E402
import jaxmtl.parallel  # noqa: E402

jaxmtl.parallel.initialize_multihost(f"127.0.0.1:{port}", n_processes, process_id)
X, Y = linear_data(64, 0)
train = jaxmtl.DictDataset("d", "train", {"data": X}, {"task1": Y})
model = jaxmtl.MultitaskClassifier([make_task("task1")])
trainer = jaxmtl.Trainer(n_epochs=2, lr=0.05, seed=0, progress_bar=False, logging=True,
                         log_writer="json", log_writer_config={"log_dir": log_dir},
                         log_manager_config={"counter_unit": "batches", "evaluation_freq": 2},
                         checkpointing=True)
trainer.fit(model, [jaxmtl.DictDataLoader(train, batch_size=16, shuffle=True, seed=0)])
kernel = np.asarray(model.params["linear1A"]["kernel"])
print(f"RESULT {trainer.checkpoint_dir} {kernel.sum():.6f}")
