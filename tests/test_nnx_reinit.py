"""Re-initialising NNX modules from an explicit seed (``nnx_modules.reinitialised_variables``)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_nnx import assert_trees_equal, bn_dropout_body, loaders, nnx_model, two_tasks

import jaxmtl
from jaxmtl.nnx_modules import NnxSpec, reinitialised_variables

X = {"data": np.random.default_rng(0).normal(size=(4, 2)).astype(np.float32)}


def redrawn(module, seed, name="m"):
    return reinitialised_variables(NnxSpec.from_module(name, module), module, seed)


def own(model):
    """The pool's NNX modules' own values, as the model would store them."""
    return {name: model.graph.nnx_specs[name].initial_variables()["params"]
            for name in ("body", "head1", "head2")}


def test_explicit_seed_redraws_nnx_params_deterministically():
    # Two models whose modules were built from different rngs: one seed, one set of weights.
    first, second = nnx_model(seed=0), nnx_model(seed=9)
    first.init(X, seed=3)
    second.init(X, seed=3)
    assert_trees_equal(first.params, second.params)
    other = nnx_model(seed=0)
    other.init(X, seed=4)
    for name in ("body", "head1", "head2"):
        for key in ("kernel",):
            assert not np.allclose(first.params[name][key], other.params[name][key])
            assert not np.allclose(first.params[name][key], own(first)[name][key])
        np.testing.assert_array_equal(first.params[name]["bias"], 0.0)  # zeros_init
    # head1 and head2 have one shape and one initializer: the module name keys the draw.
    assert not np.allclose(first.params["head1"]["kernel"], first.params["head2"]["kernel"])
    # The user's module objects are not changed.
    body = first.graph.module_pool["body"]
    np.testing.assert_array_equal(own(first)["body"]["kernel"], np.asarray(body.kernel[...]))


@pytest.mark.parametrize("init", [
    lambda model: model.init(X),                                    # no seed
    lambda model: model.init_from_loaders(loaders()[:2], fallback_seed=3),  # a Trainer's
    lambda model: jaxmtl.Trainer(n_epochs=0, seed=3, progress_bar=False).fit(
        model, loaders()[:2]),
])
def test_without_an_explicit_seed_nnx_modules_keep_their_own_values(init):
    model = nnx_model()
    model.seed = 5  # the model's default seed does not redraw them either
    init(model)
    assert_trees_equal(model.params, own(model))


def test_init_from_loaders_seed_redraws_as_init_does():
    by_loaders = nnx_model()
    by_loaders.init_from_loaders(loaders()[:2], seed=3)
    by_batch = nnx_model(seed=1)
    by_batch.init(X, seed=3)
    assert_trees_equal(by_loaders.params, by_batch.params)
    # As for Linen modules, the model's own seed wins over init_from_loaders' seed.
    seeded = nnx_model()
    seeded.seed = 3
    seeded.init_from_loaders(loaders()[:2], seed=8)
    assert_trees_equal(seeded.params, by_batch.params)


def test_mixed_model_redraws_nnx_and_keeps_linen_init():
    def mixed():
        return jaxmtl.MultitaskClassifier(two_tasks(
            nnx.Linear(2, 8, rngs=nnx.Rngs(0)), nn.Dense(2), nnx.Linear(8, 2, rngs=nnx.Rngs(1))))
    seeded, plain = mixed(), mixed()
    seeded.init(X, seed=2)
    plain.init(X)
    plain_seeded = mixed()
    plain_seeded.seed = 2
    plain_seeded.init(X)
    # The Linen head is drawn from the seed in every case; only the NNX ones change.
    np.testing.assert_array_equal(seeded.params["head1"]["kernel"],
                                  plain_seeded.params["head1"]["kernel"])
    assert not np.allclose(seeded.params["body"]["kernel"], plain.params["body"]["kernel"])


def test_existing_weights_are_kept():
    model = nnx_model()
    model.init(X)
    before = jax.tree.map(np.asarray, model.params)
    model.init(X, seed=3)  # every module exists: nothing is redrawn
    assert_trees_equal(model.params, before)


@pytest.mark.parametrize("module, path, fan_in", [
    (nnx.Linear(64, 64, rngs=nnx.Rngs(0)), ("kernel",), 64),
    (nnx.Conv(16, 64, (2, 2), rngs=nnx.Rngs(0)), ("kernel",), 64),
    # LinearGeneral draws on the flattened [64, 64] kernel (fan-in 64, not 4 * 64).
    (nnx.LinearGeneral((8, 8), (4, 16), axis=(-2, -1), rngs=nnx.Rngs(0)), ("kernel",), 64),
    # Embed: variance_scaling(1, fan_in, normal, out_axis=0): fan-in is the feature axis.
    (nnx.Embed(64, 64, rngs=nnx.Rngs(0)), ("embedding",), 64),
])
def test_draws_follow_the_layer_initializer(module, path, fan_in):
    values = redrawn(module, seed=1)["params"]
    for key in path:
        values = values[key]
    values = np.asarray(values)
    assert values.size >= 4096
    # lecun_normal / the Embed default: standard deviation 1 / sqrt(fan_in).
    np.testing.assert_allclose(values.std(), 1 / np.sqrt(fan_in), rtol=0.2)
    assert abs(values.mean()) < 0.1 / np.sqrt(fan_in) * 3


def test_batchnorm_statistics_and_norm_params_reset():
    body = bn_dropout_body()
    batch_norm = body.layers[1]
    batch_norm.mean[...] = jnp.full((8,), 5.0)
    batch_norm.var[...] = jnp.full((8,), 3.0)
    batch_norm.scale[...] = jnp.full((8,), 2.0)
    layer_norm = nnx.LayerNorm(8, rngs=nnx.Rngs(0))
    layer_norm.bias[...] = jnp.full((8,), 0.5)
    drawn = redrawn(body, seed=0)
    stats = drawn["batch_stats"]["layers"]["1"]
    np.testing.assert_array_equal(stats["mean"], np.zeros(8, np.float32))
    np.testing.assert_array_equal(stats["var"], np.ones(8, np.float32))
    assert stats["mean"].dtype == stats["var"].dtype == jnp.float32
    np.testing.assert_array_equal(drawn["params"]["layers"]["1"]["scale"], 1.0)
    np.testing.assert_array_equal(drawn["params"]["layers"]["1"]["bias"], 0.0)
    np.testing.assert_array_equal(redrawn(layer_norm, 0)["params"]["bias"], 0.0)
    # Without a seed the module's own (here: changed) statistics are the initial values.
    assert float(NnxSpec.from_module("m", body).initial_variables()[
        "batch_stats"]["layers"]["1"]["mean"][0]) == 5.0


def test_a_stored_initializer_attribute_wins():
    layer = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    layer.kernel_init = jax.nn.initializers.constant(0.5)
    np.testing.assert_array_equal(redrawn(layer, 0)["params"]["kernel"], np.full((4, 4), 0.5))


class Scaled(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(2, 2, rngs=rngs)
        self.gain = nnx.Param(jnp.ones((2,)))

    def __call__(self, x):
        return self.linear(x) * self.gain


class ScaledWithInit(Scaled):
    def __init__(self, rngs):
        super().__init__(rngs)
        self.gain_init = jax.nn.initializers.constant(3.0)


def test_param_without_an_initializer_is_an_error():
    model = jaxmtl.MultitaskClassifier([jaxmtl.Task("t", {"m": Scaled(nnx.Rngs(0))}, [
        jaxmtl.Operation("m", [("_input_", "x")])])])
    with pytest.raises(ValueError) as error:
        model.init({"x": np.ones((2, 2), np.float32)}, seed=0)
    assert str(error.value) == (
        "NNX module 'm': variable gain (Scaled.gain): no initializer found to redraw it "
        "from the seed (no `gain_init` attribute, and not a Flax layer's parameter with a "
        "default initializer); set `gain_init` on that module to the initializer to draw "
        "it with, or construct the module with the rngs you want and call init without "
        "seed (its own values are then kept)")
    assert model.variables is None  # nothing half-initialised
    model.init({"x": np.ones((2, 2), np.float32)})  # the remedy: its own values
    np.testing.assert_array_equal(model.params["m"]["gain"], 1.0)
    drawn = redrawn(ScaledWithInit(nnx.Rngs(0)), 0)["params"]
    np.testing.assert_array_equal(drawn["gain"], 3.0)
    assert drawn["linear"]["kernel"].shape == (2, 2)


def test_layer_inside_a_module_taking_initializers_is_an_error():
    cell = nnx.LSTMCell(2, 3, rngs=nnx.Rngs(0))  # passes recurrent_kernel_init (orthogonal)
    with pytest.raises(ValueError, match=r"NNX module 'm': variable hf/bias \(Linear.bias\): "
                                         r"Flax does not keep the initializer a layer was "
                                         r"built with, and the LSTMCell above it \(the module "
                                         r"itself\) takes initializer arguments "
                                         r"\['kernel_init', 'recurrent_kernel_init', "
                                         r"'bias_init', 'carry_init'\]"):
        redrawn(cell, 0)


def test_unknown_batch_statistic_is_an_error():
    class Tracked(nnx.Module):
        def __init__(self):
            self.peak = nnx.BatchStat(jnp.zeros(()))

    with pytest.raises(ValueError, match=r"NNX module 'm': variable peak \(Tracked.peak\) is a "
                                         r"BatchStat whose initial value jaxmtl does not know"):
        redrawn(Tracked(), 0)


def test_initializer_of_another_shape_is_an_error():
    module = ScaledWithInit(nnx.Rngs(0))
    module.gain_init = lambda key, shape, dtype: jnp.zeros((3,), dtype)
    with pytest.raises(ValueError, match=r"NNX module 'm': variable gain "
                                         r"\(ScaledWithInit.gain\): its initializer drew "
                                         r"shape \(3,\), expected \(2,\)"):
        redrawn(module, 0)
