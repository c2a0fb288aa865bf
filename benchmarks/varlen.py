"""``python -m benchmarks --varlen``: variable-length token inputs, one process each.

The workload (issue 14): token ids with lognormal lengths, 8,000 rows, model embedding 64
-> Dense 128 -> ReLU -> max over the real positions -> Dense 2, batch 32, Adam lr 1e-3
with global-norm clipping 1.0, shuffled, one task. Two length distributions: median 24
with the tail clipped at 239 (mean ~31) and at 512 (mean ~40).

Rows (implementations), each in its own child process per distribution
(``runner.run_child``):

- ``snorkel``: Snorkel 0.10 ``Trainer.fit``; its ``DictDataLoader`` pads each batch to the
  batch's longest row (``collate_dicts``); the module masks token id 0.
- ``jax_pow2``: a hand-written jitted JAX/optax loop, numpy batches padded per batch to the
  next power of two of the batch's longest row (one compile per power of two met).
- ``jaxmtl``: ``Trainer.fit`` with the default loader (per-batch length buckets).
- ``jaxmtl_bucketed``: the same with ``DictDataLoader(..., bucket_by_length=True)``.
- ``jaxmtl_bucketed_warm``: that child again, in a new process: its persistent
  compilation cache (on by default) holds the first run's programs, as on any re-run of
  a script. The other jaxmtl rows run cold (``JAXMTL_COMPILATION_CACHE=0``).

Measured per child: ``first_fit_s`` (the first one-epoch fit in a fresh process: imports
done, everything else included: data set-up, tracing, compiling), steady points/s (R
more one-epoch fits on the same model and trainer; best and median), and the number of
compiled train programs (the jitted step's cache size; 0 for eager PyTorch).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks.runner import Implementation
from benchmarks.workload import child_main, summarize

N_ROWS = 8000
VOCAB = 5000
BATCH = 32
LR = 1e-3
EMBED, HIDDEN = 64, 128
# (name, lognormal sigma, longest row); median 24 for both.
DISTRIBUTIONS = [("max239", 0.70, 239), ("max512", 1.01, 512)]
TARGETS = {"bucketed_vs_snorkel": 3.0, "default_vs_snorkel": 1.5}

MODULE = "benchmarks.varlen"
SNORKEL = Implementation("snorkel", "Snorkel 0.10 Trainer.fit (pads per batch)", MODULE,
                         {"variant": "snorkel"}, needs_torch=True)
JAX_POW2 = Implementation("jax_pow2", "hand-written JAX loop, pads per batch to 2^k", MODULE,
                          {"variant": "jax_pow2"})
# Cold starts: jaxmtl's persistent compilation cache would make every run after the
# first compile nothing (README "Start-up"); the first fit here pays every compile.
COLD = {"JAXMTL_COMPILATION_CACHE": "0"}
JAXMTL = Implementation("jaxmtl", "jaxmtl Trainer.fit, default loader", MODULE,
                        {"variant": "jaxmtl"}, env=COLD)
# The bucketed row runs twice over one persistent cache, emptied when the first starts:
# a cold first run (it fills the cache), then the run a researcher's re-run gets.
CACHE_HOME = os.path.join(tempfile.gettempdir(), "jaxmtl-varlen-cache")
JAXMTL_BUCKETED = Implementation(
    "jaxmtl_bucketed", "jaxmtl, bucket_by_length=True", MODULE,
    {"variant": "jaxmtl", "bucket_by_length": True, "fresh_cache": True},
    env={"XDG_CACHE_HOME": CACHE_HOME})
JAXMTL_BUCKETED_WARM = Implementation(
    "jaxmtl_bucketed_warm", "the same, run again (persistent compilation cache warm)",
    MODULE, {"variant": "jaxmtl", "bucket_by_length": True},
    env={"XDG_CACHE_HOME": CACHE_HOME})
IMPLEMENTATIONS = [SNORKEL, JAX_POW2, JAXMTL, JAXMTL_BUCKETED, JAXMTL_BUCKETED_WARM]


def make_tokens(sigma: float, longest: int, n: int = N_ROWS, seed: int = 0
                ) -> tuple[list[np.ndarray], np.ndarray]:
    """``n`` rows of token ids in [1, VOCAB) with lognormal lengths (median 24, clipped to
    [1, longest], one row exactly ``longest``) and labels: does the row hold an id < 60?"""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(24), sigma, n)), 1, longest).astype(int)
    lengths[0] = longest
    rows = [rng.integers(1, VOCAB, size=length).astype(np.int32) for length in lengths]
    labels = np.array([int(row.min() < 60) for row in rows], np.int64)
    return rows, labels


def length_stats(rows: list[np.ndarray]) -> dict[str, float]:
    """Mean, median and longest row length."""
    lengths = np.array([len(row) for row in rows])
    return {"mean": float(lengths.mean()), "median": float(np.median(lengths)),
            "max": int(lengths.max())}


# --- children ----------------------------------------------------------------------------
def run_snorkel(rows: list[np.ndarray], labels: np.ndarray, repeats: int) -> dict[str, Any]:
    """Snorkel 0.10: first fit and steady epochs."""
    import torch
    from snorkel.classification import (
        DictDataLoader,
        DictDataset,
        MultitaskClassifier,
        Operation,
        Task,
        Trainer,
    )
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, EMBED, padding_idx=0)
            self.dense = nn.Linear(EMBED, HIDDEN)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.dense(self.embed(tokens)))
            return h.masked_fill((tokens == 0)[..., None], -1e9).max(dim=1).values

    start = time.perf_counter()
    torch.manual_seed(0)
    task = Task("task", nn.ModuleDict({"encoder": Encoder(), "head": nn.Linear(HIDDEN, 2)}),
                [Operation("encoder", [("_input_", "tokens")]), Operation("head", ["encoder"])])
    model = MultitaskClassifier([task])
    dataset = DictDataset("text", "train", {"tokens": [torch.from_numpy(r).long() for r in rows]},
                          {"task": torch.from_numpy(labels)})
    loader = DictDataLoader(dataset, batch_size=BATCH, shuffle=True)
    trainer = Trainer(n_epochs=1, lr=LR, grad_clip=1.0, progress_bar=False)
    trainer.fit(model, [loader])
    first = time.perf_counter() - start
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        trainer.fit(model, [loader])
        seconds.append(time.perf_counter() - t0)
    return {"first_fit_s": first, "compiled_train_programs": 0,
            **summarize(seconds, len(rows))}


def run_jax_pow2(rows: list[np.ndarray], labels: np.ndarray, repeats: int) -> dict[str, Any]:
    """A hand-written JAX loop padding each batch to the next power of two."""
    import jax
    import jax.numpy as jnp
    import optax

    start = time.perf_counter()
    n = len(rows)
    lengths = np.array([len(r) for r in rows])
    padded = np.zeros((n, 1 << int(np.ceil(np.log2(lengths.max())))), np.int32)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = row
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {
        "embed": jax.random.normal(keys[0], (VOCAB, EMBED)) * 0.02,
        "w1": jax.random.normal(keys[1], (EMBED, HIDDEN)) / np.sqrt(EMBED),
        "b1": jnp.zeros(HIDDEN),
        "w2": jax.random.normal(keys[2], (HIDDEN, 2)) / np.sqrt(HIDDEN),
        "b2": jnp.zeros(2),
    }
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(LR))
    opt_state = tx.init(params)

    def loss_fn(p: Any, tokens: Any, y: Any, valid: Any) -> Any:
        h = jax.nn.relu(p["embed"][tokens] @ p["w1"] + p["b1"])
        pooled = jnp.max(jnp.where((tokens > 0)[..., None], h, -1e9), axis=1)
        losses = optax.softmax_cross_entropy_with_integer_labels(pooled @ p["w2"] + p["b2"], y)
        return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(valid.sum(), 1)

    @jax.jit
    def step(p: Any, s: Any, tokens: Any, y: Any, valid: Any) -> tuple[Any, Any]:
        grads = jax.grad(loss_fn)(p, tokens, y, valid)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    def epoch(epoch_index: int, p: Any, s: Any) -> tuple[Any, Any]:
        order = np.random.default_rng((0, epoch_index)).permutation(n)
        for i in range(0, n, BATCH):
            batch = np.resize(order[i : i + BATCH], BATCH)
            valid = np.arange(BATCH) < len(order[i : i + BATCH])
            width = 1 << int(np.ceil(np.log2(max(lengths[batch].max(), 1))))
            p, s = step(p, s, padded[batch, :width], labels[batch], valid)
        jax.block_until_ready(p)
        return p, s

    params, opt_state = epoch(0, params, opt_state)
    first = time.perf_counter() - start
    seconds = []
    for e in range(repeats):
        t0 = time.perf_counter()
        params, opt_state = epoch(1 + e, params, opt_state)
        seconds.append(time.perf_counter() - t0)
    return {"first_fit_s": first, "compiled_train_programs": step._cache_size(),
            **summarize(seconds, n)}


def run_jaxmtl(rows: list[np.ndarray], labels: np.ndarray, repeats: int,
               bucket_by_length: bool) -> dict[str, Any]:
    """jaxmtl ``Trainer.fit``: first fit, then steady one-epoch fits (the cached step)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import jaxmtl

    class Encoder(nn.Module):
        @nn.compact
        def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
            h = nn.relu(nn.Dense(HIDDEN)(nn.Embed(VOCAB, EMBED)(tokens)))
            return jnp.max(jnp.where(mask[..., None], h, -1e9), axis=1)

    start = time.perf_counter()
    task = jaxmtl.Task(
        "task", {"encoder": Encoder(), "head": nn.Dense(2)},
        [jaxmtl.Operation("encoder", [("_input_", "tokens"), ("_input_", "tokens_mask")]),
         jaxmtl.Operation("head", ["encoder"])])
    model = jaxmtl.MultitaskClassifier([task], seed=0)
    dataset = jaxmtl.DictDataset("text", "train", {"tokens": rows}, {"task": labels})
    loader = jaxmtl.DictDataLoader(dataset, batch_size=BATCH, shuffle=True, seed=0,
                                   bucket_by_length=bucket_by_length)
    trainer = jaxmtl.Trainer(n_epochs=1, lr=LR, grad_clip=1.0, seed=0, progress_bar=False)
    trainer.fit(model, [loader])
    jax.block_until_ready(trainer.state)
    first = time.perf_counter() - start
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        trainer.fit(model, [loader])
        jax.block_until_ready(trainer.state)
        seconds.append(time.perf_counter() - t0)
    return {"first_fit_s": first, "compiled_train_programs": trainer.compiled_programs(),
            "bucket_lengths": [int(v) for v in loader.bucket_lengths["tokens"]],
            **summarize(seconds, len(rows))}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Child entry: every distribution of ``spec`` with the variant ``spec["variant"]``."""
    variant, repeats = spec["variant"], spec["repeats"]
    if spec.get("fresh_cache"):
        shutil.rmtree(CACHE_HOME, ignore_errors=True)
    if variant == "snorkel":
        import snorkel  # noqa: F401 - a missing snorkel reports the child as skipped
    results = []
    for name, sigma, longest in spec["distributions"]:
        rows, labels = make_tokens(sigma, longest, spec.get("n_rows", N_ROWS))
        if variant == "snorkel":
            result = run_snorkel(rows, labels, repeats)
        elif variant == "jax_pow2":
            result = run_jax_pow2(rows, labels, repeats)
        else:
            result = run_jaxmtl(rows, labels, repeats, spec.get("bucket_by_length", False))
        results.append({"distribution": name, "lengths": length_stats(rows), **result})
    return {"results": results}


# --- report --------------------------------------------------------------------------------
def render_markdown(run_record: dict[str, Any]) -> str:
    """The table (per distribution), the target checks and the machine's load."""
    spec, machine = run_record["spec"], run_record["machine"]
    lines = [f"# Variable-length inputs ({run_record['created']})", "",
             f"{N_ROWS} rows, batch {BATCH}, embedding {EMBED} -> Dense {HIDDEN} -> ReLU -> "
             f"masked max -> Dense 2, Adam {LR}, clip 1.0; {spec['repeats']} steady epochs. "
             f"Machine: {machine.get('cpu_model')}, {machine.get('usable_cores')} usable "
             f"cores, load average at start {machine.get('load_average')}; commit "
             f"{machine.get('commit')}.", ""]
    records = run_record["records"]  # one per implementation and distribution
    checks = []
    for name, _, _ in spec["distributions"]:
        rows = {}
        for record in records:
            key, result = record["key"], record["result"]
            for item in result.get("results", []):
                if item["distribution"] == name:
                    rows[key] = (item, record)
        stats = next(iter(rows.values()))[0]["lengths"] if rows else {}
        lines += [f"## {name}: mean {stats.get('mean', 0):.1f}, median "
                  f"{stats.get('median', 0):.0f}, max {stats.get('max', 0)}", "",
                  "| implementation | steady points/s (best) | median | x Snorkel | first fit s "
                  "| compiled train programs | other load (cores) |",
                  "|---|---|---|---|---|---|---|"]
        snorkel = rows.get("snorkel", (None,))[0]
        for key, (item, record) in rows.items():
            ratio = (item["train_points_per_s_best"] / snorkel["train_points_per_s_best"]
                     if snorkel else float("nan"))
            load = record.get("foreign_load")
            lines.append(
                f"| {key} | {item['train_points_per_s_best']:,.0f} | "
                f"{item['train_points_per_s']:,.0f} | {ratio:.2f} | {item['first_fit_s']:.2f} "
                f"| {item['compiled_train_programs']} | "
                f"{'n/a' if load is None else f'{load:.2f}'} |")
        for key, (item, _) in rows.items():
            if "bucket_lengths" in item:
                lines.append(f"\n{key} bucket lengths: {item['bucket_lengths']}")
        lines.append("")
        if name == "max512" and snorkel:
            for key, target in (("jaxmtl_bucketed", TARGETS["bucketed_vs_snorkel"]),
                                ("jaxmtl_bucketed_warm", TARGETS["bucketed_vs_snorkel"]),
                                ("jaxmtl", TARGETS["default_vs_snorkel"])):
                if key in rows:
                    item = rows[key][0]
                    ratio = item["train_points_per_s_best"] / snorkel["train_points_per_s_best"]
                    checks.append(f"- {key} steady >= {target}x Snorkel: {ratio:.2f}x "
                                  f"{'PASS' if ratio >= target else 'FAIL'}")
                    checks.append(f"- {key} first fit <= Snorkel's: {item['first_fit_s']:.2f} s "
                                  f"vs {snorkel['first_fit_s']:.2f} s "
                                  f"{'PASS' if item['first_fit_s'] <= snorkel['first_fit_s'] else 'FAIL'}")
                    programs = item["compiled_train_programs"]
                    checks.append(f"- {key} compiled train programs <= 8: {programs} "
                                  f"{'PASS' if programs <= 8 else 'FAIL'}")
    errors = [f"- {r['key']}: {r['result'].get('error') or r['result'].get('skipped')}"
              for r in records if "results" not in r["result"]]
    lines += ["## Targets (max512)", "", *checks]
    if errors:
        lines += ["", "## Not measured", "", *errors]
    return "\n".join(lines) + "\n"


def spec(repeats: int | None) -> dict[str, Any]:
    """The run specification the children get."""
    return {"distributions": DISTRIBUTIONS, "repeats": repeats or 3}


def run_per_distribution(run_set: Any, impls: list[Implementation], repeats: int | None,
                         *run_set_args: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The spec and the records of one child per implementation *and* distribution
    (``run_set(impls, spec, *run_set_args)`` per distribution), so that no figure carries
    what an earlier distribution left in its process (allocator state, caches)."""
    full = spec(repeats)
    records = []
    for distribution in full["distributions"]:
        records += run_set(impls, {**full, "distributions": [distribution]}, *run_set_args)
    return full, records


if __name__ == "__main__":
    child_main("varlen", run)
