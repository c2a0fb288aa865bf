"""`import jaxmtl` is cheap: heavy libraries load on first use, and importing has no side effect."""

import json
import os
import subprocess
import sys

import pytest

from jaxmtl._lazy import LazyModule, lazy_module

DEFERRED = ("orbax", "orbax.checkpoint", "tensorboardX", "pandas", "flax.nnx")

PROBE = f"""
DEFERRED = {DEFERRED!r}
import json, sys
import jax
import jaxmtl
report = {{"loaded_at_import": [m for m in DEFERRED if m in sys.modules],
          "cache_dir_at_import": jax.config.jax_compilation_cache_dir}}
jaxmtl.metrics_dict_to_dataframe({{"t/d/train/accuracy": 1.0}})
report["pandas_after_dataframe"] = "pandas" in sys.modules
print(json.dumps(report))
"""


def test_import_loads_no_orbax_tensorboardx_pandas_or_nnx_and_sets_no_cache():
    env = {key: value for key, value in os.environ.items()
           if key not in ("JAX_COMPILATION_CACHE_DIR", "JAXMTL_COMPILATION_CACHE")}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"loaded_at_import": [], "cache_dir_at_import": None,
                      "pandas_after_dataframe": True}


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
