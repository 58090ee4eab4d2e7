"""Writing files so that an interrupted program never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import os

__all__ = ["atomic_path"]


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
