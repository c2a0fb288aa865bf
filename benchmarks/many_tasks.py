"""Many-task workload: T tasks sharing a body, one Dense(2) head each (issue 13 item 1).

    python benchmarks/many_tasks.py T [steps_per_call]

Prints fit and score wall time, the number of XLA compiles (and the longest), and the
whole script's wall time.
"""
import sys
import time

t_script = time.perf_counter()
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxmtl  # noqa: E402
from jaxmtl.training import Trainer  # noqa: E402

T = int(sys.argv[1])
compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: compiles.append(duration)
    if event == "/jax/core/compile/backend_compile_duration" else None)

body = nn.Sequential([nn.Dense(128), nn.relu, nn.Dense(128), nn.relu])
tasks, train, valid = [], [], []
rng = np.random.default_rng(0)
for t in range(T):
    tasks.append(jaxmtl.Task(
        name=f"task{t}", module_pool={"body": body, f"head_{t}": nn.Dense(2)},
        op_sequence=[jaxmtl.Operation("body", [("_input_", "x")], name="body"),
                     jaxmtl.Operation(f"head_{t}", ["body"], name=f"head_{t}")]))
    for split, n, loaders in (("train", 1024, train), ("valid", 512, valid)):
        x = rng.normal(size=(n, 64)).astype(np.float32)
        y = (x[:, t % 64] > 0).astype(np.int64)
        ds = jaxmtl.DictDataset(f"d{t}", split, {"x": x}, {f"task{t}": y})
        loaders.append(jaxmtl.DictDataLoader(ds, batch_size=64, shuffle=split == "train"))
model = jaxmtl.MultitaskClassifier(tasks)
trainer = Trainer(n_epochs=3, lr=1e-3, optimizer="adam", batch_scheduler="shuffled", seed=0,
                  progress_bar=False, logging=False, checkpointing=False,
                  steps_per_call=int(sys.argv[2]) if len(sys.argv) > 2 else 1)
start = time.perf_counter()
trainer.fit(model, train)
fit_s = time.perf_counter() - start
n_fit = len(compiles)
start = time.perf_counter()
scores = model.score(valid)
score_s = time.perf_counter() - start
print(f"T={T} spc={trainer.config.steps_per_call} fit={fit_s:.1f}s score={score_s:.2f}s compiles fit={n_fit} "
      f"score={len(compiles) - n_fit} script={time.perf_counter() - t_script:.1f}s "
      f"max_compile={max(compiles):.2f}s total_compile={sum(compiles):.1f}s acc={scores['model/all/valid/accuracy']:.4f}")
