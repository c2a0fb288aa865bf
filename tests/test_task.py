import flax.linen as nn
import numpy as np
import pytest

from jaxmtl import Operation, Scorer, Task


def test_operation_defaults_and_repr():
    op = Operation("body", [("_input_", "x")])
    assert op.name == "body" and op.inputs == (("_input_", "x"),)
    assert repr(op) == "Operation(name=body, module_name=body, inputs=[('_input_', 'x')])"
    assert Operation("head", ["body"], name="h").name == "h"
    assert Operation("pick", [("encoder", 0)]).inputs == (("encoder", 0),)
    assert Operation("m", []).inputs == ()
    assert Operation("m", ["a"]) == Operation("m", ["a"])
    assert Operation("m", ["a"]) != Operation("m", ["b"])


@pytest.mark.parametrize("inputs", ["body", [("a", "b", "c")], [("a", 1.5)], [3]])
def test_operation_bad_inputs(inputs):
    with pytest.raises(ValueError, match="Operation 'm'"):
        Operation("m", inputs)


def test_task_defaults():
    task = Task("t", {"lin": nn.Dense(2)}, [Operation("lin", [("_input_", "x")])])
    assert isinstance(task.scorer, Scorer)
    assert task.scorer.score(np.array([0, 1, 1, 1]), np.array([0, 1, 0, 1]), None) == {
        "accuracy": 0.75
    }
    assert task.loss_weight == 1.0


def test_task_unknown_module():
    with pytest.raises(ValueError, match="uses module 'missing', which is not in the module_pool"):
        Task("t", {"lin": nn.Dense(2)}, [Operation("missing", [("_input_", "x")])])


def test_task_op_defined_later_or_unknown():
    pool = {"a": nn.Dense(2), "b": nn.Dense(2)}
    with pytest.raises(ValueError, match="op 'a' reads from op 'b', which is defined later"):
        Task("t", pool, [Operation("a", ["b"]), Operation("b", [("_input_", "x")])])
    with pytest.raises(ValueError, match="reads from op 'nope', which is not defined"):
        Task("t", pool, [Operation("a", ["nope"])])


def test_task_duplicate_op_names_with_different_definitions():
    pool = {"a": nn.Dense(2), "b": nn.Dense(2)}
    ops = [Operation("a", [("_input_", "x")], name="op"), Operation("b", ["op"], name="op")]
    with pytest.raises(ValueError, match="two different ops are named 'op'"):
        Task("t", pool, ops)


def test_task_bad_name_and_module():
    with pytest.raises(ValueError, match="without '/'"):
        Task("a/b", {"a": nn.Dense(2)}, [Operation("a", [("_input_", "x")])])
    with pytest.raises(ValueError, match="expected a Flax Linen module, a Flax NNX module, or a parameter-free callable"):
        Task("t", {"a": 3}, [Operation("a", [("_input_", "x")])])


@pytest.mark.parametrize("weight", [-1.0, float("nan"), True, "2"])
def test_task_loss_weight_must_be_a_number_at_least_0(weight):
    with pytest.raises(ValueError, match=r"^Task 't': loss_weight must be a finite number >= 0"):
        Task("t", {"a": nn.Dense(2)}, [Operation("a", [("_input_", "x")])], loss_weight=weight)
    Task("t", {"a": nn.Dense(2)}, [Operation("a", [("_input_", "x")])], loss_weight=0.0)


def test_a_failing_loss_func_names_its_task():
    import jax.numpy as jnp

    from jaxmtl.loss_terms import per_example_loss

    def swapped(labels, logits):  # arguments in the wrong order
        return jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]

    with pytest.raises(ValueError, match=r"^Task 't': loss_func\(logits \(4, 2\) float32, labels "
                       r"\(4,\) int32\) failed: "):
        per_example_loss(swapped, jnp.zeros((4, 2)), jnp.zeros(4, jnp.int32), "t")

