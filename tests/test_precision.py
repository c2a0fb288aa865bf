"""Trainer(precision=...): the dtype the training step really computes in, read at trace time."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import linear_data

import jaxmtl

# (input dtype, kernel dtype, output dtype) of every trace of a ProbeDense; a module-level
# list because the model graph is static (hashed) and cannot hold a mutable one.
TRACED: list[tuple] = []


class ProbeDense(nn.Module):
    """nn.Dense(2) that records the dtypes it is traced with."""

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 2))
        bias = self.param("bias", nn.initializers.zeros, (2,))
        y = x @ kernel + bias
        TRACED.append((x.dtype.name, kernel.dtype.name, y.dtype.name))
        return y


@functools.cache  # one run per precision, shared by the tests
def fit(precision):
    X, Y = linear_data(64, 0)
    task = jaxmtl.Task("t", {"probe": ProbeDense()},
                       [jaxmtl.Operation("probe", [("_input_", "x")])])
    model = jaxmtl.MultitaskClassifier([task])
    loader = jaxmtl.DictDataLoader(jaxmtl.DictDataset("d", "train", {"x": X}, {"t": Y}),
                                   batch_size=32)
    model.init({"x": X[:32]}, seed=0)
    TRACED.clear()
    trainer = jaxmtl.Trainer(n_epochs=3, lr=0.5, optimizer="sgd", seed=0,
                             progress_bar=False, precision=precision)
    trainer.fit(model, [loader])
    return model, trainer, sorted(set(TRACED))


@pytest.mark.parametrize("precision, dtype", [("fp32", "float32"), ("bf16", "bfloat16")])
def test_training_step_computes_in_the_configured_dtype(precision, dtype):
    model, trainer, traced = fit(precision)
    # The step's forward (and so backward) pass ran on inputs and weights cast to ``dtype``:
    # an ignored setting would trace float32 only, a half-applied one a mixed triple. (The
    # Trainer's pre-flight shape check, jax.eval_shape of the forward pass, traces float32.)
    assert traced == sorted({(dtype, dtype, dtype), ("float32", "float32", "float32")})
    # Parameters and optimizer state stay float32 whatever the compute dtype.
    for leaf in jax.tree.leaves((model.params, trainer.state.params, trainer.state.opt_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32
    assert isinstance(trainer.metrics["model/all/train/loss"], float)


def test_bf16_run_differs_from_fp32_by_rounding_only():
    bf16, _, _ = fit("bf16")
    fp32, _, _ = fit("fp32")
    for name in ("kernel", "bias"):
        a, b = np.asarray(bf16.params["probe"][name]), np.asarray(fp32.params["probe"][name])
        # bfloat16 keeps 8 significant bits: relative rounding 2**-8 = 0.4 % per value.
        np.testing.assert_allclose(a, b, rtol=0.05, atol=0.02, err_msg=name)
    assert not np.array_equal(np.asarray(bf16.params["probe"]["kernel"]),
                              np.asarray(fp32.params["probe"]["kernel"]))
