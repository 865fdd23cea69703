"""Memory-mapped reading of safetensors files, bf16 included.

``safetensors``' NumPy backend cannot return bfloat16 tensors, and its JAX backend would
materialize each tensor on one device. Sharded loading needs neither: it needs a zero-copy
host view from which each device's slice is cut. The format is simple (8-byte header length,
JSON header of name -> dtype/shape/offsets, raw little-endian data), so this module maps the
file once and hands out ``np.ndarray`` views. Writing uses ``safetensors.numpy`` (which handles
``ml_dtypes.bfloat16``). Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from dcd_jax.errors import CheckpointError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
    """Lazy, read-only access to the tensors of one ``.safetensors`` file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{self.path}: not a safetensors file (too short: {size} bytes)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:  # checked before reading: a damaged length must not allocate terabytes
                raise CheckpointError(
                    f"{self.path}: damaged safetensors file: the header claims {header_len} bytes but the file "
                    f"has {size} (truncated or not a safetensors file)"
                )
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: damaged safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: damaged safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", {}) or {}
        self.header = header
        self._data_start = 8 + header_len
        self._check_extents(size)
        self._mmap: np.memmap | None = None

    def _check_extents(self, size: int) -> None:
        """Every tensor's byte range lies in the file and matches its dtype and shape (else: truncated)."""
        for name, info in self.header.items():
            try:
                start, end = (int(x) for x in info["data_offsets"])
                shape, dtype = tuple(int(d) for d in info["shape"]), info["dtype"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name!r}: damaged header entry {info!r}") from None
            if self._data_start + end > size or not 0 <= start <= end:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r}: bytes {start}..{end} of the data lie beyond the end of the "
                    f"file ({size - self._data_start} data bytes): the file is truncated"
                )
            if dtype in _DTYPES and end - start != math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r}: {end - start} bytes do not hold shape {list(shape)} of {dtype}"
                )

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """Zero-copy view of tensor ``name``."""
        info = self.header[name]
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, end = info["data_offsets"]
        buf = self._mmap[self._data_start + start : self._data_start + end]
        return buf.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def save_safetensors(tensors: dict[str, np.ndarray], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"})
