"""`import jaxmtl` is cheap: heavy libraries load on first use, and importing has no side effect."""

import json
import os
import subprocess
import sys

import pytest

from jaxmtl._lazy import LazyModule, lazy_module

DEFERRED = ("orbax", "orbax.checkpoint", "tensorboardX", "pandas", "flax.nnx")

# One fresh process answers every import question (a Python + JAX import each would cost
# 2-3 s): what `import jaxmtl` loads, then `import jaxmtl.slicing`, then the first use of
# `jaxmtl.modules`, then the first DataFrame. Each step is recorded before the next runs.
PROBE = f"""
DEFERRED = {DEFERRED!r}
HEAVY = ("pandas", "orbax", "tensorboardX", "snorkel", "torch")
import json, sys
import jax
import jaxmtl
report = {{"loaded_at_import": [m for m in DEFERRED if m in sys.modules],
          "cache_dir_at_import": jax.config.jax_compilation_cache_dir,
          "slicing_at_import": "jaxmtl.slicing" in sys.modules,
          "modules_at_import": "jaxmtl.modules" in sys.modules}}
import jaxmtl.slicing
report["heavy_after_slicing"] = [m for m in HEAVY if m in sys.modules]
report["mmoe"] = jaxmtl.modules.MMoE.__name__
report["modules_after_use"] = "jaxmtl.modules" in sys.modules
jaxmtl.metrics_dict_to_dataframe({{"t/d/train/accuracy": 1.0}})
report["pandas_after_dataframe"] = "pandas" in sys.modules
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def probe():
    env = {key: value for key, value in os.environ.items()
           if key not in ("JAX_COMPILATION_CACHE_DIR", "JAXMTL_COMPILATION_CACHE")}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_loads_no_orbax_tensorboardx_pandas_or_nnx_and_sets_no_cache(probe):
    assert probe["loaded_at_import"] == [] and probe["cache_dir_at_import"] is None
    assert probe["pandas_after_dataframe"] is True


def test_import_jaxmtl_leaves_slicing_unloaded_and_slicing_loads_nothing_heavy(probe):
    assert probe["slicing_at_import"] is False
    assert probe["heavy_after_slicing"] == []


def test_import_jaxmtl_defers_the_modules_package(probe):
    assert probe["modules_at_import"] is False
    assert (probe["mmoe"], probe["modules_after_use"]) == ("MMoE", True)


def test_lazy_module_imports_on_first_attribute():
    module = lazy_module("json")
    assert isinstance(module, LazyModule)
    assert "not loaded yet" in repr(module)
    assert module.dumps({"a": 1}) == json.dumps({"a": 1})
    assert "loaded" in repr(module) and "not loaded" not in repr(module)
    assert module.__name__ == "json"


def test_lazy_module_names_a_missing_module_on_use():
    module = lazy_module("jaxmtl_no_such_module")
    with pytest.raises(ModuleNotFoundError) as raised:
        _ = module.anything
    assert raised.value.name == "jaxmtl_no_such_module"
