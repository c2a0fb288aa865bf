"""Checkpointing and exact resume: a run interrupted mid-epoch finishes as if it never stopped.

Run: python examples/resume.py [--checkpoint-dir checkpoints/resume_example]

It trains the quickstart tasks for 4 epochs with a checkpoint every 20 batches, stops the
run by raising an exception inside the data pipeline (as a crash would), resumes it with
``fit(..., resume_from=checkpoint_dir)`` and checks that the parameters equal those of an
uninterrupted run bit for bit.
"""

from __future__ import annotations

import argparse
import shutil

import jax
import numpy as np
from quickstart import make_split, make_tasks

import jaxmtl


class Interrupt(Exception):
    """Stands in for a crash (the test suite uses a real SIGKILL)."""


class InterruptingLoader(jaxmtl.DictDataLoader):
    """Raises ``Interrupt`` when its ``stop_at``-th batch is drawn."""

    def __init__(self, *args, stop_at: int = -1, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_at, self.drawn = stop_at, 0

    def batch_at(self, order, index):
        self.drawn += 1
        if self.drawn == self.stop_at:
            raise Interrupt(f"interrupted at batch {self.drawn}")
        return super().batch_at(order, index)


def run(checkpoint_dir: str, stop_at: int = -1, resume: bool = False):
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(8, 4))
    loaders = make_split("train", 2000, rng, weights) + make_split("valid", 500, rng, weights)
    loaders[0] = InterruptingLoader(loaders[0].dataset, batch_size=64, shuffle=True, seed=0,
                                    stop_at=stop_at)
    model = jaxmtl.MultitaskClassifier(make_tasks())
    trainer = jaxmtl.Trainer(
        n_epochs=4, lr=3e-3, seed=0, progress_bar=False, checkpointing=True,
        log_manager_config={"counter_unit": "batches", "evaluation_freq": 20},
        checkpointer_config={"checkpoint_dir": checkpoint_dir,
                             "checkpoint_metric": "model/all/valid/accuracy:max"},
    )
    trainer.fit(model, loaders, resume_from=checkpoint_dir if resume else None)
    return trainer.state.params, model.score(loaders[2:])


def main(checkpoint_dir: str = "checkpoints/resume_example") -> bool:
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    reference, _ = run(checkpoint_dir + "_reference")
    try:
        run(checkpoint_dir, stop_at=70)  # epoch 2 of 4, mid-epoch
    except Interrupt as error:
        print(f"training stopped: {error}")
    params, scores = run(checkpoint_dir, resume=True)
    identical = all(np.array_equal(a, b) for a, b in
                    zip(jax.tree.leaves(reference), jax.tree.leaves(params), strict=True))
    print(f"resumed run equals the uninterrupted one bit for bit: {identical}")
    print(f"best model (by model/all/valid/accuracy): {scores['model/all/valid/accuracy']:.4f}")
    shutil.rmtree(checkpoint_dir + "_reference", ignore_errors=True)
    return identical


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint-dir", default="checkpoints/resume_example")
    main(parser.parse_args().checkpoint_dir)
