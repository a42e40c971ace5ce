"""MindSpore `.ckpt`: the protobuf message `Checkpoint` (mindspore/train/checkpoint_pb2.py, proto2)

    message Checkpoint { repeated Value value = 1;
                         message Value { required string tag = 1;
                                         oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; } } }
    message TensorProto { repeated int64 dims = 1; required string tensor_type = 2;
                          required bytes tensor_content = 3; }

read and written here field by field on the wire, never as one message in memory: the reader indexes
where each tensor_content lies and skips over it; the writer emits each Value's framing and then
streams its content.

MindSpore's own conventions, followed both ways:
- `save_checkpoint` serialises one Checkpoint per Value and concatenates them (the same bytes as one
  message), and splits a tensor over 512 MiB into several consecutive Values with the same tag, each
  with the full dims and the next 512 MiB of the content (`np.array_split` over rows when it saves
  NumPy arrays); `load_checkpoint` joins consecutive Values with equal tags. A tag that reappears
  later is a duplicate here.
- dims are unpacked varints (proto2); a scalar has no dims, and dims [0] also reads as a scalar.
- an optional trailer `b"crc_num"` + a 10-byte big-endian CRC-32 of everything before it
  (`crc_check=True`).
"""

from __future__ import annotations

import binascii
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from accel.checkpoint.base import DTYPES, Entry, FileReader, TensorInfo, pieces, put, size_of
from accel.errors import CheckpointError

TYPES = {"Float64": "float64", "Float32": "float32", "Float16": "float16", "BFloat16": "bfloat16",
         "Int64": "int64", "Int32": "int32", "Int16": "int16", "Int8": "int8", "UInt64": "uint64",
         "UInt32": "uint32", "UInt16": "uint16", "UInt8": "uint8", "Bool": "bool"}
NAMES = {v: k for k, v in TYPES.items()}
SLICE_BYTES = 512 * 1024 * 1024  # MindSpore's SLICE_SIZE (512 * 1024 KB) per Value
MAX_STRING = 1 << 20  # a tag or type name longer than this is corruption, not a name
CRC_TRAILER = 17


def varint(n: int) -> bytes:
    """A protobuf varint of a size: every one this writer emits (a dimension, a length) is an int64 field
    of the format, so it must lie in [0, 2^63); masking a larger one would write a wrong file."""
    if not 0 <= n < 1 << 63:
        raise CheckpointError(f"a tensor dimension or length of {n} does not fit the .ckpt format's int64 fields")
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


class _Wire:
    """A cursor over the file's protobuf bytes, reading only what it parses."""

    def __init__(self, reader: MindSporeCkptFile, end: int):
        self.r, self.pos, self.end = reader, 0, end
        self.buf, self.buf_at = b"", 0

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.r.path}: {what} at byte {self.pos}; not a MindSpore checkpoint or corrupt")

    def read(self, n: int, limit: int) -> bytes:
        if self.pos + n > limit:
            raise self.fail("a field runs past the end of its message" if limit < self.end else "unexpected end")
        if not self.buf_at <= self.pos <= self.pos + n <= self.buf_at + len(self.buf):
            self.buf_at = self.pos
            self.buf = self.r._pread(min(max(n, 1 << 16), self.end - self.pos), self.pos)
        out = self.buf[self.pos - self.buf_at : self.pos - self.buf_at + n]
        self.pos += n
        return out

    def varint(self, limit: int) -> int:
        n, shift = 0, 0
        while True:
            if shift >= 70:
                raise self.fail("a varint longer than 10 bytes")
            b = self.read(1, limit)[0]
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n

    def key(self, limit: int) -> tuple[int, int]:
        k = self.varint(limit)
        field, wire = k >> 3, k & 7
        if field == 0 or wire in (3, 4, 6, 7):
            raise self.fail(f"invalid field key {k}")
        return field, wire

    def length(self, limit: int) -> int:
        n = self.varint(limit)
        if self.pos + n > limit:
            raise self.fail(f"a field of {n} bytes runs past the end of its message")
        return n

    def skip(self, wire: int, limit: int) -> None:
        """Skip an unknown field, as protobuf does."""
        if wire == 0:
            self.varint(limit)
        else:
            n = {1: 8, 5: 4}.get(wire) or self.length(limit)
            if self.pos + n > limit:
                raise self.fail("a field runs past the end of its message")
            self.pos += n

    def string(self, limit: int, what: str) -> str:
        n = self.length(limit)
        if n > MAX_STRING:
            raise self.fail(f"a {what} of {n} bytes")
        try:
            return self.read(n, limit).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"a {what} that is not UTF-8") from None


class MindSporeCkptFile(FileReader):
    """A MindSpore .ckpt, indexed at open (tag, dims, type and where each content lies); tensors read lazily."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        size = self._stat()
        end, self.crc = size, None
        if size >= CRC_TRAILER and self._pread(7, size - CRC_TRAILER) == b"crc_num":
            end = size - CRC_TRAILER
            self.crc = int.from_bytes(self._pread(10, size - 10), "big")
        w = _Wire(self, end)
        values: list[tuple[str, str, list[int], int, int]] = []  # tag, type, dims, content offset, length
        while w.pos < end:
            field, wire = w.key(end)
            if field != 1 or wire != 2:
                w.skip(wire, end)
                continue
            n = w.length(end)
            values.append(self._value(w, w.pos + n))
        self._group(values)

    def _value(self, w: _Wire, end: int) -> tuple[str, str, list[int], int, int]:
        tag: str | None = None
        tensor = None
        while w.pos < end:
            field, wire = w.key(end)
            if field == 1 and wire == 2:
                tag = w.string(end, "tag")
            elif field == 2 and wire == 2:
                if tensor is not None:
                    raise w.fail("a Value with two tensors")
                n = w.length(end)
                tensor = self._tensor(w, w.pos + n)
            elif field == 3:
                raise CheckpointError(f"{self.path}: holds a MapParameter (tag {tag!r}), which cannot be converted")
            else:
                w.skip(wire, end)
        if tag is None or tensor is None:
            raise w.fail("a Value without tag or tensor")
        if not tag:
            raise w.fail("a Value with an empty tag")
        return (tag, *tensor)

    def _tensor(self, w: _Wire, end: int) -> tuple[str, list[int], int, int]:
        dims: list[int] = []
        ttype, content = None, None
        while w.pos < end:
            field, wire = w.key(end)
            if field == 1 and wire == 0:
                dims.append(w.varint(end))
            elif field == 1 and wire == 2:  # packed, which parsers must also accept
                n = w.length(end)
                stop = w.pos + n
                while w.pos < stop:
                    dims.append(w.varint(stop))
            elif field == 2 and wire == 2:
                ttype = w.string(end, "tensor_type")
            elif field == 3 and wire == 2:
                if content is not None:
                    raise w.fail("a tensor with two tensor_content fields")
                n = w.length(end)
                content = (w.pos, n)
                w.pos += n
            else:
                w.skip(wire, end)
        if ttype is None or content is None:
            raise w.fail("a TensorProto without tensor_type or tensor_content")
        if any(d >= 1 << 63 for d in dims):
            raise w.fail(f"negative dims {[d - (1 << 64) if d >= 1 << 63 else d for d in dims]}")
        return ttype, dims, content[0], content[1]

    def _group(self, values: list[tuple[str, str, list[int], int, int]]) -> None:
        i = 0
        while i < len(values):
            tag, ttype, dims = values[i][:3]
            j = i
            while j + 1 < len(values) and values[j + 1][0] == tag:
                j += 1
                if values[j][1:3] != (ttype, dims):
                    raise CheckpointError(f"{self.path}: the pieces of tensor {tag!r} disagree on dims or type "
                                          f"({dims} {ttype} vs {values[j][2]} {values[j][1]})")
            if ttype not in TYPES:
                what = "a string, not a tensor" if ttype == "str" else f"of unknown tensor_type {ttype!r}"
                raise CheckpointError(f"{self.path}: tensor {tag!r} is {what}; supported: {', '.join(TYPES)}")
            dtype = DTYPES[TYPES[ttype]]
            segments = [(v[3], v[4]) for v in values[i : j + 1]]
            nbytes = sum(n for _, n in segments)
            shape = tuple(dims)
            if shape == (0,) and nbytes == dtype.itemsize:  # MindSpore reads dims [0] as a scalar
                shape = ()
            self._add(tag, TensorInfo(dtype, shape), segments)
            i = j + 1

    def check_crc(self) -> None:
        """Recompute the CRC-32 trailer, if the file has one (a pass over the whole file)."""
        if self.crc is None:
            return
        end, crc, pos = self._stat() - CRC_TRAILER, 0, 0
        while pos < end:
            chunk = self._pread(min(1 << 24, end - pos), pos)
            crc, pos = binascii.crc32(chunk, crc), pos + len(chunk)
        if crc != self.crc:
            raise CheckpointError(f"{self.path}: CRC-32 {crc} does not match the recorded {self.crc}; "
                                  "the file is damaged")


def _slices(nbytes: int, slice_bytes: int) -> list[int]:
    """Byte length of each Value of a tensor: save_checkpoint cuts a tensor's bytes into pieces of
    exactly 512 MiB and a remainder (it writes no Value at all for an empty tensor; one is written here)."""
    full, rest = divmod(nbytes, slice_bytes)
    return [slice_bytes] * full + [rest] * (rest > 0 or not full)


def _value_head(name: bytes, ttype: bytes, dims: Sequence[int], content_len: int) -> bytes:
    tensor_head = b"".join(b"\x08" + varint(d) for d in dims) + b"\x12" + varint(len(ttype)) + ttype
    tensor_len = len(tensor_head) + 1 + len(varint(content_len)) + content_len
    value_head = b"\x0a" + varint(len(name)) + name + b"\x12" + varint(tensor_len)
    value_len = len(value_head) + tensor_len
    return b"\x0a" + varint(value_len) + value_head + tensor_head + b"\x1a" + varint(content_len)


def write_entries(path: str | Path, entries: Sequence[Entry], slice_bytes: int = SLICE_BYTES) -> None:
    """Stream entries, in order, into a .ckpt that mindspore.load_checkpoint reads; tensors over
    `slice_bytes` are split into several Values exactly as save_checkpoint splits them."""
    seen = set()
    for e in entries:
        if e.info.dtype.name not in NAMES:
            raise CheckpointError(f"tensor {e.name!r}: dtype {e.info.dtype} cannot be stored in a MindSpore checkpoint")
        if e.name in seen:
            raise CheckpointError(f"tensor {e.name!r} appears twice")
        seen.add(e.name)
    with open(path, "wb") as f:
        for e in entries:
            name, ttype = e.name.encode(), NAMES[e.info.dtype.name].encode()
            values = iter(_slices(e.info.nbytes, slice_bytes))  # content bytes of each Value
            left = next(values)
            f.write(_value_head(name, ttype, e.info.shape, left))
            for piece in pieces(e, str(path)):
                pos, size = 0, size_of(piece)
                while pos < size:
                    if left == 0:
                        left = next(values)
                        f.write(_value_head(name, ttype, e.info.shape, left))
                    n = min(left, size - pos)
                    put(f, piece, pos, pos + n)
                    pos, left = pos + n, left - n


def write(path: str | Path, tensors: dict[str, np.ndarray], slice_bytes: int = SLICE_BYTES) -> None:
    from accel.checkpoint.base import entries_of

    write_entries(path, entries_of(tensors), slice_bytes)
