"""Gradient balancing on two tasks that compete for a one-unit shared body.

Run: python examples/balancers.py [--plot balancers.png]   (needs matplotlib for the plot)
     python examples/balancers.py --architecture mmoe      (or cgc, ple, cross_stitch,
                                                           dselect_k, shared, all)
     python examples/balancers.py --diagnostics logs/balancers
                                   (then: tensorboard --logdir logs/balancers)

Task "a" reads x0 + 0.5 x1 and carries loss weight 20; task "b" reads x2 - x0 and has a
tenth of the rows. The shared body has one unit, so the tasks cannot both be solved: each
method picks a different trade-off. The plain weighted sum ("equal") and PCGrad (which
only removes conflicting components) keep the heavy task "a"; MGDA's min-norm
combination of the two task gradients (computed together with ``jax.vmap`` inside the
jitted step) ignores the loss scale and moves to task "b". Each method trains with the
"mixed" batch scheduler (one batch of every task per step) and the same seed.

``--architecture`` swaps the body for one of ``jaxmtl.modules`` built from one-unit tanh
experts or towers (``make_body``): an architecture that gives each task its own mixture of
units (MMoE, CGC, PLE, CrossStitch, DSelect-k) can serve both tasks, where the one-unit
hard-shared body (``shared``, the default body written as ``SharedBottom``) cannot.

``--diagnostics LOG_DIR`` trains each method once with the interference diagnostics on
(``TrainerConfig(log_task_gradients=True)``) and writes TensorBoard logs, one run per
method under ``LOG_DIR/<method>``: every 8 steps the tasks' gradient norms and cosine on
the shared body, each method's task weights and the fraction of conflicting steps
(``diagnostics/...``), beside the train losses and valid accuracies. The curves show how
each method settles the conflict: in the last 8 steps of 4 epochs, every PCGrad step has
a conflicting pair (cosine -0.53), while equal weighting, having given up task "b",
conflicts in 12 % of them (cosine +0.13).
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import numpy as np

import jaxmtl

METHODS = ("equal", "pcgrad", "mgda")
ARCHITECTURES = ("shared", "mmoe", "cgc", "ple", "cross_stitch", "dselect_k")


def make_loaders(seed: int = 0) -> list[jaxmtl.DictDataLoader]:
    rng = np.random.default_rng(seed)
    loaders = []
    for split, n in (("train", 4000), ("valid", 2000)):
        X = rng.normal(size=(n, 16)).astype(np.float32)
        y_a = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int)
        y_b = (X[:, 2] - X[:, 0] > 0).astype(int)  # pulls x0 the other way
        n_b = n // 10 if split == "train" else n
        ds_a = jaxmtl.DictDataset("conflict", split, {"x": X}, {"a": y_a})
        ds_b = jaxmtl.DictDataset("conflict", split, {"x": X[:n_b]}, {"b": y_b[:n_b]})
        loaders += [jaxmtl.DictDataLoader(ds_a, batch_size=128, shuffle=True, seed=1),
                    jaxmtl.DictDataLoader(ds_b, batch_size=32, shuffle=True, seed=2)]
    return loaders


def make_body(architecture: str) -> nn.Module:
    """A ``jaxmtl.modules`` architecture for tasks "a" and "b" with one-unit tanh experts."""
    from jaxmtl import modules

    tasks, unit = ("a", "b"), (1,)
    bodies = {
        "shared": lambda: modules.SharedBottom(tasks, unit, nn.tanh),
        "mmoe": lambda: modules.MMoE(tasks, num_experts=2, expert_features=unit,
                                     activation=nn.tanh),
        "cgc": lambda: modules.CGC(tasks, num_shared_experts=1, num_task_experts=1,
                                   expert_features=unit, activation=nn.tanh),
        "ple": lambda: modules.PLE(tasks, num_levels=2, num_shared_experts=1,
                                   num_task_experts=1, expert_features=unit,
                                   activation=nn.tanh),
        "cross_stitch": lambda: modules.CrossStitch(tasks, unit, nn.tanh),
        "dselect_k": lambda: modules.DSelectK(tasks, num_experts=2, k=1, expert_features=unit,
                                              activation=nn.tanh),
    }
    if architecture not in bodies:
        raise ValueError(f"architecture is {architecture!r}; expected one of {sorted(bodies)}")
    return bodies[architecture]()


def make_tasks(architecture: str | None = None) -> list[jaxmtl.Task]:
    """The two tasks; ``architecture`` None is the original one-unit ``nn.Sequential`` body."""
    if architecture is None:
        body, reads = nn.Sequential([nn.Dense(1), nn.tanh]), {"a": "body", "b": "body"}
    else:  # the architecture returns {task: representation}; each head reads its own
        body, reads = make_body(architecture), {"a": ("body", "a"), "b": ("body", "b")}
    return [
        jaxmtl.Task(name, {"body": body, f"head_{name}": nn.Dense(2)},
                    [jaxmtl.Operation("body", [("_input_", "x")]),
                     jaxmtl.Operation(f"head_{name}", [reads[name]])],
                    loss_weight=weight)
        for name, weight in (("a", 20.0), ("b", 1.0))
    ]


def compare(methods=METHODS, n_epochs: int = 8, architecture: str | None = None,
            ) -> dict[str, list[tuple[int, float, float]]]:
    """Per method: (points trained, valid accuracy a, valid accuracy b) per evaluation."""
    loaders = make_loaders()
    history: dict[str, list[tuple[int, float, float]]] = {}
    for method in methods:
        model = jaxmtl.MultitaskClassifier(make_tasks(architecture), seed=0)
        trainer = jaxmtl.Trainer(n_epochs=1, lr=0.01, seed=0, progress_bar=False,
                                 batch_scheduler="mixed", balancer=method)
        history[method] = []
        for epoch in range(n_epochs):
            trainer.fit(model, loaders[:2])  # the compiled step is reused across fits
            scores = model.score(loaders[2:])
            history[method].append((epoch + 1, scores["a/conflict/valid/accuracy"],
                                    scores["b/conflict/valid/accuracy"]))
    return history


def diagnose(log_dir: str, methods=METHODS, n_epochs: int = 4) -> dict[str, dict]:
    """Trains each method with the diagnostics on, logging to TensorBoard under
    ``log_dir/<method>``; returns each method's last logged metrics."""
    loaders = make_loaders()
    metrics = {}
    for method in methods:
        model = jaxmtl.MultitaskClassifier(make_tasks(), seed=0)
        trainer = jaxmtl.Trainer(
            n_epochs=n_epochs, lr=0.01, seed=0, progress_bar=False, batch_scheduler="mixed",
            balancer=method, log_task_gradients=True, logging=True,
            log_writer="tensorboard", log_writer_config={"log_dir": log_dir, "run_name": method},
            log_manager_config={"counter_unit": "batches", "evaluation_freq": 8})
        trainer.fit(model, loaders)
        metrics[method] = trainer.metrics
    return metrics


def plot(history: dict[str, list[tuple[int, float, float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for method, rows in history.items():
        epochs = [r[0] for r in rows]
        axes[0].plot(epochs, [r[1] for r in rows], marker="o", label=method)
        axes[1].plot(epochs, [r[2] for r in rows], marker="o", label=method)
    for axis, title in zip(axes, ("task a (easy, heavy)", "task b (conflicting)"), strict=True):
        axis.set_title(f"valid accuracy, {title}")
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(plot_path: str | None = None, architecture: str | None = None,
         diagnostics: str | None = None) -> dict[str, list[tuple[int, float, float]]]:
    if diagnostics is not None:
        last = diagnose(diagnostics)
        for method, metrics in last.items():
            print(f"{method:>7}: grad norm a {metrics['diagnostics/grad_norm/a']:.3f}, "
                  f"b {metrics['diagnostics/grad_norm/b']:.3f}; cosine "
                  f"{metrics['diagnostics/cosine/a/b']:+.3f}; weights "
                  f"{metrics['diagnostics/weight/a']:.3f}, {metrics['diagnostics/weight/b']:.3f}"
                  f"; conflicting steps {metrics['diagnostics/conflict_fraction']:.2f}")
        print(f"TensorBoard logs: tensorboard --logdir {diagnostics}")
        return last
    if architecture == "all":
        return {f"{name}/{method}": rows for name in ARCHITECTURES
                for method, rows in main(None, name).items()}
    history = compare(architecture=architecture)
    if architecture is not None:
        print(f"architecture: {architecture}")
    for method, rows in history.items():
        _, acc_a, acc_b = rows[-1]
        print(f"{method:>7}: valid accuracy a {acc_a:.3f}, b {acc_b:.3f}")
    if plot_path:
        plot(history, plot_path)
        print(f"plot: {plot_path}")
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plot", default=None, help="write the accuracy plot here (PNG)")
    parser.add_argument("--architecture", default=None, choices=(*ARCHITECTURES, "all"),
                        help="replace the one-unit body by a jaxmtl.modules architecture "
                             "(default: the original nn.Sequential body)")
    parser.add_argument("--diagnostics", default=None, metavar="LOG_DIR",
                        help="train each method with the interference diagnostics on and "
                             "write TensorBoard logs under LOG_DIR/<method>")
    arguments = parser.parse_args()
    main(arguments.plot, arguments.architecture, arguments.diagnostics)
