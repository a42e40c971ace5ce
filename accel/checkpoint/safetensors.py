"""HF safetensors: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}} (plus an optional "__metadata__"), then the raw little-endian tensor bytes.

The reader checks every header entry against the bytes present before trusting it and returns
memory-mapped NumPy views, so reading streams one tensor at a time.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from accel.errors import CheckpointError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


class SafetensorsFile:
    """One .safetensors file, header validated at open; tensors read lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: too short to be a safetensors file ({size} bytes)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER or 8 + n > size:
                    raise CheckpointError(f"{self.path}: header claims {n} bytes but the file has {size}; truncated?")
                raw = f.read(n)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise CheckpointError(f"{self.path}: is a directory, not a safetensors file") from None
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{self.path}: header is not valid JSON; not a safetensors file?") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        data_len = size - self.data_start
        for name, e in header.items():
            self.entries[name] = self._check_entry(name, e, data_len)
        self._map: np.memmap | None = None

    def _check_entry(self, name: str, e: object, data_len: int) -> tuple[np.dtype, tuple[int, ...], int, int]:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise CheckpointError(f"{where}: header entry lacks dtype, shape or data_offsets")
        if e["dtype"] not in DTYPES:
            raise CheckpointError(f"{where}: unknown dtype {e['dtype']!r}")
        shape, offsets = e["shape"], e["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(x, int) and x >= 0 for x in shape)):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(x, int) for x in offsets)):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
        begin, end = offsets
        dtype = DTYPES[e["dtype"]]
        expected = math.prod(shape) * dtype.itemsize
        if not 0 <= begin <= end <= data_len:
            raise CheckpointError(f"{where}: bytes {begin}..{end} lie outside the {data_len} data bytes; truncated?")
        if end - begin != expected:
            raise CheckpointError(f"{where}: shape {shape} of {e['dtype']} needs {expected} bytes, "
                                  f"header gives {end - begin}")
        return dtype, tuple(shape), begin, end

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def get(self, name: str) -> np.ndarray:
        """A read-only view of the tensor, mapped from the file."""
        dtype, shape, begin, end = self.entries[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._map[self.data_start + begin : self.data_start + end]
        return raw.view(dtype).reshape(shape)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.entries:
            yield name, self.get(name)


def write(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write tensors (in the given order) to a safetensors file."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, a in tensors.items():
        a = np.asarray(a)
        if a.dtype not in CODES:
            raise CheckpointError(f"tensor {name!r}: dtype {a.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": CODES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())
