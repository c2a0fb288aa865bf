"""``python -m benchmarks.mtl``: epoch selection, Δm per seed, ranks and verdicts by hand."""

import numpy as np
import pytest

from benchmarks import mtl, mtl_report


def _epoch(a_valid, b_valid, a_test, b_test):
    return {"a/d/valid/accuracy": a_valid, "b/d/valid/accuracy": b_valid,
            "a/d/test/accuracy": a_test, "b/d/test/accuracy": b_test}


def _result(*seeds, step_ms=1.0):
    return {"tasks": ["a", "b"], "metrics": ["accuracy"], "note": "toy", "step_ms": step_ms,
            "steps_per_epoch": 3,
            "seeds": [{"seed": i, "fit_s": 1.0, "finite": True, "epochs": epochs}
                      for i, epochs in enumerate(seeds)]}


RESULTS = {
    # Each single-task model takes its own best epoch: seed 0 a@2 (0.6), b@1 (0.8);
    # seed 1 a@1 (0.5), b@2 (0.7). Means: a 0.55, b 0.75.
    "single": _result([_epoch(.5, .9, .4, .8), _epoch(.7, .6, .6, .5)],
                      [_epoch(.6, .5, .5, .6), _epoch(.5, .7, .3, .7)]),
    # One epoch for both tasks by the valid mean: seed 0 epoch 1 (0.6 > 0.55), seed 1
    # epoch 2 (0.65 > 0.5).
    "equal": _result([_epoch(.6, .6, .66, .6), _epoch(.9, .2, .9, .1)],
                     [_epoch(.5, .5, .2, .2), _epoch(.7, .6, .55, .9)]),
    "pcgrad": _result([_epoch(.5, .5, .715, .9)], [_epoch(.5, .5, .66, .9)], step_ms=2.0),
}


def test_best_epoch_and_selection():
    epochs = RESULTS["single"]["seeds"][0]["epochs"]
    assert mtl_report.best_epoch(epochs) == 0  # valid means 0.70 vs 0.65
    assert mtl_report.best_epoch(epochs, ["a"]) == 1
    scores, chosen = mtl_report.selected_test_scores(RESULTS["single"]["seeds"][0], True,
                                                     ["a", "b"])
    assert scores == {"a/d/test/accuracy": .6, "b/d/test/accuracy": .8}
    assert chosen == {"a": 2, "b": 1}
    scores, chosen = mtl_report.selected_test_scores(RESULTS["equal"]["seeds"][1], False,
                                                     ["a", "b"])
    assert scores == {"a/d/test/accuracy": .55, "b/d/test/accuracy": .9}
    assert chosen == {"a": 2, "b": 2}
    with pytest.raises(ValueError, match="No evaluation was logged"):
        mtl_report.best_epoch([])


def test_best_epoch_ignores_nan_scores():
    epochs = [{"a/d/valid/roc_auc": float("nan"), "a/d/valid/f1": 0.2},
              {"a/d/valid/roc_auc": 0.9, "a/d/valid/f1": 0.1}]
    assert mtl_report.best_epoch(epochs) == 1  # 0.2 (the NaN left out) vs 0.5


def test_delta_m_ranks_and_verdicts_by_hand():
    summary = mtl_report.summarize_dataset(RESULTS)
    methods = summary["methods"]
    np.testing.assert_allclose(methods["single"]["mean"]["a/d/test/accuracy"], 0.55)
    # equal: seed 0 (+20 % - 20 %) / 2 = 0; seed 1 (0 + 20 %) / 2 = 10.
    np.testing.assert_allclose(methods["equal"]["delta_m_per_seed"], [0.0, 10.0], atol=1e-9)
    np.testing.assert_allclose(methods["equal"]["delta_m"], 5.0, atol=1e-9)
    np.testing.assert_allclose(methods["equal"]["delta_m_std"], np.sqrt(50.0), rtol=1e-9)
    # pcgrad: (30 + 20) / 2 = 25 and (20 + 20) / 2 = 20.
    np.testing.assert_allclose(methods["pcgrad"]["delta_m_per_seed"], [25.0, 20.0], atol=1e-9)
    # single against its own mean: +-(0.05/0.55 + 0.05/0.75)/2.
    spread = 50 * (0.05 / 0.55 + 0.05 / 0.75)
    np.testing.assert_allclose(methods["single"]["delta_m_per_seed"], [spread, -spread],
                               rtol=1e-9)
    # Ranks: a: pcgrad 1, equal 2, single 3; b: pcgrad 1, equal and single tie at 2.5.
    assert {m: row["mean_rank"] for m, row in methods.items()} == pytest.approx(
        {"pcgrad": 1.0, "equal": 2.25, "single": 2.75})
    assert mtl_report.verdicts(summary) == {"pcgrad": "better"}  # gap 17.5 > 7.07
    assert summary["excluded"] == []


def test_zero_baseline_is_left_out_and_named():
    results = {"single": _result([_epoch(.5, .5, .5, 0.0)], [_epoch(.5, .5, .6, 0.0)]),
               "equal": _result([_epoch(.5, .5, .55, .3)], [_epoch(.5, .5, .66, .3)])}
    summary = mtl_report.summarize_dataset(results)
    assert summary["excluded"] == ["b/d/test/accuracy"]
    np.testing.assert_allclose(summary["methods"]["equal"]["delta_m_per_seed"], [0.0, 20.0],
                               atol=1e-9)
    lines = "\n".join(mtl_report.dataset_markdown("toy", "toy", summary, {"famo": "boom"}))
    assert "Left out of Δm (single-task mean 0 or not finite): `b/d/test/accuracy`." in lines
    assert "| famo | failed: boom |" in lines
    assert "| equal | 0.605 ± 0.078 | 0.300 ± 0.000 | 10.00 ± 14.14 | 1.0 | 1.00 | 2/2 |" in lines
    assert "| single | 0.550 ± 0.071 | 0.000 ± 0.000 | 0.00 ± 12.86 |" in lines


def test_render_writes_the_closing_verdict():
    records = [{"spec": {"dataset": "toy", "method": m, "seeds": [0, 1], "epochs": 2},
                "result": r} for m, r in RESULTS.items()]
    records.append({"spec": {"dataset": "toy", "method": "mgda", "seeds": [0], "epochs": 2},
                    "result": {"error": "Traceback ...\nFloatingPointError: nan"}})
    run = {"created": "now", "machine": {"commit": "abc"}, "versions": {"jax": "0.10.2"},
           "args": {"quick": True, "hidden": 8, "lr": 1e-3, "batch_size": 4}, "records": records}
    _, markdown = mtl.render(run)
    assert "SMOKE RUN" in markdown
    assert "| mgda | failed: FloatingPointError: nan |" in markdown
    assert "- toy: better: pcgrad; within 1 std: none; worse: none" in markdown


def test_parse_args_reads_balancers_at_run_time_and_rejects_unknown_names():
    from jaxmtl.training.balancers import BALANCER_NAMES

    args = mtl.parse_args(["--quick"])
    assert args.methods == ["single", *BALANCER_NAMES] and args.datasets == list(mtl.DATASETS)
    assert mtl.child_spec(args, "yeast", "equal")["seeds"] == [0, 1]
    assert mtl.child_spec(mtl.parse_args([]), "yeast", "equal")["epochs"] == mtl.EPOCHS["yeast"]
    for argv in (["--datasets", "mnist"], ["--methods", "equal,nope"], ["--seeds", "0"]):
        with pytest.raises(SystemExit):
            mtl.parse_args(argv)


@pytest.mark.slow
def test_child_trains_every_seed_and_reports_finite_scores():
    from benchmarks import mtl_train

    spec = {"dataset": "synthetic", "method": "equal", "seeds": [0], "epochs": 2,
            "quick": True, "hidden": 8, "batch_size": 250, "lr": 1e-2}
    result = mtl_train.run(spec)
    assert result["steps_per_epoch"] == 4 and result["tasks"] == ["t1", "t2", "t3", "t4"]
    (record,) = result["seeds"]
    assert record["finite"] and len(record["epochs"]) == 2
    assert sorted(record["epochs"][0]) == sorted(
        f"t{t}/synthetic/{split}/accuracy" for t in range(1, 5) for split in ("valid", "test"))
    assert all(0.0 <= v <= 1.0 for v in record["epochs"][1].values())


def test_full_run_estimate_by_hand():
    record = {"spec": {"dataset": "yeast", "epochs": 2}, "child_wall_s": 10.0,
              "result": {"step_ms": 10.0, "seeds": [{"fit_s": 5.0}, {"fit_s": 2.0}]}}
    # 12 steps of 128 rows; fixed fit cost 2 - 2 x 12 x 0.01 = 1.76 s; compile 3 s; start-up
    # 10 - 7 = 3 s; full: 3 + 3 + 5 x (1.76 + 15 x 12 x 0.01) + 12 x 0.01 (timing epoch).
    expected = 3 + 3 + 5 * (1.76 + mtl.EPOCHS["yeast"] * 12 * 0.01) + 0.12
    assert mtl.estimate_full_seconds([record], 128) == pytest.approx(expected, rel=1e-12)
    record["result"]["seeds"] = record["result"]["seeds"][:1]
    assert mtl.estimate_full_seconds([record], 128) is None


def test_partial_labels_table_shows_the_change_of_delta_m():
    full = mtl_report.summarize_dataset(RESULTS)
    hidden = {**RESULTS, "pcgrad": _result([_epoch(.5, .5, .55, .75)], [_epoch(.5, .5, .55, .75)])}
    partial = mtl_report.summarize_dataset(hidden)
    lines = mtl_report.partial_labels_table({"yeast": full, "yeast_partial": partial})
    assert "| pcgrad | 22.50 | 0.00 | -22.50 | 2/2 |" in lines
    assert "| equal | 5.00 | 5.00 | +0.00 | 2/2 |" in lines
    assert mtl_report.partial_labels_table({"yeast": full}) == []


def test_rerender_rewrites_markdown_of_a_saved_run(tmp_path):
    import json

    records = [{"spec": {"dataset": "toy", "method": m, "seeds": [0, 1], "epochs": 2},
                "result": r} for m, r in RESULTS.items()]
    run = {"created": "then", "machine": {}, "versions": {}, "records": records,
           "args": {"quick": True, "hidden": 8, "lr": 1e-3, "batch_size": 128},
           "estimated_full_s": 1200.0, "cpu_share": 0.25}
    path = tmp_path / "mtl_quick.json"
    path.write_text(json.dumps(run))
    mtl.main(["--render", str(path)])
    markdown = (tmp_path / "mtl_quick.md").read_text()
    assert "| pcgrad | 0.688 ± 0.039 | 0.900 ± 0.000 | 22.50 ± 3.54 |" in markdown
    assert "20 min at this run's load (the children got 0.25 CPU-seconds per second); " \
           "at most 5 min on a quiet machine." in markdown
