"""The examples run and reach their stated quality."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import quickstart  # noqa: E402
import tensorboard_run  # noqa: E402


def test_quickstart_scores():
    scores = quickstart.main()
    assert scores["task_a/synthetic_a/valid/accuracy"] > 0.95
    assert scores["task_b/synthetic_b/valid/accuracy"] > 0.95
    assert scores["model/all/valid/accuracy"] == pytest.approx(
        (scores["task_a/synthetic_a/valid/accuracy"] + scores["task_b/synthetic_b/valid/accuracy"]) / 2)


def test_text_example_learns_both_tasks_with_one_program():
    import text_classification

    scores, trainer = text_classification.main(n_epochs=3, n_rows=2000)
    assert scores["keyword/text/test/accuracy"] > 0.9
    assert scores["topic/text/test/accuracy"] > 0.9
    assert trainer.compiled_programs() == 1  # every bucket shape, one switched program


@pytest.mark.slow  # test_trainer_logging.py and test_writers.py check TensorBoard logging
def test_tensorboard_example_writes_events(tmp_path):
    run_dir = Path(tensorboard_run.main(str(tmp_path), "run"))
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert (run_dir / "config.json").exists()


@pytest.mark.slow  # test_resume.py's SIGKILL test checks the same guarantee by default
def test_resume_example_is_bit_identical(tmp_path):
    import resume

    assert resume.main(str(tmp_path / "ck")) is True


@pytest.mark.slow  # 3 methods x 4 epochs; test_trainer_balancers.py covers the methods
def test_balancers_example_methods_pick_different_tradeoffs():
    import balancers

    final = {method: rows[-1] for method, rows in balancers.compare(n_epochs=4).items()}
    _, equal_a, equal_b = final["equal"]
    _, mgda_a, mgda_b = final["mgda"]
    assert equal_a > mgda_a + 0.1  # the weighted sum keeps the heavy task
    assert mgda_b > equal_b + 0.1  # the min-norm point moves to the other task
