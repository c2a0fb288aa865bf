"""Train the quickstart tasks with TensorBoard logging, warm-up and a cosine schedule.

Run: python examples/tensorboard_run.py [--log-dir logs]
Then: pip install tensorboard && tensorboard --logdir logs
"""

from __future__ import annotations

import argparse

import numpy as np
from quickstart import make_split, make_tasks

import jaxmtl


def main(log_dir: str = "logs", run_name: str = "tensorboard_example") -> str:
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(8, 4))
    dataloaders = make_split("train", 4000, rng, weights) + make_split("valid", 1000, rng, weights)
    model = jaxmtl.MultitaskClassifier(make_tasks())
    trainer = jaxmtl.Trainer(
        n_epochs=5,
        lr=3e-3,
        seed=0,
        progress_bar=False,
        logging=True,
        log_writer="tensorboard",
        log_writer_config={"log_dir": log_dir, "run_name": run_name},
        log_manager_config={"counter_unit": "batches", "evaluation_freq": 50},
        lr_scheduler="cosine",
        lr_scheduler_config={"warmup_percentage": 0.1, "min_lr": 1e-4},
    )
    trainer.fit(model, dataloaders)
    print(f"warm-up: {trainer.warmup_steps} batches; final metrics:")
    for key, value in sorted(trainer.metrics.items()):
        print(f"  {key}: {value:.4f}")
    print(f"TensorBoard events in {log_dir}/{run_name}: tensorboard --logdir {log_dir}")
    return f"{log_dir}/{run_name}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--log-dir", default="logs")
    main(parser.parse_args().log_dir)
