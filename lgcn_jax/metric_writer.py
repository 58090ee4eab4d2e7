"""Training metrics: every number as a JSON line, and TensorBoard event files where possible.

``WORKDIR/metrics.jsonl`` holds one ``{"step": s, "time": t, name: value, ...}`` object a
line and needs nothing to read (``read_metrics``).  TensorBoard scalars go to ``WORKDIR/tb``
through the ``tensorboard`` package's own event writer, which needs no TensorFlow; where
``tensorboard`` is not installed, only the JSON lines are written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

from lgcn_jax.files import atomic_path

__all__ = ["MetricWriter", "read_metrics", "METRICS_FILE", "DROPPED_FILE"]

METRICS_FILE = "metrics.jsonl"
DROPPED_FILE = "metrics.dropped.jsonl"  # lines of steps that a resumed run trains again
log = logging.getLogger("lgcn_jax")


class MetricWriter:
    """Append scalars to ``metrics.jsonl`` and (if available) TensorBoard, keyed by step.

    On resume at ``start_step`` the lines of later steps, written by the interrupted run
    for steps that will be trained again, move to ``metrics.dropped.jsonl`` so each step is
    logged once in ``metrics.jsonl`` and no line is lost.  A file that is not such a log
    (a record without "step") raises ValueError naming it; nothing is changed then.
    """

    def __init__(self, workdir: str, start_step: int = 0):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILE)
        if os.path.exists(self.path):
            records = read_metrics(workdir)
            for k, r in enumerate(records):
                if not isinstance(r, dict) or not isinstance(r.get("step"), int):
                    raise ValueError(f"{self.path}: record {k + 1} ({json.dumps(r)[:80]}) is not an lgcn_jax metrics line "
                                     f"(no integer \"step\"); move the file away or use another --workdir")
            kept = [r for r in records if r["step"] <= start_step]
            dropped = [r for r in records if r["step"] > start_step]
            if dropped:
                with open(os.path.join(workdir, DROPPED_FILE), "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in dropped)
                log.warning("%s: %d lines of steps %d-%d, after the step this run starts from (%d), moved to %s",
                            self.path, len(dropped), dropped[0]["step"], dropped[-1]["step"], start_step, DROPPED_FILE)
            with atomic_path(self.path) as tmp, open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        try:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._tb = EventFileWriter(os.path.join(workdir, "tb"))
        except ImportError:
            log.info("tensorboard is not installed: metrics go to %s only", self.path)

    @classmethod
    def disabled(cls) -> "MetricWriter":
        """A writer that writes nothing (the processes other than the first of a multi-host run)."""
        w = cls.__new__(cls)
        w.path, w._file, w._tb = None, None, None
        return w

    def write(self, step: int, values: dict[str, float]) -> None:
        if self._file is None:
            return
        values = {k: float(v) for k, v in values.items()}
        record = {"step": int(step), "time": time.time(), **{k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary

            summary = Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
            self._tb.add_event(Event(wall_time=record["time"], step=int(step), summary=summary))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str, file: str = METRICS_FILE) -> list[dict]:
    """All records of ``WORKDIR/metrics.jsonl`` (or ``file``, e.g. ``DROPPED_FILE``) in order (a torn line, from
    a killed run, is skipped)."""
    path = os.path.join(workdir, file)
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records
