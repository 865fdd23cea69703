"""Metric sinks: ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard event files.

Only process 0 writes. Values are plain floats; ``None`` values (e.g. MFU on a CPU) are skipped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import jax


class MetricsWriter:
    def __init__(self, out_dir: str | Path, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.out_dir = Path(out_dir)
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.out_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))

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

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl``; a resumed run may repeat steps, the last occurrence wins."""
    rows: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["step"]] = {**rows.get(row["step"], {}), **row}
    return [rows[s] for s in sorted(rows)]
