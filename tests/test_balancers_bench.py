"""``python -m benchmarks.balancers``: the 8 tasks, the report and verdict, one real child."""

import json

import numpy as np
import pytest

from benchmarks import balancers


def test_tasks_a_to_d_are_the_reference_workload_and_e_to_h_are_balanced():
    X, labels = balancers.reference_labels(20_000)
    # The reference workload's definition (benchmarks/workload.py): X, then W [D, 4].
    rng = np.random.default_rng(0)
    X_ref = rng.standard_normal((20_000, 128)).astype(np.float32)
    logits = X_ref @ rng.standard_normal((128, 4))
    np.testing.assert_array_equal(X, X_ref)
    for column, task in ((0, "a"), (2, "c"), (3, "d")):
        np.testing.assert_array_equal(labels[task], (logits[:, column] > 0).astype(int))
    soft = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(labels["b"], soft / soft.sum(1, keepdims=True), rtol=1e-6)
    assert list(labels) == list("abcdefgh")
    for task in "acdefgh":
        assert labels[task].shape == (20_000,)
        assert abs(labels[task].mean() - 0.5) < 0.02, (task, labels[task].mean())
    # A smaller N keeps the first rows and the same tasks.
    X_small, small = balancers.reference_labels(640)
    np.testing.assert_array_equal(X_small, X[:640])
    for task in "abcdefgh":
        np.testing.assert_array_equal(small[task], labels[task][:640])
    # g shares a's direction; h is not f (their agreement is far from 0 and 1).
    assert 0.6 < np.mean(labels["g"] == labels["a"]) < 0.9
    assert 0.2 < np.mean(labels["h"] == labels["f"]) < 0.8


def test_methods_and_resolve():
    rows = balancers.methods()
    assert len(rows) == 17 and rows[0] == ("equal", "equal", {})
    assert balancers.resolve("imtl (upper_bound)") == ("imtl", {"upper_bound": True})
    with pytest.raises(ValueError, match=r"method: unknown row 'nope'; expected one of"):
        balancers.resolve("nope")
    with pytest.raises(ValueError, match=r"n_tasks: expected 1..8, got 9"):
        balancers.make_loaders(9, *balancers.reference_labels(64))


def _row(step_ms, rss, **extra):
    return {"step_ms": step_ms, "best_ms": step_ms, "peak_rss_mb": rss,
            "foreign_load": 0.5, **extra}


META = {"command": "python -m benchmarks.balancers", "date": "2026-12-01 08:00 UTC",
        "machine": "cpu", "devices": ["cpu:0"], "jax": "0.10.2", "n": 10_240, "epochs": 3,
        "steps": 160}


def test_combine_equal_means_and_keeps_runs():
    runs = [_row(1.0, 400.0), _row(3.0, 500.0), {"error": "boom"}]
    equal = balancers.combine_equal(runs)
    assert equal["step_ms"] == 2.0 and equal["peak_rss_mb"] == 450.0
    assert equal["runs"] == runs
    assert balancers.combine_equal([{"error": "x"}])["error"] == \
        "every equal-weighting run failed"


def test_report_ratios_and_pass():
    results = {"2": {"equal": balancers.combine_equal([_row(1.0, 400.0), _row(1.5, 400.0)]),
                     "pcgrad": _row(2.5, 500.0)},
               "8": {"equal": balancers.combine_equal([_row(4.0, 600.0), _row(4.0, 600.0)]),
                     "pcgrad": _row(6.0, 900.0, timed_compiles=1)}}
    report = balancers.render(results, META)
    assert "| pcgrad | 2.50 | 2.00 | 500 | 1.25 | 6.00 | 1.50 | 900 | 1.50 |" in report
    assert "| equal | 1.25 | 1.00 | 400 | 1.00 | 4.00 | 1.00 | 600 | 1.00 |" in report
    assert "2 tasks 1.00 / 1.50; 8 tasks 4.00 / 4.00" in report
    assert "during the timed fits (their step time includes a compile): 8 tasks pcgrad (1)" \
        in report
    assert report.rstrip().endswith(
        "**PASS**: every method <= 2x equal weighting's step time for 2, 8 tasks.")
    assert balancers.verdict(results) == (True, [])


def test_report_fails_on_a_slow_method_and_on_a_failed_child():
    results = {"4": {"equal": balancers.combine_equal([_row(2.0, 400.0)]),
                     "upgrad": _row(4.2, 450.0),
                     "cagrad": {"error": "Traceback ...", "peak_rss_mb": 300.0}}}
    passed, failures = balancers.verdict(results)
    assert not passed
    assert failures == ["4 tasks: upgrad: 2.10x equal",
                        "4 tasks: cagrad: not measured (the child failed)"]
    report = balancers.render(results, META)
    assert "| cagrad | failed | failed | 300 | 0.75 |" in report
    assert report.rstrip().endswith(
        "**FAIL**: every method <= 2x equal weighting's step time for 4 tasks: "
        "4 tasks: upgrad: 2.10x equal; 4 tasks: cagrad: not measured (the child failed).")


def test_run_children_order_equal_baseline_and_a_failed_child(monkeypatch):
    import benchmarks.runner

    calls = []

    def fake_run_child(impl, spec, python):
        calls.append((spec["n_tasks"], spec["method"]))
        assert impl.module == "benchmarks.balancers"
        assert impl.env == {"JAXMTL_COMPILATION_CACHE": "0"}
        step = {"equal": 1.0 + len(calls), "pcgrad": 9.0}.get(spec["method"])
        result = ({"skipped": "ImportError: no solver"} if step is None else
                  {**_row(step, 100.0 * len(calls)), "steps": 4})
        return {"result": result, "child_wall_s": 2.0, "foreign_load": 0.25}

    monkeypatch.setattr(benchmarks.runner, "run_child", fake_run_child)
    lines = []
    results = balancers.run_children([2], ["pcgrad", "upgrad"], {"n": 256, "epochs": 1},
                                     log=lines.append)
    assert calls == [(2, "equal"), (2, "pcgrad"), (2, "upgrad"), (2, "equal")]
    equal = results["2"]["equal"]
    assert equal["step_ms"] == 3.5 and equal["peak_rss_mb"] == 250.0  # (2 + 5) / 2, (1 + 4) / 2
    assert [run["step_ms"] for run in equal["runs"]] == [2.0, 5.0]
    assert results["2"]["upgrad"] == {"skipped": "ImportError: no solver", "child_wall_s": 2.0,
                                      "foreign_load": 0.25}
    assert "ImportError: no solver" in lines
    assert balancers.verdict(results) == (False, [
        "2 tasks: pcgrad: 2.57x equal", "2 tasks: upgrad: not measured (the child failed)"])
    with pytest.raises(ValueError, match=r"equal_runs: expected 1 or 2, got 0"):
        balancers.run_children([2], [], {}, equal_runs=0)


@pytest.mark.slow
def test_child_runs_pcgrad_on_two_tasks_and_the_report_renders():
    """One real child process (cold JAX start-up and compile: ~10-20 s on the loaded VM)."""
    rows = []
    results = balancers.run_children([2], ["pcgrad"], {"n": 256, "epochs": 1, "batch_size": 64},
                                     log=rows.append, equal_runs=1)
    block = results["2"]
    assert list(block) == ["equal", "pcgrad"]
    for row in block.values():
        assert "error" not in row, row.get("error")
        assert row["steps"] == 4 and len(row["epoch_ms"]) == 1
        assert row["timed_compiles"] == 0
        assert row["peak_rss_mb"] >= row["start_rss_mb"] > 0
        assert row["platform"] == "cpu" and row["device_peak_bytes"] is None
    assert block["pcgrad"]["balancer"] == "pcgrad"
    report = balancers.render(results, {**META, "n": 256, "epochs": 1, "steps": 4})
    assert "| pcgrad | " in report and ("**PASS**" in report or "**FAIL**" in report)
    json.dumps(results)  # the results file is JSON
