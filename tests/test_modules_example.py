"""examples/balancers.py --architecture: every jaxmtl.modules architecture in the example."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import balancers  # noqa: E402

import jaxmtl  # noqa: E402


@pytest.mark.parametrize("name", balancers.ARCHITECTURES)
def test_each_architecture_builds_the_two_task_model(name):
    tasks = balancers.make_tasks(name)
    assert [task.name for task in tasks] == ["a", "b"]
    assert tasks[0].module_pool["body"] is tasks[1].module_pool["body"]
    assert [tuple(op.inputs) for op in tasks[1].op_sequence] == [(("_input_", "x"),),
                                                                  (("body", "b"),)]
    assert jaxmtl.build_graph(tasks).task_names == ("a", "b")


def test_unknown_architecture_names_the_choices():
    with pytest.raises(ValueError, match=r"architecture is 'moe'; expected one of \['cgc', "):
        balancers.make_body("moe")


@pytest.mark.slow  # 2 architectures x 4 epochs; tests/test_modules.py trains every one
def test_per_task_gating_recovers_the_conflicting_task():
    shared = balancers.compare(("equal",), n_epochs=4, architecture="shared")["equal"][-1]
    cgc = balancers.compare(("equal",), n_epochs=4, architecture="cgc")["equal"][-1]
    assert shared[1] > 0.95 and cgc[1] > 0.95, (shared, cgc)  # task a either way
    assert shared[2] < 0.8 < 0.85 < cgc[2]            # b: one shared unit vs its own expert
