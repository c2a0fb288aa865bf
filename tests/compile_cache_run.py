"""A tiny fit in a fresh process (run twice by test_compilation_cache.py).

Usage: python compile_cache_run.py
Prints one JSON line: programs compiled, persistent-cache hits, the cache directory jaxmtl set,
and the trained parameters' sum (the two runs must train the same model).
"""

import json

import flax.linen as nn
import jax
import numpy as np

import jaxmtl  # not conftest: it turns the cache off for the suite

events = {"compiles": 0, "cache_hits": 0}


def on_duration(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        events["compiles"] += 1


def on_event(event, **kwargs):
    if event == "/jax/compilation_cache/cache_hits":
        events["cache_hits"] += 1


jax.monitoring.register_event_duration_secs_listener(on_duration)
jax.monitoring.register_event_listener(on_event)

X = np.random.default_rng(0).uniform(-1, 1, size=(96, 2)).astype(np.float32)
Y = (X[:, 0] + X[:, 1] > 0).astype(int)
loader = jaxmtl.DictDataLoader(jaxmtl.DictDataset("d", "train", {"data": X}, {"t": Y}),
                               batch_size=32, shuffle=True, seed=0)
task = jaxmtl.Task("t", {"body": nn.Dense(8), "head": nn.Dense(2)},
                   [jaxmtl.Operation("body", [("_input_", "data")]),
                    jaxmtl.Operation("head", ["body"])])
model = jaxmtl.MultitaskClassifier([task], seed=0)
trainer = jaxmtl.Trainer(n_epochs=1, lr=0.1, seed=0, progress_bar=False)
trainer.fit(model, [loader])
total = float(sum(np.sum(leaf) for leaf in jax.tree.leaves(model.params)))
print(json.dumps({**events, "cache_dir": jax.config.jax_compilation_cache_dir,
                  "params_sum": total}))
