"""The public API's layers and boundaries: ``jaxmtl.core``, ``jaxmtl.balancers``, the
registries that validation and factories share, config validation, module dependencies."""

import json
import math
import os
import subprocess
import sys

import pytest

import jaxmtl
from jaxmtl import registry
from jaxmtl.training.config import (
    CheckpointerConfig,
    LogManagerConfig,
    LogWriterConfig,
    TrainerConfig,
)

# --- layers ------------------------------------------------------------------------------

CORE = ["Balancer", "ModelGraph", "TrainState", "apply_ops", "balanced_grads", "build_graph",
        "family_train_step", "init_variables", "make_balancer", "make_lr_schedule",
        "make_optimizer", "task_loss_terms", "task_probs", "total_loss", "train_step",
        "train_step_on"]

# Every name ``jaxmtl`` exported before the API was layered: all stay importable.
TOP_LEVEL_BEFORE = [
    "AdamConfig", "AdamaxConfig", "Batch", "Checkpointer", "CheckpointerConfig",
    "DictDataLoader", "DictDataset", "LRSchedulerConfig", "LogManager", "LogManagerConfig",
    "LogWriter", "LogWriterConfig", "MetricWriter", "ModelGraph", "MultitaskClassifier",
    "Operation", "OptimizerConfig", "SGDConfig", "Scorer", "Task", "TensorBoardWriter",
    "TrainState", "Trainer", "TrainerConfig", "apply_ops", "build_graph", "cross_entropy",
    "cross_entropy_with_probs", "disable_compilation_cache", "enable_compilation_cache",
    "init_variables", "make_optimizer", "metric_score", "metrics_dict_to_dataframe",
    "preds_to_probs", "probs_to_preds", "task_loss_terms", "task_probs", "total_loss",
    "train_step",
]


def test_core_namespace_holds_the_pure_core():
    from jaxmtl import core, model
    from jaxmtl.training import balancers, state, step

    assert sorted(core.__all__) == CORE
    assert core.build_graph is model.build_graph and core.apply_ops is model.apply_ops
    assert core.TrainState is state.TrainState and core.make_optimizer is state.make_optimizer
    assert (core.train_step, core.train_step_on, core.family_train_step) == (
        step.train_step, step.train_step_on, step.family_train_step)
    assert core.make_balancer is balancers.make_balancer
    assert all(getattr(core, name).__doc__ for name in CORE)
    assert "layers" in core.__doc__


def test_top_level_keeps_every_name_and_documents_the_layers():
    assert sorted(set(TOP_LEVEL_BEFORE) - set(jaxmtl.__all__)) == []
    assert sorted(set(jaxmtl.__all__) - set(TOP_LEVEL_BEFORE)) == ["balancers", "core",
                                                                   "registry"]
    for name in jaxmtl.__all__:
        assert getattr(jaxmtl, name) is not None
    # A core name at the top level is the core's own object, not a copy.
    assert jaxmtl.train_step is jaxmtl.core.train_step
    assert jaxmtl.TrainState is jaxmtl.core.TrainState
    assert "jaxmtl.core" in jaxmtl.__doc__


def test_balancer_entry_points_are_public():
    from jaxmtl.balancers import BALANCER_NAMES, Balancer, make_balancer

    assert BALANCER_NAMES == registry.BALANCERS.names
    balancer = make_balancer("dwa", num_tasks=2)
    assert isinstance(balancer, Balancer) and balancer.needs_task_grads is False
    assert TrainerConfig(balancer=balancer).balancer is balancer


# --- registries ----------------------------------------------------------------------------

@pytest.mark.parametrize("field, registry_name", [
    ("optimizer", "OPTIMIZERS"), ("lr_scheduler", "LR_SCHEDULERS"),
    ("batch_scheduler", "BATCH_SCHEDULERS"), ("log_writer", "LOG_WRITERS"),
    ("precision", "PRECISIONS"), ("parallel", "PARALLEL_MODES"),
    ("on_nonfinite", "ON_NONFINITE"), ("balancer", "BALANCERS"),
])
def test_config_errors_list_exactly_the_registry(field, registry_name):
    names = registry.ALL_REGISTRIES[registry_name]
    with pytest.raises(ValueError) as info:
        TrainerConfig(**{field: "nope"})
    assert str(info.value) == (f"Unrecognized {names.concept} 'nope' (TrainerConfig.{field}); "
                               f"expected one of {list(names.names)}")


def test_every_registered_implementation_loads():
    from jaxmtl.training.writers import LogWriter, TensorBoardWriter

    loaded = {(key, name): registry_.load(name, "test")
              for key, registry_ in registry.ALL_REGISTRIES.items() for name in registry_.names}
    with_target = {key: value for key, value in loaded.items()
                   if registry.ALL_REGISTRIES[key[0]].entries[key[1]] is not None}
    assert len(with_target) == 3 + 5 + 4 + 2 + 14 + 1
    assert all(callable(value) for value in with_target.values())
    assert loaded["LOG_WRITERS", "json"] is LogWriter
    assert loaded["LOG_WRITERS", "tensorboard"] is TensorBoardWriter
    assert loaded["PRECISIONS", "fp32"] is None


def test_factories_raise_with_the_registry_names():
    from jaxmtl.parallel import choose_parallel
    from jaxmtl.training.batch_schedulers import make_batch_scheduler
    from jaxmtl.training.lr_schedules import make_lr_schedule
    from jaxmtl.training.writers import make_log_writer

    calls = [
        (lambda: make_batch_scheduler("nope", 0), registry.BATCH_SCHEDULERS,
         "make_batch_scheduler(name)"),
        (lambda: make_lr_schedule(0.1, "nope", TrainerConfig().lr_scheduler_config, 1, 1),
         registry.LR_SCHEDULERS, "make_lr_schedule(lr_scheduler)"),
        (lambda: make_log_writer("nope"), registry.LOG_WRITERS, "make_log_writer(name)"),
        (lambda: choose_parallel("nope"), registry.PARALLEL_MODES, "choose_parallel(mode)"),
    ]
    for call, names, where in calls:
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == (f"Unrecognized {names.concept} 'nope' ({where}); "
                                   f"expected one of {list(names.names)}")


def test_validation_and_factory_read_the_same_registry(monkeypatch):
    from jaxmtl.training.batch_schedulers import SequentialScheduler, make_batch_scheduler

    extended = registry.Registry(registry.BATCH_SCHEDULERS.concept, {
        **registry.BATCH_SCHEDULERS.entries,
        "in_order": "jaxmtl.training.batch_schedulers:SequentialScheduler"})
    with pytest.raises(ValueError, match="Unrecognized batch scheduler option 'in_order'"):
        TrainerConfig(batch_scheduler="in_order")
    monkeypatch.setattr(registry, "BATCH_SCHEDULERS", extended)
    assert TrainerConfig(batch_scheduler="in_order").batch_scheduler == "in_order"
    assert type(make_batch_scheduler("in_order", 0)) is SequentialScheduler


# --- config validation at construction -------------------------------------------------------

@pytest.mark.parametrize("build, message", [
    (lambda: LogWriterConfig(run_name="../up"),
     "log_writer_config.run_name must be a plain directory name (no path separator, not "
     "absolute, not '.' or '..'), got '../up'"),
    (lambda: LogWriterConfig(log_dir=""), "LogWriterConfig.log_dir must be a non-empty path, got ''"),
    (lambda: LogManagerConfig(evaluation_freq=math.nan),
     "LogManagerConfig.evaluation_freq must be a finite number, got nan"),
    (lambda: LogManagerConfig(evaluation_freq=0), "LogManagerConfig.evaluation_freq must be > 0, got 0"),
    (lambda: LogManagerConfig(counter_unit="steps"),
     "Unrecognized counter_unit 'steps' (LogManagerConfig.counter_unit); expected one of "
     "['points', 'batches', 'epochs']"),
    (lambda: CheckpointerConfig(checkpoint_task_metrics="a/b/c/d:max"),
     "CheckpointerConfig.checkpoint_task_metrics must be a list of "
     "'task/dataset/split/metric:mode' strings or None, got the string 'a/b/c/d:max'"),
    (lambda: CheckpointerConfig(checkpoint_clear="yes"),
     "CheckpointerConfig.checkpoint_clear must be a bool, got 'yes'"),
    (lambda: CheckpointerConfig(checkpoint_dir=""),
     "CheckpointerConfig.checkpoint_dir must be a non-empty path or None, got ''"),
    (lambda: CheckpointerConfig(checkpoint_factor=1.5),
     "CheckpointerConfig.checkpoint_factor must be an int >= 1, got 1.5"),
    (lambda: TrainerConfig(optimizer_config={"sgd_config": {"momentum": -0.1}}),
     "SGDConfig.momentum must be >= 0, got -0.1"),
    (lambda: TrainerConfig(optimizer_config={"adam_config": {"betas": (0.9, 1.0)}}),
     "AdamConfig.betas must be two numbers in [0, 1), got (0.9, 1.0)"),
    (lambda: TrainerConfig(optimizer_config={"adamax_config": {"eps": math.inf}}),
     "AdamaxConfig.eps must be a finite number, got inf"),
    (lambda: TrainerConfig(optimizer_config={"adam_config": {"amsgrad": "no"}}),
     "AdamConfig.amsgrad must be a bool, got 'no'"),
    (lambda: TrainerConfig(lr_scheduler_config={"step_config": {"step_size": 0}}),
     "StepConfig.step_size must be an int >= 1, got 0"),
    (lambda: TrainerConfig(lr_scheduler_config={"exponential_config": {"gamma": "0.5"}}),
     "ExponentialConfig.gamma must be a number, got '0.5' (str)"),
    (lambda: TrainerConfig(model_config={"dataparallel": "yes"}),
     "ClassifierConfig.dataparallel must be a bool, got 'yes'"),
    (lambda: TrainerConfig(balancer="dwa", balancer_config={"temp": 2.0}),
     "TrainerConfig.balancer_config: unknown key(s) ['temp'] for balancer 'dwa'; allowed: "
     "['num_tasks', 'period', 'temperature']"),
    (lambda: TrainerConfig(balancer_config=[("temperature", 2.0)]),
     "TrainerConfig.balancer_config must be a dict of setting name -> value, got "
     "[('temperature', 2.0)]"),
    (lambda: TrainerConfig(balancer=3),
     "TrainerConfig.balancer must be one of ['equal', 'uncertainty', 'dwa', 'rlw', 'gradnorm', "
     "'pcgrad', 'cagrad', 'mgda', 'famo', 'nash_mtl', 'imtl', 'aligned_mtl', 'upgrad', "
     "'db_mtl'] or a Balancer, got 3 (int)"),
])
def test_configs_are_validated_where_they_are_built(build, message):
    with pytest.raises(ValueError) as info:
        build()
    assert str(info.value) == message


def test_balancer_config_beside_a_balancer_object_is_an_error_not_ignored():
    from jaxmtl.balancers import make_balancer

    with pytest.raises(ValueError) as info:
        TrainerConfig(balancer=make_balancer("rlw"), balancer_config={"temperature": 2.0})
    assert str(info.value) == (
        "TrainerConfig.balancer_config={'temperature': 2.0} applies to a balancer given by "
        "name; balancer is a Balancer object, so build it with these settings")


def test_valid_configs_convert_once():
    config = CheckpointerConfig(checkpoint_task_metrics=["a/b/c/d:max"])
    assert config.checkpoint_task_metrics == ("a/b/c/d:max",)
    adam = TrainerConfig(optimizer_config={"adam_config": {"betas": [0.8, 0.99]}})
    assert adam.optimizer_config.adam_config.betas == (0.8, 0.99)
    assert TrainerConfig(balancer="dwa", balancer_config={"temperature": 3.0}).balancer == "dwa"


# --- module dependencies ---------------------------------------------------------------------

# Imports one jaxmtl module with the package __init__ files stubbed out, so that what loads
# is that module's own import closure, and prints sys.modules.
_IMPORT_ALONE = """
import importlib, json, os, sys, types
root = sys.argv[1]
for name in ("jaxmtl", "jaxmtl.training"):
    package = types.ModuleType(name)
    package.__path__ = [os.path.join(root, *name.split(".")[1:])]
    sys.modules[name] = package
importlib.import_module(sys.argv[2])
print(json.dumps(sorted(sys.modules)))
"""


def _modules_loaded_by(module: str) -> set[str]:
    root = os.path.dirname(jaxmtl.__file__)
    result = subprocess.run([sys.executable, "-c", _IMPORT_ALONE, root, module],
                            capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(result.stdout))


def test_config_imports_no_implementation_module_and_no_jax():
    loaded = _modules_loaded_by("jaxmtl.training.config")
    assert sorted(m for m in loaded if m.startswith("jaxmtl")) == [
        "jaxmtl", "jaxmtl.registry", "jaxmtl.training", "jaxmtl.training.config",
        "jaxmtl.training.config_base", "jaxmtl.training.module_optimizers_config",
        "jaxmtl.training.optimizer_config", "jaxmtl.training.service_config"]
    assert not {"jax", "flax", "optax", "numpy"} & loaded


def test_checkpoint_imports_no_log_writer_and_no_tensorboardx():
    loaded = _modules_loaded_by("jaxmtl.training.checkpoint")
    assert "jaxmtl.training.checkpoint" in loaded
    assert not [m for m in loaded if m.startswith(("jaxmtl.training.writers", "tensorboardX",
                                                   "orbax"))]


def test_json_and_tensorboard_writers_are_siblings_behind_metric_writer():
    from jaxmtl.training.writers import (
        LogWriter,
        MetricWriter,
        RunDirectoryWriter,
        TensorBoardWriter,
    )

    assert LogWriter.__bases__ == TensorBoardWriter.__bases__ == (RunDirectoryWriter,)
    for writer in (LogWriter, TensorBoardWriter):
        assert all(callable(getattr(writer, name))
                   for name in ("write_scalars", "flush", "close"))
    assert MetricWriter.__module__ == "jaxmtl.training.writers.base"
