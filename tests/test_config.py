"""TrainerConfig: every default against Snorkel 0.10's, and the validation of bad values.

The expected defaults are copied by hand from Snorkel 0.10's source:
``snorkel/classification/training/trainer.py`` (TrainerConfig),
``snorkel/classification/multitask_classifier.py`` (ClassifierConfig),
``snorkel/utils/optimizers.py``, ``snorkel/utils/lr_schedulers.py`` and
``snorkel/classification/training/loggers/{log_manager,checkpointer,log_writer}.py``.
"""

import dataclasses
import math

import numpy as np
import pytest

from jaxmtl import Trainer, TrainerConfig

SNORKEL_DEFAULTS = {
    "seed": None,
    "n_epochs": 1,
    "lr": 0.01,
    "l2": 0.0,
    "grad_clip": 1.0,
    "train_split": "train",
    "valid_split": "valid",
    "test_split": "test",
    "progress_bar": True,
    "model_config": {"device": 0, "dataparallel": True},
    "log_manager_config": {"counter_unit": "epochs", "evaluation_freq": 1.0},
    "checkpointing": False,
    "checkpointer_config": {
        "checkpoint_dir": "checkpoints",
        "checkpoint_factor": 1,
        "checkpoint_metric": "model/all/train/loss:min",
        "checkpoint_task_metrics": None,
        "checkpoint_runway": 0,
        "checkpoint_clear": True,
    },
    "logging": False,
    "log_writer": "tensorboard",
    "log_writer_config": {"log_dir": "logs", "run_name": None},
    "optimizer": "adam",
    "optimizer_config": {
        "sgd_config": {"momentum": 0.9},
        # eps is torch.optim.Adam's own default, which Snorkel leaves in place.
        "adam_config": {"amsgrad": False, "betas": (0.9, 0.999), "eps": 1e-8},
        "adamax_config": {"betas": (0.9, 0.999), "eps": 1e-8},
    },
    "lr_scheduler": "constant",
    "lr_scheduler_config": {
        "warmup_steps": 0,
        "warmup_unit": "batches",
        "warmup_percentage": 0.0,
        "min_lr": 0.0,
        "exponential_config": {"gamma": 0.9},
        "step_config": {"step_size": 5, "gamma": 0.9},
    },
    "batch_scheduler": "shuffled",
}

# jaxmtl-only fields, with defaults that leave Snorkel's behaviour unchanged.
JAXMTL_DEFAULTS = {
    "parallel": "auto",
    "steps_per_call": 1,
    "balancer": "equal",
    "balancer_config": {},
    "grad_accumulation_steps": 1,
    "precision": "fp32",
    "on_nonfinite": "raise",
    "log_task_gradients": False,
    "module_optimizers": {},
}


def test_every_default_is_snorkels():
    config = dataclasses.asdict(TrainerConfig())
    assert {k: config[k] for k in SNORKEL_DEFAULTS} == SNORKEL_DEFAULTS
    assert {k: config[k] for k in config if k not in SNORKEL_DEFAULTS} == JAXMTL_DEFAULTS


def test_step_scheduler_defaults_decay_by_point_nine_every_five_steps():
    step_config = Trainer().config.lr_scheduler_config.step_config
    assert (step_config.step_size, step_config.gamma) == (5, 0.9)


def test_snorkel_model_config_is_accepted():
    config = TrainerConfig(model_config={"device": -1, "dataparallel": False})
    assert (config.model_config.device, config.model_config.dataparallel) == (-1, False)


@pytest.mark.parametrize("field_name", ["lr", "l2", "grad_clip"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_config_errors(field_name, value):
    with pytest.raises(ValueError) as info:
        Trainer(**{field_name: value})
    assert str(info.value) == f"TrainerConfig.{field_name} must be a finite number, got {value!r}"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": "0.01"}, "TrainerConfig.lr must be a number, got '0.01' (str)"),
        ({"lr": True}, "TrainerConfig.lr must be a number, got True (bool)"),
        ({"l2": None}, "TrainerConfig.l2 must be a number, got None (NoneType)"),
        ({"grad_clip": "1"}, "TrainerConfig.grad_clip must be a number, got '1' (str)"),
        ({"lr": -0.5}, "TrainerConfig.lr must be >= 0, got -0.5"),
        ({"lr_scheduler_config": {"min_lr": math.nan}},
         "LRSchedulerConfig.min_lr must be a finite number, got nan"),
        ({"lr_scheduler_config": {"warmup_steps": "2"}},
         "LRSchedulerConfig.warmup_steps must be a number, got '2' (str)"),
        ({"lr_scheduler_config": {"warmup_percentage": math.nan}},
         "LRSchedulerConfig.warmup_percentage must be a finite number, got nan"),
        ({"on_nonfinite": "ignore"},
         "Unrecognized on_nonfinite option 'ignore' (TrainerConfig.on_nonfinite); "
         "expected one of ['raise', 'warn']"),
    ],
)
def test_bad_values_name_the_field_and_value(kwargs, message):
    with pytest.raises(ValueError) as info:
        Trainer(**kwargs)
    assert str(info.value) == message


def test_numpy_numbers_and_none_grad_clip_are_accepted():
    config = TrainerConfig(lr=np.float32(0.5), l2=np.int64(0), grad_clip=None)
    assert (float(config.lr), config.l2, config.grad_clip) == (0.5, 0, None)


@pytest.mark.parametrize("on_nonfinite", ["raise", "warn"])
def test_on_nonfinite_choices(on_nonfinite):
    assert Trainer(on_nonfinite=on_nonfinite).config.on_nonfinite == on_nonfinite


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"learning_rate": 0.1}, r"TrainerConfig: unknown config key\(s\) \['learning_rate'\]"),
        ({"model_config": {"gpu": 1}}, r"ClassifierConfig: unknown config key\(s\) \['gpu'\]"),
        ({"lr_scheduler_config": {"step_config": {"step": 2}}},
         r"StepConfig: unknown config key\(s\) \['step'\]"),
        ({"optimizer_config": {"adam_config": {"beta1": 0.8}}},
         r"AdamConfig: unknown config key\(s\) \['beta1'\]"),
    ],
)
def test_unknown_keys_keep_raising(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Trainer(**kwargs)


def test_snorkel_class_names_build_the_nested_configs():
    from jaxmtl.training.config import (
        AdamaxOptimizerConfig,
        AdamOptimizerConfig,
        ExponentialLRSchedulerConfig,
        SGDOptimizerConfig,
        StepLRSchedulerConfig,
    )

    config = TrainerConfig(
        optimizer_config={"sgd_config": SGDOptimizerConfig(momentum=0.5),
                          "adam_config": AdamOptimizerConfig(amsgrad=True),
                          "adamax_config": AdamaxOptimizerConfig(eps=1e-6)},
        lr_scheduler_config={"exponential_config": ExponentialLRSchedulerConfig(gamma=0.5),
                             "step_config": StepLRSchedulerConfig(step_size=2)},
    )
    assert config.optimizer_config.sgd_config.momentum == 0.5
    assert config.optimizer_config.adam_config.amsgrad is True
    assert config.optimizer_config.adamax_config.eps == 1e-6
    assert config.lr_scheduler_config.exponential_config.gamma == 0.5
    assert (config.lr_scheduler_config.step_config.step_size,
            config.lr_scheduler_config.step_config.gamma) == (2, 0.9)



def test_config_names_are_the_registries_names():
    from jaxmtl import registry
    from jaxmtl.parallel import PARALLEL_MODES
    from jaxmtl.training import config
    from jaxmtl.training.balancers import BALANCER_FACTORIES, BALANCER_NAMES

    assert config.PARALLEL_MODES == PARALLEL_MODES == registry.PARALLEL_MODES.names
    assert config.BALANCER_NAMES == BALANCER_NAMES == registry.BALANCERS.names
    assert list(BALANCER_FACTORIES) == list(BALANCER_NAMES)
