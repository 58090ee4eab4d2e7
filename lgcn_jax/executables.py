"""Compiled programs kept on disk whole, so that a new process runs them without tracing them again.

JAX's persistent compilation cache (``compilation_cache``) skips XLA's compile, but a process still
traces and lowers every program to look it up; for ``predict`` (the network and the post-processing)
that is about half a second on a CPU, most of a one-photo ``lgcn-detect``.  Here the compiled
executable itself is stored, next to JAX's cache, keyed by everything that shapes it: the program's
code (lgcn_jax's sources and JAX's version), the backend and its device (and on a CPU its instruction
set), the XLA flags, the static settings and the shapes and dtypes of the arguments.  A program that
calls a library routine (a custom call) is not stored: loading one needs the routine registered first.

Used only where the compilation cache is on (``enable_compilation_cache``: ``lgcn-detect`` does it by
default); otherwise programs compile as usual.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform

import jax
import jaxlib
from jax.experimental import serialize_executable

from lgcn_jax.files import atomic_path
from lgcn_jax.logs import log

__all__ = ["cache_dir", "load_or_compile"]

FORMAT = 1
_loaded: dict = {}


def cache_dir() -> str | None:
    """The folder of stored executables: beside JAX's compilation cache, or None where that is off."""
    root = jax.config.jax_compilation_cache_dir
    return os.path.join(root, "lgcn_jax_executables") if root else None


@functools.lru_cache(maxsize=1)
def _environment() -> str:
    """What every stored program depends on beyond its own arguments."""
    package = os.path.dirname(os.path.abspath(__file__))
    sources = hashlib.sha256()
    for folder, _, files in sorted(os.walk(package)):
        for name in sorted(f for f in files if f.endswith(".py")):
            with open(os.path.join(folder, name), "rb") as f:
                sources.update(name.encode() + f.read())
    device = jax.devices()[0]
    cpu = ""
    try:  # an executable compiled for one CPU's instruction set must not run on another
        with open("/proc/cpuinfo") as f:
            cpu = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        cpu = platform.processor()
    return "|".join([str(FORMAT), jax.__version__, jaxlib.__version__,
                     device.platform, device.client.platform_version, getattr(device, "device_kind", ""), cpu,
                     os.environ.get("XLA_FLAGS", ""), str(jax.config.jax_enable_x64), str(jax.config.jax_default_matmul_precision),
                     sources.hexdigest()])


def _key(name: str, args: tuple, static: tuple) -> str:
    leaves, tree = jax.tree.flatten(args)
    shapes = [(tuple(x.shape), str(x.dtype)) for x in leaves]
    text = "|".join([_environment(), name, repr(static), str(tree), repr(shapes)])
    return hashlib.sha256(text.encode()).hexdigest()


def load_or_compile(jitted, name: str, args: tuple, static: tuple, out_tree):
    """``jitted`` (a ``jax.jit`` function whose trailing positional arguments ``static`` are static) compiled for
    ``args``, as a callable of ``*args``: from memory, from the folder of stored executables, or compiled (and
    stored there).  ``out_tree`` is the structure of its result (a ``PyTreeDef``), which loading needs."""
    folder = cache_dir()
    memo = (name, static, tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(args)), str(jax.tree.structure(args)), folder)
    if memo in _loaded:
        return _loaded[memo]
    path = os.path.join(folder, f"{name}-{_key(name, args, static)}.xla") if folder else None
    run = None
    if path and os.path.exists(path):
        try:
            with open(path, "rb") as f:
                run = serialize_executable.deserialize_and_load(f.read(), jax.tree.structure((args, {})), out_tree)
        except Exception as e:  # a damaged or foreign file: compile again and replace it
            log.debug("could not load %s (%s); compiling", path, e)
    if run is None:
        compiled = jitted.lower(*args, *static).compile()
        run = compiled
        if path and "custom_call_target" not in compiled.as_text():
            try:
                data, _, _ = serialize_executable.serialize(compiled)
                with atomic_path(path) as tmp, open(tmp, "wb") as f:
                    f.write(data)
            except Exception as e:  # a read-only or full cache: run without storing
                log.debug("could not store %s (%s)", path, e)
    _loaded[memo] = run
    return run
