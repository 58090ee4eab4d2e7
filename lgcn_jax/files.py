"""Writing files so that an interrupted program never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import os
from typing import Iterable

__all__ = ["atomic_path", "unique_names"]


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    ``suffix`` is appended to the temporary name for writers that choose a format by the file's
    ending (``np.savez`` adds ``.npz``, matplotlib reads ``.png``).  The folder is created; on an
    error the temporary file is removed and ``path`` is left as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def unique_names(names: Iterable[str]) -> list[str]:
    """The names with ``_2``, ``_3``, ... added to repeats, so that none is given twice: a, a, a_2 -> a, a_2, a_2_2."""
    out, taken = [], set()
    for stem in names:
        name, k = stem, 1
        while name in taken:
            k += 1
            name = f"{stem}_{k}"
        taken.add(name)
        out.append(name)
    return out
