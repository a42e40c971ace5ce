"""safetensors: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
(plus an optional "__metadata__" of strings), then the raw little-endian tensor bytes.

The reader checks the whole header against the bytes present before trusting any of it: every entry's
byte range matches its shape and dtype, the ranges tile the data section with no gap, overlap or
trailing bytes (what the reference implementation requires), and no name appears twice.

MindSpore's `save_checkpoint(..., format="safetensors")` writes this same format through the
safetensors library, with MindFormers' parameter names and `{"format": "ms"}` as metadata; it marks
packed int4 tensors by naming them in the metadata (`name: "Int4"`), which no conversion here supports.

`get` reads nothing: a tensor is a NumPy view of a copy-on-write (MAP_PRIVATE) mapping of just its own
bytes, so loading a model costs file-backed page cache, not a copy, and a write to the array (a backend
may alias it) lands in private pages, never in the user's file.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from accel.checkpoint.base import DTYPES, Entry, FileReader, TensorInfo, entries_of, pieces, put, shape_of, truncated
from accel.errors import CheckpointError

CODES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
         "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
         "U8": "uint8", "BOOL": "bool"}
NAMES = {v: k for k, v in CODES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise CheckpointError(f"tensor {k!r} appears twice in the header")
        out[k] = v
    return out


class SafetensorsFile(FileReader):
    """One .safetensors file, header validated at open; tensors read lazily."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        size = self._stat()
        if size < 8:
            raise CheckpointError(f"{self.path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", self._pread(8, 0))
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{self.path}: header claims {n} bytes but the file has {size}; truncated?")
        raw = self._pread(n, 8)
        try:
            if not raw.lstrip().startswith(b"{"):
                raise ValueError
            header = json.loads(raw, object_pairs_hook=_no_duplicates)
        except CheckpointError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise CheckpointError(f"{self.path}: header is not a JSON object; not a safetensors file?") from None
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(f"{self.path}: __metadata__ is not an object of strings")
        self.metadata: dict[str, str] = metadata
        self.data_start = 8 + n
        data_len = size - self.data_start
        spans = []
        for name, entry in header.items():
            info, begin, end = self._check_entry(name, entry, data_len)
            self._add(name, info, [(self.data_start + begin, end - begin)])
            spans.append((begin, end, name))
        # the tensors must tile the data section: no overlap, no gap, nothing after the last one
        pos = 0
        for begin, end, name in sorted(spans):
            if begin != pos:
                what = "overlaps the tensor before it" if begin < pos else f"leaves a gap of {begin - pos} bytes"
                raise CheckpointError(f"{self.path}: tensor {name!r} {what}; the header is corrupt")
            pos = end
        if pos != data_len:
            raise CheckpointError(f"{self.path}: {data_len - pos} bytes after the last tensor; the header is corrupt")

    def get(self, name: str) -> np.ndarray:
        info, [(offset, n)] = self.layout[name]
        if n == 0 or offset % info.dtype.alignment:  # nothing to map, or a view torch would refuse
            return super().get(name)
        fd = self._fileno()
        if os.fstat(fd).st_size < offset + n:  # a mapping past the end would fault (SIGBUS) when read
            raise truncated(self.path)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        # One mapping per tensor: it is unmapped when the last view of it goes, so a loader that casts
        # and drops each tensor in turn never holds the file's pages resident all at once.
        window = mmap.mmap(fd, offset + n - start, offset=start, access=mmap.ACCESS_COPY)
        return np.frombuffer(window, info.dtype, count=n // info.dtype.itemsize,
                             offset=offset - start).reshape(info.shape)

    def _check_entry(self, name: str, e: object, data_len: int) -> tuple[TensorInfo, int, int]:
        where = f"{self.path}: tensor {name!r}"
        if not name:
            raise CheckpointError(f"{self.path}: a tensor has an empty name")
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise CheckpointError(f"{where}: header entry lacks dtype, shape or data_offsets")
        code, offsets = e["dtype"], e["data_offsets"]
        if not isinstance(code, str) or code not in CODES:
            raise CheckpointError(f"{where}: unknown dtype {code!r}; supported: {', '.join(CODES)}")
        shape = shape_of(e["shape"], where)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets)):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
        begin, end = offsets
        info = TensorInfo(DTYPES[CODES[code]], shape)
        if not 0 <= begin <= end <= data_len:
            raise CheckpointError(f"{where}: bytes {begin}..{end} lie outside the {data_len} data bytes; truncated?")
        if end - begin != info.nbytes:
            raise CheckpointError(f"{where}: shape {list(shape)} of {code} needs {info.nbytes} bytes, "
                                  f"header gives {end - begin}")
        return info, begin, end


class MindSporeSafetensorsFile(SafetensorsFile):
    """A safetensors file as MindSpore writes it (MindFormers names, metadata {"format": "ms"})."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        for name in self.layout:
            if name in self.metadata:  # MindSpore's per-tensor dtype override: packed int4
                raise CheckpointError(f"{self.path}: tensor {name!r} is stored as MindSpore "
                                      f"{self.metadata[name]!r}, which cannot be converted")


def write_entries(path: str | Path, entries: Sequence[Entry], metadata: dict[str, str] | None = None) -> None:
    """Stream entries, in order, into a safetensors file."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for e in entries:
        if e.info.dtype.name not in NAMES:
            raise CheckpointError(f"tensor {e.name!r}: dtype {e.info.dtype} cannot be stored in safetensors")
        if e.name in header:
            raise CheckpointError(f"tensor {e.name!r} appears twice")
        header[e.name] = {"dtype": NAMES[e.info.dtype.name], "shape": list(e.info.shape),
                          "data_offsets": [offset, offset + e.info.nbytes]}
        offset += e.info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            for piece in pieces(e, str(path)):
                put(f, piece)


def write(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write in-memory tensors (in the given order) to a safetensors file."""
    write_entries(path, entries_of(tensors), metadata)
