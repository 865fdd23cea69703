"""Metric sinks: ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard event files.

Only process 0 writes. Values are plain floats; ``None`` values (e.g. MFU on a CPU) are skipped.
Both are appended to, which a bucket cannot do: they are written in a :class:`~dcd_jax.storage.Mirror`
(the directory itself when local) and uploaded by :meth:`MetricsWriter.sync` (at every checkpoint,
at most every ``SYNC_S`` seconds otherwise, and at the end).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

import jax

from dcd_jax import storage

SYNC_S = 60.0


class MetricsWriter:
    def __init__(self, out_dir: str | Path, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.out_dir = storage.path(out_dir)
        self._jsonl = None
        self._tb = None
        self._mirror = None
        if not self.enabled:
            return
        self._mirror = storage.Mirror(out_dir, files=("metrics.jsonl",))
        self._jsonl = open(self._mirror.local / "metrics.jsonl", "a", buffering=1)
        self._synced = time.monotonic()
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self._mirror.local / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {}
        for k, v in metrics.items():
            if v is None:
                continue
            v = float(v)
            clean[k] = v if math.isfinite(v) else str(v)
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float):
                    self._tb.add_scalar(k, v, int(step))
        if time.monotonic() - self._synced > SYNC_S:
            self.sync()

    def sync(self) -> None:
        """Make every row written so far durable where ``out_dir`` lives (a bucket: upload)."""
        if self._mirror is None:
            return
        if self._tb is not None:
            self._tb.flush()
        self._mirror.sync()
        self._synced = time.monotonic()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._mirror is not None:
            self._mirror.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl``; a resumed run may repeat steps, the last occurrence wins."""
    rows: dict[int, dict[str, Any]] = {}
    for line in storage.path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["step"]] = {**rows.get(row["step"], {}), **row}
    return [rows[s] for s in sorted(rows)]
