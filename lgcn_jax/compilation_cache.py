"""JAX's persistent compilation cache for programs that start often (``lgcn-detect``, ``lgcn-extract``)."""

from __future__ import annotations

import os

import jax

__all__ = ["enable_compilation_cache", "default_cache_dir"]


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/lgcn_jax/xla`` (``~/.cache/lgcn_jax/xla``)."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lgcn_jax", "xla")


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Keep XLA's compiled programs on disk, so that a later process skips compiling the network.

    A cache folder the user set (``$JAX_COMPILATION_CACHE_DIR`` or ``jax_compilation_cache_dir``) is kept;
    else ``path``, by default ``default_cache_dir()``.  Returns the folder in use, or None where it cannot
    be created (a read-only home: the program runs without the cache).
    """
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    path = path or default_cache_dir()
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path
