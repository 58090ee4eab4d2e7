"""What runs when the caller does not say: one table of defaults by the machine JAX runs on.

On a CPU the defaults are the fast ones (the small network on 42x42 crops, one pass, a face search
sized for faces of 80 px and more); on a GPU or TPU the accurate ones (the paper's network, two
passes, the full search).  ``detect``, ``track``, ``lgcn-detect`` and ``extract`` use them for every argument left
at None; every one can be given instead.
"""

from __future__ import annotations

import dataclasses

import jax

__all__ = ["Defaults", "DEFAULTS", "machine_kind", "defaults"]


@dataclasses.dataclass(frozen=True)
class Defaults:
    """``weights``: released weights; ``detector``: a name in ``detectors.DETECTORS``; ``refine``: passes re-cut
    from the landmarks after the first (``detect``)."""

    weights: str
    detector: str
    refine: int


DEFAULTS = {"cpu": Defaults(weights="300w_cpu42", detector="yunet-fast", refine=0),
            "accelerator": Defaults(weights="300w_paper", detector="yunet", refine=1)}


def machine_kind(backend: str | None = None) -> str:
    """"cpu" where JAX's default backend (or ``backend``) is the CPU, else "accelerator"."""
    return "cpu" if (jax.default_backend() if backend is None else backend) == "cpu" else "accelerator"


def defaults(backend: str | None = None) -> Defaults:
    """The defaults of this machine (or of ``backend``: "cpu", "gpu", "tpu")."""
    return DEFAULTS[machine_kind(backend)]
