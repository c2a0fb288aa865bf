"""JAX's persistent compilation cache, on by default for jaxmtl runs.

A second run of the same script loads its compiled programs from disk instead of
compiling them again. jaxmtl turns the cache on when the first ``Trainer`` is built (never
at import), unless you decided yourself:

=====================================================  ===========================================
situation                                              what jaxmtl does
=====================================================  ===========================================
nothing configured                                     cache in ``$XDG_CACHE_HOME/jaxmtl/xla``
                                                       (default ``~/.cache/jaxmtl/xla``); programs
                                                       that took >= ``MIN_COMPILE_TIME_SECS`` to
                                                       compile are stored
``JAXMTL_COMPILATION_CACHE=0`` (or ``false``/``off``)  nothing
``disable_compilation_cache()`` called                 nothing (and turns off a cache jaxmtl set)
JAX's cache configured by you: ``JAX_COMPILATION_      nothing: your directory and thresholds stay
CACHE_DIR``, ``jax.config.update(                      as you set them
"jax_compilation_cache_dir", ...)``, or
``jax_enable_compilation_cache=False``
``enable_compilation_cache(path)`` called              cache in ``path``, whatever the above says
=====================================================  ===========================================

The cache is trusted code: do not point it at a directory others can write to (see JAX's
"Persistent compilation cache" guide).
"""

from __future__ import annotations

import logging
import os

import jax

logger = logging.getLogger(__name__)

ENV_SWITCH = "JAXMTL_COMPILATION_CACHE"
"""Environment variable: ``0``/``false``/``off``/``no`` keeps jaxmtl from turning the cache on."""

MIN_COMPILE_TIME_SECS = 0.1
"""Programs compiled faster than this are not stored (JAX's default, 1 s, skips most CPU
train steps; below ~0.1 s, reading the file costs about what compiling does)."""

_OFF_VALUES = frozenset({"0", "false", "off", "no"})

# The one process-wide decision (JAX's cache is process-wide too): None until the first
# Trainer asks; then the directory jaxmtl set, or "" when it left the cache alone.
_decision: str | None = None


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/jaxmtl/xla``, or ``~/.cache/jaxmtl/xla`` when XDG_CACHE_HOME is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxmtl", "xla")


def _user_configured_jax_cache() -> bool:
    # JAX_COMPILATION_CACHE_DIR in the environment sets jax_compilation_cache_dir at import.
    return (jax.config.jax_compilation_cache_dir is not None
            or not jax.config.jax_enable_compilation_cache)


def enable_compilation_cache(cache_dir: str | None = None,
                             min_compile_time_secs: float = MIN_COMPILE_TIME_SECS) -> str:
    """Turns JAX's persistent compilation cache on in ``cache_dir``, whatever was set before.

    Args:
      cache_dir: the directory (created if missing); default ``default_cache_dir()``.
      min_compile_time_secs: programs that compiled faster than this are not stored.

    Returns:
      The absolute cache directory.

    Raises:
      ValueError: if ``min_compile_time_secs`` is negative or not a number.
    """
    global _decision
    if not isinstance(min_compile_time_secs, int | float) or not min_compile_time_secs >= 0:
        raise ValueError(f"min_compile_time_secs: expected a number >= 0, "
                         f"got {min_compile_time_secs!r}")
    path = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    _decision = path
    logger.debug("JAX persistent compilation cache in %s", path)
    return path


def disable_compilation_cache() -> None:
    """Keeps jaxmtl from turning the cache on, and turns off a cache jaxmtl turned on.

    A cache you configured through JAX yourself is left alone.
    """
    global _decision
    if _decision:
        jax.config.update("jax_compilation_cache_dir", None)
        _reset_jax_cache()
    _decision = ""


def _reset_jax_cache() -> None:
    # JAX opens the cache directory once, at the first compile after it is set; forget it.
    try:
        from jax._src import compilation_cache
    except ImportError:  # a JAX without the private module: the directory change suffices
        return
    compilation_cache.reset_cache()


def ensure_compilation_cache() -> str | None:
    """Turns the cache on at the default place, once per process, unless the user decided.

    Called when a ``Trainer`` is built. See the module docstring for the rules.

    Returns:
      The directory jaxmtl set, or None when it left JAX's cache as it was.
    """
    global _decision
    if _decision is None:
        if os.environ.get(ENV_SWITCH, "").strip().lower() in _OFF_VALUES:
            _decision = ""
        elif _user_configured_jax_cache():
            _decision = ""
        else:
            try:
                enable_compilation_cache()
            except OSError as error:  # a read-only home must not stop training
                logger.warning("JAX compilation cache off: cannot create %s (%s)",
                               default_cache_dir(), error)
                _decision = ""
    return _decision or None
