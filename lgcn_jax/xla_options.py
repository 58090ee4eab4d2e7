"""XLA compiler options for the package's own programs: the network and the programs that run it.

On a CPU, XLA hands convolutions and matmuls to the YNNPACK library by default (jaxlib 0.10); for
this network's convolutions, of few channels on small maps, XLA's own kernels are faster
(docs/architecture.md has the measurements).  ``jit`` is ``jax.jit`` with the options below for
programs compiled where JAX's default backend is the CPU; the package uses it for the programs
that run the network.  Programs without the network (the decoding alone) keep XLA's defaults,
under which they ran faster.  An option is left out where ``XLA_FLAGS`` sets it (the caller's
choice wins) and where the installed XLA does not know it (an older or newer jaxlib: the programs
compile as plain ``jax.jit`` would).  GPUs and TPUs get no options.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

__all__ = ["CPU_OPTIONS", "compiler_options", "jit"]

# "": no operation goes to YNNPACK (its fusion types are "dot", "eltwise", "individual_convolution", ...).
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.lru_cache(maxsize=1)
def compiler_options() -> dict[str, str]:
    """The options ``jit`` compiles with in this process: ``CPU_OPTIONS`` on a CPU, less those ``XLA_FLAGS`` sets and
    those this XLA does not know; {} on other backends."""
    if jax.default_backend() != "cpu":
        return {}
    flags = os.environ.get("XLA_FLAGS", "")
    options = {k: v for k, v in CPU_OPTIONS.items() if f"--{k}=" not in flags}
    if not options:
        return {}
    try:  # an unknown option fails the compile of any program: try it on a trivial one first
        jax.jit(lambda x: x, compiler_options=options).lower(np.float32(0)).compile()
    except jax.errors.JaxRuntimeError:
        return {}
    return options


class _Jit:
    """``jax.jit(fun, compiler_options=compiler_options(), **kwargs)``, made at the first use (not at import, when the
    backend is not yet chosen); calls and attributes (``lower``, ``trace``, ...) go to it.  JAX takes compiler
    options only for the outermost program, so a call inside another trace (the caller's ``jax.jit`` or ``grad``;
    ``vmap`` keeps the options) goes to a plain ``jax.jit(fun, **kwargs)``, which becomes part of the caller's program."""

    def __init__(self, fun, kwargs: dict):
        self._fun, self._kwargs, self._tuned = fun, kwargs, None
        self._plain = jax.jit(fun, **kwargs)  # cheap: jax.jit neither traces nor touches a backend
        functools.update_wrapper(self, fun)

    def _get(self):
        if self._tuned is None:
            options = compiler_options()
            # Without options (GPUs, TPUs, an XLA without them) the plain function serves both uses: one cache.
            self._tuned = jax.jit(self._fun, compiler_options=options, **self._kwargs) if options else self._plain
        return self._tuned

    def __call__(self, *args, **kwargs):
        # Inside a caller's jit or grad JAX refuses the options (a ValueError naming them): the plain function
        # serves.  Asked first, not found by looking for tracers among the arguments, which would cost every
        # call a walk over the parameters' leaves.
        try:
            return self._get()(*args, **kwargs)
        except ValueError as e:
            if "compiler_options" not in str(e):
                raise
            return self._plain(*args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._get(), name)


def jit(fun=None, **kwargs):
    """``jax.jit`` with this machine's ``compiler_options()``; as a decorator, bare or with ``jax.jit``'s keywords."""
    if fun is None:
        return functools.partial(jit, **kwargs)
    return _Jit(fun, kwargs)
