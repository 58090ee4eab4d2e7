"""Compiled programs kept on disk whole, so that a new process runs them without tracing them again.

JAX's persistent compilation cache (``compilation_cache``) skips XLA's compile, but a process still
traces and lowers every program to look it up; for ``predict`` (the network and the post-processing)
that is about half a second on a CPU, most of a one-photo ``lgcn-detect``.  Here the compiled
executable itself is stored, next to JAX's cache, keyed by everything that shapes it: the program's
code (lgcn_jax's sources and JAX's version), the backend and its device (and on a CPU its instruction
set), the XLA flags, the static settings and the shapes and dtypes of the arguments.  A program that
calls a library routine (a custom call) is not stored: loading one needs the routine registered first.
A loaded program's first run is checked; one that fails is compiled again and its file removed.

Programs JAX loads from its own persistent cache leave kernels behind that a fresh compile in the same
process then shares rather than includes, so an executable stored there is incomplete (it fails in the
next process with "Function ... not found"): the store is used only where JAX's persistent cache is off.
It is on once a program asks for it (``enable_program_store``; ``lgcn-detect`` does by default), and
only on Linux (XLA's loading of CPU executables has crashed elsewhere: jax-ml/jax issues).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform

import jax
import jaxlib
from jax.experimental import serialize_executable

from lgcn_jax.files import atomic_path
from lgcn_jax.logs import log

__all__ = ["enable_program_store", "default_store_dir", "cache_dir", "load_or_compile"]

FORMAT = 1
_loaded: dict = {}
_store: list[str] = []  # the folder a program enabled (process-wide, like JAX's own cache setting)


def default_store_dir() -> str:
    """``$XDG_CACHE_HOME/lgcn_jax/programs`` (``~/.cache/lgcn_jax/programs``)."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lgcn_jax", "programs")


def enable_program_store(path: str | None = None) -> str | None:
    """Store compiled programs in ``path`` (default ``default_store_dir()``) and load them from there, for this process.
    Returns the folder, or None where it cannot be created (a read-only home: programs compile as usual)."""
    path = path or default_store_dir()
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    _store[:] = [path]
    return path


def cache_dir() -> str | None:
    """The folder of stored programs, where one is enabled, the system is Linux and JAX's persistent cache is off."""
    jax_cache = jax.config.jax_compilation_cache_dir and jax.config.jax_enable_compilation_cache
    return _store[0] if _store and platform.system() == "Linux" and not jax_cache else None


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


class _Checked:
    """A loaded executable whose first run is waited for; if it fails, the program is compiled and the file removed."""

    def __init__(self, run, recompile, path: str):
        self.run, self.recompile, self.path = run, recompile, path

    def __call__(self, *args):
        if self.recompile is None:
            return self.run(*args)
        try:
            out = jax.block_until_ready(self.run(*args))
        except jax.errors.JaxRuntimeError as e:
            log.warning("the stored program %s does not run (%s); compiling it again", self.path, str(e).splitlines()[0][:200])
            with contextlib.suppress(OSError):
                os.remove(self.path)
            self.run = self.recompile()
            out = self.run(*args)
        self.recompile = None
        return out


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
                loaded = serialize_executable.deserialize_and_load(f.read(), jax.tree.structure((args, {})), out_tree)
            run = _Checked(loaded, lambda: jitted.lower(*args, *static).compile(), path)
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
