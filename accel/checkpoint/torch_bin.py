"""PyTorch `pytorch_model.bin` (torch.save's zip format), read and written without torch.

The archive holds `<prefix>/data.pkl`, a pickle of the state dict in which every tensor is a call
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and every storage a persistent id
('storage', torch.<Type>Storage, key, location, numel) whose bytes are the record `<prefix>/data/<key>`.

The pickle is read by an unpickler that knows only those few names and builds plain descriptions from
them: the semantics of `torch.load(weights_only=True)`, stricter (no other global at all), so a pickle
that would run code is refused before anything runs. Tensor bytes are then read straight from the
archive's records, a chunk at a time. The legacy pre-1.6 format (a bare pickle stream) is refused.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from accel.checkpoint.base import CHUNK, DTYPES, Chunk, Entry, FileReader, TensorInfo, counted, shape_of
from accel.errors import CheckpointError

STORAGES = {"DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
            "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
            "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool"}
STORAGE_OF = {v: k for k, v in STORAGES.items()}
MAX_PICKLE = 1 << 30
# Anything a damaged zip or pickle makes the standard library raise while parsing.
PARSE_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError,
                KeyError, IndexError, AttributeError, struct.error, zlib.error, NotImplementedError, RuntimeError,
                OverflowError, RecursionError, MemoryError, UnicodeDecodeError, SyntaxError)


class Storage(NamedTuple):
    key: str
    dtype: str
    numel: int


class TensorRef(NamedTuple):
    storage: Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _StateDict(dict):
    """collections.OrderedDict as the unpickler builds it: a dict that also takes the `_metadata`
    attribute module.state_dict() attaches."""


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> TensorRef:
    if not isinstance(storage, Storage) or type(offset) is not int or offset < 0:
        raise CheckpointError("a tensor refers to something other than a storage")
    return TensorRef(storage, offset, shape_of(size, "tensor"), tuple(stride) if isinstance(stride, tuple) else ())


def _rebuild_parameter(data: Any, *rest: Any) -> Any:
    return data


class _Unpickler(pickle.Unpickler):
    ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
               ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
               ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
               ("collections", "OrderedDict"): _StateDict}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        if module == "torch" and name in STORAGES:
            return ("storage-type", STORAGES[name])
        raise CheckpointError(f"the pickle calls {module}.{name}, which a safe (weights-only) load refuses: "
                              "it could run code; only tensors and plain containers are allowed")

    def persistent_load(self, pid: Any) -> Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], tuple)
                and pid[1][:1] == ("storage-type",) and isinstance(pid[2], str) and type(pid[4]) is int
                and pid[4] >= 0):
            raise CheckpointError(f"unexpected persistent id {str(pid)[:80]}")
        return Storage(pid[2], pid[1][1], pid[4])


class TorchBinFile(FileReader):
    """A torch.save zip archive holding a flat dict of named tensors."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.strided: dict[str, tuple[int, tuple[int, ...]]] = {}  # views of a larger storage: name -> (start, stride)
        size = self._stat()
        try:
            self._open(size)
        except CheckpointError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        except PARSE_ERRORS as e:
            raise CheckpointError(f"{self.path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                                  f"{str(e)[:120]})") from None
        except OSError as e:  # a seek to where a damaged directory points, or a real read failure
            raise CheckpointError(f"{self.path}: not a readable PyTorch checkpoint ({e.strerror or e})") from None

    def _open(self, size: int) -> None:
        with open(self.path, "rb") as f:
            if not zipfile.is_zipfile(f):
                f.seek(0)
                head = f.read(2)
                legacy = len(head) == 2 and head[0] == 0x80 and head[1] <= 5
                raise CheckpointError("the legacy (before PyTorch 1.6) torch.save format is not supported; "
                                      "re-save it with a current torch.save" if legacy else
                                      "not a zip archive; not a PyTorch checkpoint")
            f.seek(0)
            z = zipfile.ZipFile(f)
            records = {}
            for zi in z.infolist():
                if zi.filename in records:
                    raise CheckpointError(f"record {zi.filename} appears twice")
                records[zi.filename] = zi
            pkls = [n for n in records if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pkls) != 1:
                raise CheckpointError("no data.pkl record" if not pkls else "several data.pkl records")
            prefix = pkls[0][: -len("data.pkl")]
            # declared sizes first: a small record that inflates to gigabytes is refused unread
            if (order := records.get(prefix + "byteorder")) is not None and order.file_size > 16:
                raise CheckpointError(f"the byteorder record declares {order.file_size} bytes; it holds 'little'")
            if any(zi.compress_size > size for zi in records.values()):
                raise CheckpointError("a record declares more bytes than the file has; the file is damaged")
            if order is not None and (value := z.read(order)) != b"little":
                raise CheckpointError(f"the byteorder record says {value[:16]!r}; only little-endian is supported")
            if records[pkls[0]].file_size > MAX_PICKLE:
                raise CheckpointError("data.pkl is implausibly large")
            state = _Unpickler(io.BytesIO(z.read(records[pkls[0]]))).load()
            if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
                raise CheckpointError("does not hold a dict of named tensors")
            storages: dict[str, tuple[int, int]] = {}  # key -> (file offset, bytes)
            for name, t in state.items():
                if not isinstance(t, TensorRef):
                    what = "a nested dict; extract the state dict first" if isinstance(t, dict) else type(t).__name__
                    raise CheckpointError(f"entry {name!r} is not a tensor but {what}")
                if t.storage.key not in storages:
                    storages[t.storage.key] = self._record(f, size, records.get(f"{prefix}data/{t.storage.key}"),
                                                           t.storage)
                self._add_tensor(name, t, storages[t.storage.key])

    def _record(self, f: Any, size: int, zi: zipfile.ZipInfo | None, s: Storage) -> tuple[int, int]:
        if zi is None:
            raise CheckpointError(f"storage record data/{s.key} is missing")
        nbytes = s.numel * DTYPES[s.dtype].itemsize
        if zi.file_size != nbytes:
            raise CheckpointError(f"storage data/{s.key} holds {zi.file_size} bytes, its {s.numel} "
                                  f"{s.dtype} elements need {nbytes}")
        if zi.compress_type != zipfile.ZIP_STORED or zi.compress_size != zi.file_size or zi.flag_bits & 1:
            raise CheckpointError(f"storage data/{s.key} is compressed or encrypted; torch.save never does that")
        f.seek(zi.header_offset)
        head = f.read(30)
        if len(head) != 30 or head[:4] != b"PK\x03\x04":
            raise CheckpointError(f"storage data/{s.key} has no local header where the directory says")
        n, m = struct.unpack("<HH", head[26:30])
        start = zi.header_offset + 30 + n + m
        if start + nbytes > size:
            raise CheckpointError(f"storage data/{s.key} runs past the end of the file; truncated?")
        return start, nbytes

    def _add_tensor(self, name: str, t: TensorRef, record: tuple[int, int]) -> None:
        dtype = DTYPES[t.storage.dtype]
        info = TensorInfo(dtype, t.size)
        numel = math.prod(t.size)
        contiguous = tuple(math.prod(t.size[i + 1 :]) for i in range(len(t.size)))
        if len(t.stride) != len(t.size):
            raise CheckpointError(f"tensor {name!r}: stride {t.stride} does not fit size {t.size}")
        if numel and any(type(s) is not int or s < 0 for s in t.stride):
            raise CheckpointError(f"tensor {name!r}: stride {t.stride} is not non-negative integers")
        last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride)) if numel else t.offset - 1
        if numel > t.storage.numel:  # only overlapping strides (an expanded view) make a tensor outgrow its storage
            raise CheckpointError(f"tensor {name!r} of size {list(t.size)} repeats elements of its storage "
                                  f"(stride {list(t.stride)}); save it with .contiguous()")
        if last >= t.storage.numel:
            raise CheckpointError(f"tensor {name!r} of size {list(t.size)} reaches past its storage "
                                  f"of {t.storage.numel} elements")
        start = record[0] + t.offset * dtype.itemsize
        if numel and any(n > 1 and s != c for n, s, c in zip(t.size, t.stride, contiguous)):
            self.strided[name] = (start, t.stride)  # a view: gathered when read
        self._add(name, info, [(start, info.nbytes)])

    def copyable(self, name: str) -> bool:
        return name not in self.strided  # a contiguous tensor lies in the archive as it is

    def chunks(self, name: str, begin: int = 0, end: int | None = None, size: int = CHUNK) -> Iterator[Chunk]:
        if name not in self.strided:
            yield from super().chunks(name, begin, end, size)
            return
        info = self.info(name)
        start, stride = self.strided[name]
        item = info.dtype.itemsize
        span = (sum((n - 1) * s for n, s in zip(info.shape, stride)) + 1) * item
        flat = np.frombuffer(self._pread(span, start), np.uint8).view(info.dtype)
        a = np.lib.stride_tricks.as_strided(flat, info.shape, tuple(s * item for s in stride))
        raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8).data
        end = info.nbytes if end is None else end
        for pos in range(begin, end, size):
            yield bytes(raw[pos : min(end, pos + size)])


# --- writing ----------------------------------------------------------------------------------------


def _pickle_state(entries: Sequence[Entry]) -> bytes:
    """The data.pkl torch.save writes for a flat dict of contiguous tensors, one storage each (protocol 2)."""

    def text(s: str) -> bytes:
        raw = s.encode()
        return b"X" + struct.pack("<I", len(raw)) + raw

    def integer(n: int) -> bytes:
        if 0 <= n < 1 << 31:
            return b"J" + struct.pack("<i", n)
        raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
        return b"\x8a" + bytes([len(raw)]) + raw

    def ints(xs: Sequence[int]) -> bytes:
        return b"(" + b"".join(integer(x) for x in xs) + b"t"

    out = [b"\x80\x02}("]  # PROTO 2, EMPTY_DICT, MARK
    for i, e in enumerate(entries):
        numel = math.prod(e.info.shape)
        stride = [math.prod(e.info.shape[j + 1 :]) for j in range(len(e.info.shape))]
        storage = (b"(" + text("storage") + b"ctorch\n" + STORAGE_OF[e.info.dtype.name].encode() + b"\n"
                   + text(str(i)) + text("cpu") + integer(numel) + b"tQ")  # MARK ... TUPLE BINPERSID
        out.append(text(e.name) + b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + integer(0)
                   + ints(e.info.shape) + ints(stride) + b"\x89ccollections\nOrderedDict\n)RtR")
    out.append(b"u.")  # SETITEMS, STOP
    return b"".join(out)


def _aligned(z: zipfile.ZipFile, name: str, size: int) -> zipfile.ZipInfo:
    """A stored record whose data starts 64-byte aligned, as torch.save aligns them (for mmap)."""
    zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    zi.compress_type = zipfile.ZIP_STORED
    zi.file_size = size
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule: adds a 20-byte zip64 extra field
    start = z.start_dir + 30 + len(name.encode()) + 4 + (20 if zip64 else 0)
    pad = -start % 64
    zi.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return zi


def write_entries(path: str | Path, entries: Sequence[Entry]) -> None:
    """Stream entries into a pytorch_model.bin that torch.load(weights_only=True) reads."""
    seen = set()
    for e in entries:
        if e.info.dtype.name not in STORAGE_OF:
            raise CheckpointError(f"tensor {e.name!r}: dtype {e.info.dtype} cannot be stored by torch.save")
        if e.name in seen:
            raise CheckpointError(f"tensor {e.name!r} appears twice")
        seen.add(e.name)
    prefix = "archive/"
    with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        records = [("data.pkl", _pickle_state(entries)), (".format_version", b"1"),
                   (".storage_alignment", b"64"), ("byteorder", b"little")]
        for name, data in records:
            z.writestr(_aligned(z, prefix + name, len(data)), data)
        for i, e in enumerate(entries):
            with z.open(_aligned(z, f"{prefix}data/{i}", e.info.nbytes), "w") as w:
                for chunk in counted(e, str(path)):
                    w.write(chunk)
        z.writestr(_aligned(z, prefix + "version", 2), b"3\n")
