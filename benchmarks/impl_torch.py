"""A plain hand-written PyTorch training loop on the reference workload (no Snorkel).

Same model, losses, optimizer (``Adam``, ``clip_grad_norm_(1.0)``) and shuffled batch order
as the other implementations; the data are tensors on the device and batches are indexed
out of them (``X[rows]``), the last batch of each task short (no padding needed in eager
mode). Uses CUDA when torch sees it, else the CPU with torch's default thread count.

Run by the runner as ``python -m benchmarks.impl_torch --spec JSON --out FILE``.
"""

from __future__ import annotations

import statistics
from typing import Any

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


def torch_info() -> dict[str, Any]:
    """torch version, thread count and device."""
    import torch

    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "torch_device": "cuda" if torch.cuda.is_available() else "cpu"}


def build_modules(config: dict[str, Any]) -> tuple[Any, Any, Any]:
    """body Dense-ReLU-Dense-ReLU and the two heads, as ``torch.nn`` modules."""
    from torch import nn

    width = config["width"]
    body = nn.Sequential(nn.Linear(config["d"], width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU())
    return body, nn.Linear(width, 2), nn.Linear(width, 4)


def sync(device: Any) -> None:
    """Waits for queued device work (CUDA only; the CPU runs eagerly)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(config: dict[str, Any], repeats: int, with_predict: bool) -> dict[str, Any]:
    """Warm-up epoch, then ``repeats`` timed epochs; then prediction throughput."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    X_np, hard_np, soft_np = make_data(config["n"], config["d"])
    X = torch.from_numpy(X_np).to(device)
    hard = torch.from_numpy(hard_np).to(device)
    soft = torch.from_numpy(soft_np).to(device)
    body, head_a, head_b = (m.to(device) for m in build_modules(config))
    params = [*body.parameters(), *head_a.parameters(), *head_b.parameters()]
    optimizer = torch.optim.Adam(params, lr=config["lr"])
    n, bs = config["n"], config["batch_size"]

    def epoch(index: int) -> None:
        tasks, rows, mask = epoch_plan(n, bs, index)
        rows_t = torch.from_numpy(rows).to(device)
        for step, task in enumerate(tasks):
            valid = int(mask[step].sum())
            r = rows_t[step, :valid]
            optimizer.zero_grad()
            h = body(X[r])
            if task == 0:
                loss = F.cross_entropy(head_a(h), hard[r])
            else:
                loss = -(soft[r] * F.log_softmax(head_b(h), dim=1)).sum(dim=1).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config["grad_clip"])
            optimizer.step()
        sync(device)

    seconds = [timed(lambda i=i: epoch(i))[0] for i in range(1 + repeats)]
    result = {"config": config, **summarize(seconds[1:], 2 * n), "warmup_epoch_s": seconds[0],
              "compile_s": seconds[0] - statistics.median(seconds[1:]),
              "steps_per_epoch": 2 * n_batches(n, bs)}
    if with_predict:
        result.update(measure_predict((body, head_a, head_b), X, hard_np, config, repeats))
    return result


def measure_predict(modules: tuple, X: Any, hard_np: Any, config: dict[str, Any],
                    repeats: int) -> dict[str, Any]:
    """Both tasks' softmax over X in batches of ``predict_batch``, returned as numpy."""
    import numpy as np
    import torch

    body, head_a, head_b = modules
    for module in modules:
        module.eval()
    size = config["predict_batch"]

    @torch.no_grad()
    def run() -> list:
        outs = []
        for start in range(0, X.shape[0], size):
            h = body(X[start:start + size])
            outs.append((torch.softmax(head_a(h), 1).cpu().numpy(),
                         torch.softmax(head_b(h), 1).cpu().numpy()))
        return outs

    outs = run()
    probs_a = np.concatenate([a for a, _ in outs])
    return {**predict_stats([timed(run)[0] for _ in range(repeats)], X.shape[0]),
            "task_a_train_accuracy": train_accuracy(probs_a, hard_np)}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs every config of ``spec``."""
    info = torch_info()
    results = [run_config(config, spec["repeats"], spec.get("predict", True))
               for config in spec["configs"]]
    return {"info": info, "results": results}


if __name__ == "__main__":
    child_main("torch", run)
