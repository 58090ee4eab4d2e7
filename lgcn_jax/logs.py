"""Logging: the library's logger, full error details in a workdir's log file, and quiet late reports.

The library only logs.  What goes where is chosen by the program: the command-line entry points and
``train_and_evaluate`` (for its workdir) call ``log_details_to`` and ``quiet_failed_restores``; loading
a model installs nothing.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["log", "details", "LOG_FILE", "short_reason", "log_details_to", "detail_log_path", "quiet_failed_restores"]

log = logging.getLogger("lgcn_jax")
details = logging.getLogger("lgcn_jax.details")  # full tracebacks: to a workdir's log file, not the terminal
details.propagate = False
LOG_FILE = "lgcn.log"


def short_reason(e: BaseException | None) -> str:
    """One line of an exception (TensorStore's errors run over many lines)."""
    if e is None:
        return "unknown error"
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first[:300]}"


def log_details_to(workdir: str) -> str:
    """Send full error details (tracebacks of failed restores and saves) to ``WORKDIR/lgcn.log``; returns its path."""
    path = os.path.abspath(os.path.join(workdir, LOG_FILE))
    if not any(getattr(h, "baseFilename", None) == path for h in details.handlers):
        os.makedirs(workdir, exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        details.addHandler(handler)
        details.setLevel(logging.DEBUG)
    return path


def detail_log_path() -> str | None:
    """The log file that ``log_details_to`` opened last, if any."""
    paths = [h.baseFilename for h in details.handlers if hasattr(h, "baseFilename")]
    return paths[-1] if paths else None


def _from_failed_restore(text: str) -> bool:
    return "orbax" in text or "tensorstore" in text.lower() or "_read_array_index" in text


class _OrbaxTaskFilter(logging.Filter):
    """After a failed restore, orbax's other array reads fail too, and asyncio reports each as "Task exception
    was never retrieved" with a traceback (once per array, many screens).  The restore's own error says
    what happened: these go to the details log only."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Task exception was never retrieved") and _from_failed_restore(message):
            details.debug("%s", message, exc_info=record.exc_info)
            return False
        return True


def _quiet_unraisablehook(original):
    def hook(unraisable):
        # After a failed restore, TensorStore completes its reads on a thread and calls back into the
        # asyncio loop orbax has already closed; each callback reports this error as unraisable. It
        # tells the user nothing: keep it in the details log, let every other report through.
        value = unraisable.exc_value
        if (isinstance(value, RuntimeError) and str(value) == "Event loop is closed") or _from_failed_restore(repr(unraisable.object)):
            details.debug("late TensorStore callback after a failed checkpoint operation",
                          exc_info=(unraisable.exc_type, value, unraisable.exc_traceback))
            return
        original(unraisable)

    hook._lgcn_quiet = True
    return hook


def quiet_failed_restores() -> None:
    """Keep the late, repeated reports that follow a failed orbax restore out of the terminal (into the
    details log): a process-wide hook, so programs install it, never the library on its own."""
    if not getattr(sys.unraisablehook, "_lgcn_quiet", False):
        sys.unraisablehook = _quiet_unraisablehook(sys.unraisablehook)
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _OrbaxTaskFilter) for f in asyncio_log.filters):
        asyncio_log.addFilter(_OrbaxTaskFilter())
