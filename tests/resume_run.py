"""Training process for the kill-and-resume test (run as a subprocess by test_resume.py).

Usage: python resume_run.py MODE CHECKPOINT_DIR OUT [KILL_AT_BATCH]
  full    train uninterrupted;
  crash   train, and SIGKILL this process when batch KILL_AT_BATCH is drawn;
  resume  build everything afresh (loaders with seed=None) and resume from CHECKPOINT_DIR.
Writes the final TrainState params to OUT.npz and the (best) model to OUT.msgpack.
"""

import os
import signal
import sys

import jax
import numpy as np
from conftest import linear_data, make_task

import jaxmtl


class KillingLoader(jaxmtl.DictDataLoader):
    """Kills the process when its ``kill_at``-th batch is drawn (a crash mid-epoch)."""

    kill_at = -1
    drawn = 0

    def batch_at(self, order, index):
        KillingLoader.drawn += 1
        if KillingLoader.drawn == KillingLoader.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().batch_at(order, index)


def main(mode, checkpoint_dir, out, kill_at=-1):
    loader_class = KillingLoader if mode == "crash" else jaxmtl.DictDataLoader
    KillingLoader.kill_at = kill_at
    loaders = []
    for task, seed in [("task1", 0), ("task2", 1)]:
        X, Y = linear_data(300, seed)
        ds = jaxmtl.DictDataset(f"d_{task}", "train", {"data": X}, {task: Y})
        loaders.append(loader_class(ds, batch_size=16, shuffle=True,
                                    seed=None if mode == "resume" else 10 + seed))
    model = jaxmtl.MultitaskClassifier([make_task("task1"), make_task("task2", ("A", "C"))])
    trainer = jaxmtl.Trainer(
        n_epochs=3, lr=0.01, seed=None if mode == "resume" else 123, progress_bar=False,
        checkpointing=True, lr_scheduler="linear",
        log_manager_config={"counter_unit": "batches", "evaluation_freq": 5},
        checkpointer_config={"checkpoint_dir": checkpoint_dir, "checkpoint_clear": False},
    )
    trainer.fit(model, loaders, resume_from=checkpoint_dir if mode == "resume" else None)
    leaves = jax.tree_util.tree_flatten_with_path(trainer.state.params)[0]
    np.savez(out + ".npz", **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})
    model.save(out + ".msgpack")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else -1)
