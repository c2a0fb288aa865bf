"""Variable-length inputs: bucket lengths, masks, bucketed batching, compiles, fused mode."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import xla_flags

import jaxmtl
from jaxmtl.buckets import auto_boundaries, bucket_widths, optimal_boundaries

VOCAB = 20


def ragged_rows(n: int, seed: int, longest: int = 40) -> tuple[list[np.ndarray], np.ndarray]:
    """Token rows with long-tailed lengths (one row of length ``longest``) and labels."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(4), 0.8, n).round().astype(int), 1, longest)
    lengths[0] = longest
    rows = [rng.integers(1, VOCAB, size=length) for length in lengths]
    labels = np.array([int(row.max() > VOCAB // 2) for row in rows])
    return rows, labels


def ragged_dataset(n: int = 200, seed: int = 0, split: str = "train") -> jaxmtl.DictDataset:
    rows, labels = ragged_rows(n, seed)
    return jaxmtl.DictDataset("text", split, {"tokens": rows}, {"task": labels})


class MaskedMaxEncoder(nn.Module):
    """Embed -> Dense -> ReLU -> max over the real positions (the mask hides padding)."""

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        h = nn.relu(nn.Dense(8)(nn.Embed(VOCAB, 4)(tokens)))
        return jnp.max(jnp.where(mask[..., None], h, -1e9), axis=1)


def text_model() -> jaxmtl.MultitaskClassifier:
    task = jaxmtl.Task(
        "task", {"encoder": MaskedMaxEncoder(), "head": nn.Dense(2)},
        [jaxmtl.Operation("encoder", [("_input_", "tokens"), ("_input_", "tokens_mask")]),
         jaxmtl.Operation("head", ["encoder"])])
    return jaxmtl.MultitaskClassifier([task])


# --- dataset storage and masks -------------------------------------------------------------
def test_dataset_keeps_lengths_and_a_mask_for_ragged_inputs_only():
    ds = jaxmtl.DictDataset("d", "train",
                            {"tokens": [np.array([1, 2, 3]), np.array([4])],
                             "dense": np.ones((2, 3))}, {"t": np.array([0, 1])})
    assert list(ds.X_dict) == ["tokens", "dense", "tokens_mask"]
    np.testing.assert_array_equal(ds.lengths["tokens"], [3, 1])
    assert list(ds.lengths) == ["tokens"]
    np.testing.assert_array_equal(ds.X_dict["tokens_mask"],
                                  [[True, True, True], [True, False, False]])


def test_mask_key_colliding_with_a_user_key_is_an_error():
    with pytest.raises(ValueError, match=r"X_dict has keys \['tokens_mask'\], the names of the "
                                         r"masks of the variable-length inputs \['tokens'\]"):
        jaxmtl.DictDataset("d", "train", {"tokens": [np.array([1, 2]), np.array([3])],
                                          "tokens_mask": np.ones((2, 2))}, {"t": [0, 1]})


def test_batches_are_cut_to_the_smallest_bucket_holding_their_longest_row():
    rows = [np.arange(1, n + 1) for n in (2, 3, 9, 1, 5, 4)]
    ds = jaxmtl.DictDataset("d", "train", {"tokens": rows}, {"t": np.zeros(6, int)})
    dl = jaxmtl.DictDataLoader(ds, batch_size=2, length_buckets=[4, 6])
    assert dl.bucket_lengths == {"tokens": (4, 6, 9)}  # the longest row is always a bucket
    assert dl.bucket_shapes == [(4,), (6,), (9,)]
    batches = list(dl)
    assert [X["tokens"].shape for X, _ in batches] == [(2, 4), (2, 9), (2, 6)]
    X, _ = batches[2]  # rows of lengths 5 and 4, cut to 6
    np.testing.assert_array_equal(X["tokens"], [[1, 2, 3, 4, 5, 0], [1, 2, 3, 4, 0, 0]])
    np.testing.assert_array_equal(X["tokens_mask"], np.arange(6) < np.array([[5], [4]]))


def test_length_buckets_one_pads_to_the_longest_row():
    dl = jaxmtl.DictDataLoader(ragged_dataset(), batch_size=16, length_buckets=1)
    assert dl.bucket_shapes == [(40,)]
    assert {X["tokens"].shape for X, _ in dl} == {(16, 40)}


def test_bucket_argument_errors():
    ds = ragged_dataset(20)
    with pytest.raises(ValueError, match=r"length_buckets for 'tokens' must be a non-empty list "
                                         r"of ints >= 1 \(bucket lengths\), got \[0, 4\]"):
        jaxmtl.DictDataLoader(ds, length_buckets=[0, 4])
    with pytest.raises(ValueError, match=r"length_buckets names \['words'\], which are not "
                                         r"variable-length inputs of dataset 'text'"):
        jaxmtl.DictDataLoader(ds, length_buckets={"words": [4]})
    with pytest.raises(ValueError, match="length_buckets must be an int >= 1, got 0"):
        jaxmtl.DictDataLoader(ds, length_buckets=0)


def test_optimal_boundaries_minimise_expected_padding():
    # Lengths 1..4 with weights: one bucket pads all to 4 (cost 4 * 10 = 40); two buckets
    # {1, 4}: 1*5 + 4*5 = 25, {2, 4}: 2*6 + 4*4 = 28, {3, 4}: 3*7 + 4*3 = 33.
    candidates, weights = np.array([1, 2, 3, 4]), np.array([5.0, 1.0, 1.0, 3.0])
    assert optimal_boundaries(candidates, weights, 1) == (4,)
    assert optimal_boundaries(candidates, weights, 2) == (1, 4)
    assert optimal_boundaries(candidates, weights, 4) == (1, 2, 3, 4)
    # Brute force over every 3-bucket choice ending in the largest candidate.
    rng = np.random.default_rng(0)
    candidates = np.arange(1, 13)
    weights = rng.uniform(0, 1, 12)

    def cost(bounds):
        return sum(w * min(b for b in bounds if b >= c) for c, w in zip(candidates, weights, strict=True))

    best = min(((a, b, 12) for a in range(1, 12) for b in range(a + 1, 12)), key=cost)
    assert cost(optimal_boundaries(candidates, weights, 3)) == pytest.approx(cost(best))


def test_auto_boundaries_in_dataset_order_use_the_actual_batch_maxima():
    lengths = np.array([1, 2, 7, 3, 3, 3, 9, 1])  # batch maxima (batch 2): 2, 7, 3, 9
    assert auto_boundaries(lengths, 4, 2, shuffle=False, bucket_by_length=False) == (2, 3, 7, 9)
    # Per row (bucket_by_length): 1 and 3 are the most frequent lengths.
    assert auto_boundaries(lengths, 2, 2, shuffle=False, bucket_by_length=True) == (3, 9)


def test_default_is_at_most_eight_shapes_split_over_the_ragged_inputs():
    rows, labels = ragged_rows(300, 1)
    other, _ = ragged_rows(300, 2, longest=30)
    one = jaxmtl.DictDataLoader(ragged_dataset(300), batch_size=8, shuffle=True, seed=0)
    assert len(one.bucket_lengths["tokens"]) == 8 and len(one.bucket_shapes) == 8
    two = jaxmtl.DictDataLoader(
        jaxmtl.DictDataset("d", "train", {"a": rows, "b": other}, {"t": labels}),
        batch_size=8, shuffle=True, seed=0)
    assert [len(two.bucket_lengths[k]) for k in ("a", "b")] == [2, 2]
    shapes = {(X["a"].shape[1], X["b"].shape[1]) for X, _ in two}
    assert shapes <= set(two.bucket_shapes) and len(two.bucket_shapes) == 4


def test_fixed_length_data_is_unchanged():
    X = np.arange(30, dtype=np.float32).reshape(10, 3)
    ds = jaxmtl.DictDataset("d", "train", {"x": X}, {"t": np.arange(10) % 2})
    dl = jaxmtl.DictDataLoader(ds, batch_size=4, shuffle=True, seed=7, bucket_by_length=True)
    assert dl.ragged_keys == () and dl.bucket_shapes == [()] and list(ds.X_dict) == ["x"]
    dl.set_epoch(2)
    order = np.random.default_rng((7, 2)).permutation(10)
    expected = [order[:4], order[4:8], np.resize(order[8:], 4)]  # a partial batch repeats
    for (X_batch, _), rows in zip(dl, expected, strict=True):
        np.testing.assert_array_equal(X_batch["x"], X[rows])


# --- bucketed batching ---------------------------------------------------------------------
def test_bucketed_batching_is_a_reproducible_permutation_with_little_padding():
    ds = ragged_dataset(203)
    dl = jaxmtl.DictDataLoader(ds, batch_size=16, shuffle=True, seed=5, bucket_by_length=True)
    orders = [dl.order(epoch) for epoch in range(3)]
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(203))
    assert len({tuple(order) for order in orders}) == 3  # a new order each epoch
    again = jaxmtl.DictDataLoader(ds, batch_size=16, shuffle=True, seed=5, bucket_by_length=True)
    np.testing.assert_array_equal(again.order(1), orders[1])  # pure function of (seed, epoch)
    # Rows are grouped by bucket: only batches on a group's edge (or the partial one's
    # cut) mix buckets.
    row_bucket = np.searchsorted(dl.bucket_lengths["tokens"], ds.lengths["tokens"])
    mixed = [np.ptp(row_bucket[dl.rows_at(orders[0], i)[0]]) > 0 for i in range(len(dl))]
    assert sum(mixed) <= len(dl.bucket_lengths["tokens"]) < len(dl)
    padded = {bbl: sum(X["tokens"].size for X, _ in jaxmtl.DictDataLoader(
        ds, batch_size=16, shuffle=True, seed=5, bucket_by_length=bbl)) for bbl in (False, True)}
    assert padded[True] < 0.5 * padded[False]


def test_bucketed_batching_drop_last_drops_different_rows():
    dl = jaxmtl.DictDataLoader(ragged_dataset(50), batch_size=8, shuffle=True, seed=1,
                               drop_last=True, bucket_by_length=True)
    dropped = [tuple(sorted(dl.order(epoch)[48:])) for epoch in range(6)]
    assert len(set(dropped)) > 1


# --- training, compiles, predict, fused, resume ----------------------------------------------
def fit(loaders, n_epochs=3, **config):
    model = text_model()
    trainer = jaxmtl.Trainer(n_epochs=n_epochs, lr=0.05, seed=0, progress_bar=False, **config)
    trainer.fit(model, loaders)
    return model, trainer


def test_compiles_stay_bounded_over_epochs_and_training_learns():
    dl = jaxmtl.DictDataLoader(ragged_dataset(), batch_size=16, shuffle=True, seed=2,
                               length_buckets=3)
    model, trainer = fit([dl], n_epochs=4)
    compiled = trainer.compiled_steps
    seen = {dl.shape_index(dl.rows_at(dl.order(e), i)[0]) for e in range(4)
            for i in range(len(dl))}
    # One program serves every bucket shape (buckets.at_bucket_shape), compiled ahead.
    assert len(seen) == len(dl.bucket_shapes) == 3
    assert compiled.programs() == trainer.compiled_programs() == 1
    scores = model.score([jaxmtl.DictDataLoader(ragged_dataset(split="valid"), 32)])
    assert scores["task/text/valid/accuracy"] > 0.8


def test_predict_with_buckets_equals_padding_to_the_longest_row():
    ds = ragged_dataset(90, seed=3, split="test")
    model, _ = fit([jaxmtl.DictDataLoader(ragged_dataset(), batch_size=16, shuffle=True,
                                          seed=2, length_buckets=2)], n_epochs=1)
    bucketed = jaxmtl.DictDataLoader(ds, batch_size=32)
    assert len({X["tokens"].shape for X, _ in bucketed}) > 1
    got = model.predict(bucketed)
    expected = model.predict(jaxmtl.DictDataLoader(ds, batch_size=32, length_buckets=1))
    np.testing.assert_allclose(got["probs"]["task"], expected["probs"]["task"], rtol=1e-6)
    # One program for all of the loader's shapes (buckets.at_bucket_shape).
    program = model.eval_programs.program("probs", ("task",), model.parallel,
                                          bucket_widths(bucketed))
    assert program._cache_size() == 1
    np.testing.assert_array_equal(got["golds"]["task"], ds.Y_dict["task"])


def test_rows_of_one_length_keep_their_mask_and_predict_as_in_a_ragged_set():
    # A user's most common call after training: predict on one new comment (or a few of
    # one length). Its dataset must still give the mask the model reads.
    rows, labels = ragged_rows(90, seed=3)
    model, _ = fit([jaxmtl.DictDataLoader(ragged_dataset(), batch_size=16, shuffle=True,
                                          seed=2, length_buckets=2)], n_epochs=1)
    reference = model.predict(jaxmtl.DictDataLoader(
        jaxmtl.DictDataset("text", "test", {"tokens": rows}, {"task": labels}), 32))
    same_length = [i for i, row in enumerate(rows) if len(row) == 4][:3]
    assert len(same_length) == 3
    for picked in ([0], same_length):
        ds = jaxmtl.DictDataset("new", "test", {"tokens": [rows[i] for i in picked]},
                                {"task": labels[picked]})
        np.testing.assert_array_equal(ds.lengths["tokens"], [len(rows[i]) for i in picked])
        assert ds.X_dict["tokens_mask"].shape == ds.X_dict["tokens"].shape
        assert ds.X_dict["tokens_mask"].all()
        got = model.predict(jaxmtl.DictDataLoader(ds, 32))
        np.testing.assert_allclose(got["probs"]["task"], reference["probs"]["task"][picked],
                                   rtol=1e-5, atol=1e-7)
    # A stacked array stays a fixed-shape input, without a mask.
    stacked = jaxmtl.DictDataset("d", "test", {"tokens": np.ones((2, 4), np.int32)},
                                 {"task": np.array([0, 1])})
    assert list(stacked.X_dict) == ["tokens"] and stacked.lengths == {}


def test_fused_mode_with_buckets_matches_per_step():
    def loaders():
        return [jaxmtl.DictDataLoader(ragged_dataset(), batch_size=16, shuffle=True, seed=2,
                                      length_buckets=3, bucket_by_length=True)]

    _, per_step = fit(loaders(), n_epochs=2)
    _, fused = fit(loaders(), n_epochs=2, steps_per_call=8)
    (groups, program), = fused.compiled_steps.by_layout.items()
    assert program._cache_size() == 1  # one program, a branch per bucket shape
    assert len(groups) == len(loaders()[0].bucket_shapes) == 3
    assert int(fused.state.step) == int(per_step.state.step) == 2 * 13
    for a, b in zip(jax.tree.leaves(per_step.state.params),
                    jax.tree.leaves(fused.state.params), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


class FailingLoader(jaxmtl.DictDataLoader):
    """Raises when its ``fail_at``-th batch is drawn (a crash mid-epoch)."""

    fail_at, drawn = -1, 0

    def batch_at(self, order, index):
        FailingLoader.drawn += 1
        if FailingLoader.drawn == FailingLoader.fail_at:
            raise RuntimeError("crash")
        return super().batch_at(order, index)


def test_bucketed_run_resumes_exactly(tmp_path, caplog):
    def run(loader_class, directory, resume=False):
        dl = loader_class(ragged_dataset(96), batch_size=16, shuffle=True, seed=4,
                          length_buckets=3, bucket_by_length=True)
        model = text_model()
        trainer = jaxmtl.Trainer(
            n_epochs=2, lr=0.05, seed=1, progress_bar=False, checkpointing=True,
            log_manager_config={"counter_unit": "batches", "evaluation_freq": 2},
            checkpointer_config={"checkpoint_dir": str(directory), "checkpoint_clear": False})
        trainer.fit(model, [dl], resume_from=str(directory) if resume else None)
        return trainer.state.params

    expected = run(jaxmtl.DictDataLoader, tmp_path / "full")
    FailingLoader.fail_at = 13  # 2 draws to init + 6 batches an epoch: batch 5 of epoch 1
    with pytest.raises(RuntimeError, match="crash"):
        run(FailingLoader, tmp_path / "crash")
    steps = sorted(int(s) for s in os.listdir(tmp_path / "crash" / "checkpoints") if s.isdigit())
    meta = json.loads((tmp_path / "crash" / "checkpoints" / str(steps[-1]) / "meta" /
                       "metadata").read_text())
    assert meta["trainer"]["epoch"] == 1 and meta["trainer"]["batch_in_epoch"] > 0
    with caplog.at_level(logging.WARNING):
        got = run(jaxmtl.DictDataLoader, tmp_path / "crash", resume=True)
    # Orbax warns about each item on disk without a handler; every item has one.
    assert "could not be restored" not in caplog.text
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(b, a)


MULTIDEVICE = """
import jax, numpy as np, jaxmtl
from test_loader_buckets import ragged_dataset, text_model
params = {}
for parallel in ("single", "pmap", "sharded"):
    dl = jaxmtl.DictDataLoader(ragged_dataset(), batch_size=16, shuffle=True, seed=2,
                               length_buckets=3, bucket_by_length=True)
    model = text_model()
    trainer = jaxmtl.Trainer(n_epochs=1, lr=0.05, seed=0, progress_bar=False,
                             parallel=parallel)
    trainer.fit(model, [dl])
    params[parallel] = jax.tree.leaves(trainer.state.params)
    probs = model.predict(jaxmtl.DictDataLoader(ragged_dataset(50, 3, "test"), 16))
    params[parallel].append(probs["probs"]["task"])
for mode in ("pmap", "sharded"):
    print(mode, max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                    for a, b in zip(params["single"], params[mode], strict=True)))
"""


@pytest.mark.slow
def test_multi_device_modes_use_the_same_buckets():
    env = dict(os.environ, XLA_FLAGS=xla_flags(2))
    done = subprocess.run([sys.executable, "-c", MULTIDEVICE], cwd=Path(__file__).parent,
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    differences = dict(line.split() for line in done.stdout.splitlines())
    assert {mode: float(d) < 1e-5 for mode, d in differences.items()} == {
        "pmap": True, "sharded": True}, differences


def test_example_batch_has_each_bucket_shape_of_real_batches():
    dl = jaxmtl.DictDataLoader(ragged_dataset(), batch_size=16, shuffle=True, seed=0)
    seen = {}
    for X, Y in dl:
        seen[X["tokens"].shape[1]] = ({k: (v.shape, v.dtype) for k, v in X.items()},
                                      {k: (v.shape, v.dtype) for k, v in Y.items()})
    for shape, (length,) in enumerate(dl.bucket_shapes):
        X, Y = dl.example_batch(shape)
        assert X["tokens"].shape == X["tokens_mask"].shape == (16, length)
        if length in seen:
            assert ({k: (v.shape, v.dtype) for k, v in X.items()},
                    {k: (v.shape, v.dtype) for k, v in Y.items()}) == seen[length]
    with pytest.raises(ValueError, match=r"example_batch: shape must be in \[0, "
                                         rf"{len(dl.bucket_shapes)}\), got -1"):
        dl.example_batch(-1)


def test_bucket_steps_compiled_ahead_give_the_same_run(monkeypatch):
    from jaxmtl.training.runners import PerStepRunner

    def run():
        dl = jaxmtl.DictDataLoader(ragged_dataset(), batch_size=16, shuffle=True, seed=2,
                                   length_buckets=3)
        model, trainer = fit([dl], n_epochs=1)
        return model, trainer

    model, trainer = run()
    assert trainer.compiled_programs() == 1
    jobs = []
    monkeypatch.setattr(PerStepRunner, "_bucket_jobs",
                        lambda self, state, acc: jobs.append(1) or [])
    reference, _ = run()
    assert jobs == [1]
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(reference.params),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_compile_ahead_queues_one_job_per_bucket_shape(monkeypatch):
    """Every shape's program, the first batch's included, each once (the jobs are keyed by
    program and argument shapes: a key that ignored shapes would queue one job)."""
    import jaxmtl.training.runners as runners

    queued = []
    monkeypatch.setattr(runners, "compile_in_background",
                        lambda jobs, **kwargs: queued.extend(jobs))
    dl = jaxmtl.DictDataLoader(ragged_dataset(), batch_size=16, shuffle=True, seed=2,
                               length_buckets=3)
    fit([dl], n_epochs=1)
    # The switched program takes every batch at the longest shape: one job.
    assert [args[2][0][0]["tokens"].shape[1] for _, args, _ in queued] == [
        dl.bucket_shapes[-1][0]]
    assert [kwargs["shape"] for _, _, kwargs in queued] == [2]
    queued.clear()
    monkeypatch.setattr(runners.PerStepRunner, "switch_bucket_shapes", False)
    fit([dl], n_epochs=1)
    widths = sorted(args[2][0][0]["tokens"].shape[1] for _, args, _ in queued)
    assert widths == sorted(length for (length,) in dl.bucket_shapes)


@pytest.mark.parametrize("balancer", [None, "pcgrad"])
def test_switched_bucket_program_equals_one_program_per_shape(monkeypatch, balancer):
    """One program whose passes switch on the batch's bucket shape (sent at the longest)
    trains as one program per shape does, with a balancer too."""
    import jaxmtl.training.runners as runners

    def run():
        dl = jaxmtl.DictDataLoader(ragged_dataset(), batch_size=16, shuffle=True, seed=2,
                                   length_buckets=3)
        config = {} if balancer is None else {"balancer": balancer}
        return fit([dl], n_epochs=2 if balancer is None else 1, **config)

    model, trainer = run()
    monkeypatch.setattr(runners.PerStepRunner, "switch_bucket_shapes", False)
    reference, reference_trainer = run()
    assert (trainer.compiled_programs(), reference_trainer.compiled_programs()) == (1, 3)
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(reference.params),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if balancer is None:  # trained: equal because both are right, not because neither moved
        scores = model.score([jaxmtl.DictDataLoader(ragged_dataset(split="valid"), 32)])
        assert scores["task/text/valid/accuracy"] > 0.8


def test_task_family_loaders_share_one_switched_program(monkeypatch):
    """Two tasks of one family (shared encoder, a head each), a bucketed loader each: one
    family program switching on the bucket shape, equal to one program per shape."""
    import jaxmtl.training.runners as runners

    def run():
        rows, labels = ragged_rows(120, 5)
        modules = {"encoder": MaskedMaxEncoder(), "head_a": nn.Dense(2), "head_b": nn.Dense(2)}
        tasks = [jaxmtl.Task(name, modules, [
            jaxmtl.Operation("encoder", [("_input_", "tokens"), ("_input_", "tokens_mask")]),
            jaxmtl.Operation(f"head_{name[-1]}", ["encoder"])]) for name in ("task_a", "task_b")]
        model = jaxmtl.MultitaskClassifier(tasks)
        loaders = [jaxmtl.DictDataLoader(
            jaxmtl.DictDataset(f"text_{t}", "train", {"tokens": rows}, {t: y}),
            batch_size=16, shuffle=True, seed=3, length_buckets=3)
            for t, y in (("task_a", labels), ("task_b", 1 - labels))]
        trainer = jaxmtl.Trainer(n_epochs=1, lr=0.05, seed=0, progress_bar=False)
        trainer.fit(model, loaders)
        return trainer

    switched = run()
    assert len(switched.compiled_steps.switched) == 1  # (family, shapes): both loaders
    assert switched.compiled_programs() == 1
    monkeypatch.setattr(runners.PerStepRunner, "switch_bucket_shapes", False)
    reference = run()
    assert reference.compiled_programs() == 3 and not reference.compiled_steps.switched
    for a, b in zip(jax.tree.leaves(switched.state.params),
                    jax.tree.leaves(reference.state.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_one_switched_program_only_on_cpu_jit_modes_with_several_shapes():
    from types import SimpleNamespace

    from jaxmtl.buckets import switches_bucket_shapes

    def placement(mode, platform, n=1):
        return SimpleNamespace(mode=mode, devices=(SimpleNamespace(platform=platform),) * n)

    assert switches_bucket_shapes(placement("single", "cpu"), 3)
    assert switches_bucket_shapes(placement("sharded", "cpu", 2), 3)
    assert not switches_bucket_shapes(placement("single", "cpu"), 1)  # nothing to switch
    assert not switches_bucket_shapes(placement("pmap", "cpu", 2), 3)
    assert not switches_bucket_shapes(placement("single", "gpu"), 3)  # host-read index


def test_pad_to_longest_and_cut_to_widths_round_trip():
    from jaxmtl.buckets import cut_to_widths, pad_to_longest

    dl = jaxmtl.DictDataLoader(ragged_dataset(), batch_size=16, length_buckets=3)
    X, _ = dl.batch_at(np.arange(len(dl.dataset)), 0)
    widths = bucket_widths(dl)
    padded, shape = pad_to_longest(X, dl)
    assert dl.bucket_shapes[shape] == (X["tokens"].shape[1],)
    longest = dl.bucket_shapes[-1][0]
    assert padded["tokens"].shape == padded["tokens_mask"].shape == (16, longest)
    width = X["tokens"].shape[1]
    assert not padded["tokens"][:, width:].any() and not padded["tokens_mask"][:, width:].any()
    cut = cut_to_widths(padded, widths[shape])
    np.testing.assert_array_equal(cut["tokens"], X["tokens"])
    np.testing.assert_array_equal(cut["tokens_mask"], X["tokens_mask"])
    assert widths[shape] == (("tokens", width), ("tokens_mask", width))


def test_switched_eval_programs_are_for_probabilities_only():
    model, _ = fit([jaxmtl.DictDataLoader(ragged_dataset(40), batch_size=16)], n_epochs=1)
    shapes = bucket_widths(jaxmtl.DictDataLoader(ragged_dataset(), 16, length_buckets=3))
    with pytest.raises(ValueError, match="shapes are for kind 'probs' .*got kind 'forward'"):
        model.eval_programs.program("forward", ("task",), model.parallel, shapes)
