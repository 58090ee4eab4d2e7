"""Libraries that only some paths use, imported when first used rather than when lgcn_jax is.

Loading a model folder needs neither orbax (training checkpoints) nor optax (optimisers), but the modules
that handle workdirs sit below the ones that load models; importing those libraries only on first use keeps
``import lgcn_jax`` and ``lgcn-detect`` from paying for them (about 0.2 s of a fresh process on a CPU).
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

__all__ = ["lazy_import"]


def lazy_import(name: str) -> ModuleType:
    """The module ``name``, whose code runs at the first access to one of its attributes (``importlib.util.LazyLoader``)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
