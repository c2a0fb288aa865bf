"""JAX's persistent compilation cache: on by default at the first Trainer, off when asked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxmtl import compilation_cache

SCRIPT = Path(__file__).with_name("compile_cache_run.py")


def run_fit(cache_home: Path, **env_overrides: str) -> dict:
    # The suite's compile settings (conftest: JAX_DISABLE_MOST_OPTIMIZATIONS, XLA_FLAGS)
    # are left out too: this checks the real build, whose train step takes over
    # MIN_COMPILE_TIME_SECS to compile.
    env = {key: value for key, value in os.environ.items()
           if key not in (compilation_cache.ENV_SWITCH, "JAX_COMPILATION_CACHE_DIR",
                          "JAX_DISABLE_MOST_OPTIMIZATIONS", "XLA_FLAGS")}
    env.update(XDG_CACHE_HOME=str(cache_home), **env_overrides)
    done = subprocess.run([sys.executable, str(SCRIPT)], cwd=SCRIPT.parent, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_run_loads_compiled_programs_from_the_cache(tmp_path):
    first = run_fit(tmp_path)
    second = run_fit(tmp_path)
    cache_dir = tmp_path / "jaxmtl" / "xla"
    assert first["cache_dir"] == second["cache_dir"] == str(cache_dir)
    assert first["cache_hits"] == 0
    assert len(os.listdir(cache_dir)) > 0
    # JAX records a backend_compile event for every program, loaded or compiled; those
    # that hit the cache were loaded. The train step (well over 0.1 s to compile) and every
    # other stored program come back from disk; only programs faster to compile than
    # MIN_COMPILE_TIME_SECS are compiled again.
    assert first["compiles"] == second["compiles"]
    assert second["cache_hits"] >= 1
    assert second["compiles"] - second["cache_hits"] < first["compiles"]
    assert second["params_sum"] == first["params_sum"]


@pytest.fixture
def fresh_decision(monkeypatch):
    """A process that has not decided yet; JAX's cache settings restored afterwards."""
    saved = {name: getattr(jax.config, name) for name in (
        "jax_compilation_cache_dir", "jax_enable_compilation_cache",
        "jax_persistent_cache_min_compile_time_secs")}
    monkeypatch.setattr(compilation_cache, "_decision", None)
    monkeypatch.delenv(compilation_cache.ENV_SWITCH, raising=False)
    yield
    compilation_cache.disable_compilation_cache()
    for name, value in saved.items():
        jax.config.update(name, value)


def test_default_dir_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation_cache.default_cache_dir() == str(tmp_path / "jaxmtl" / "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compilation_cache.default_cache_dir() == str(
        tmp_path / "home" / ".cache" / "jaxmtl" / "xla")


def test_a_cache_the_user_configured_is_left_alone(fresh_decision, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.5)
    assert compilation_cache.ensure_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.5
    assert not (tmp_path / "xdg").exists()


def test_first_trainer_turns_the_cache_on_once(fresh_decision, tmp_path, monkeypatch):
    import jaxmtl

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    jax.config.update("jax_compilation_cache_dir", None)
    jaxmtl.Trainer(progress_bar=False)
    expected = str(tmp_path / "jaxmtl" / "xla")
    assert jax.config.jax_compilation_cache_dir == expected
    assert jax.config.jax_persistent_cache_min_compile_time_secs == (
        compilation_cache.MIN_COMPILE_TIME_SECS)
    assert os.path.isdir(expected)
    # Decided once per process: a later Trainer changes nothing, disabling turns it off.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other"))
    jaxmtl.Trainer(progress_bar=False)
    assert jax.config.jax_compilation_cache_dir == expected
    compilation_cache.disable_compilation_cache()
    assert jax.config.jax_compilation_cache_dir is None
    assert compilation_cache.ensure_compilation_cache() is None


@pytest.mark.parametrize("value", ["0", "false", "OFF", " no "])
def test_env_switch_keeps_the_cache_off(fresh_decision, tmp_path, monkeypatch, value):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv(compilation_cache.ENV_SWITCH, value)
    jax.config.update("jax_compilation_cache_dir", None)
    assert compilation_cache.ensure_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir is None
    assert not (tmp_path / "jaxmtl").exists()


def test_min_compile_time_is_checked(fresh_decision, tmp_path):
    with pytest.raises(ValueError, match=r"min_compile_time_secs: expected a number >= 0, "
                                         r"got -1"):
        compilation_cache.enable_compilation_cache(str(tmp_path), min_compile_time_secs=-1)
