"""NumPy `.npz`: a zip archive of `.npy` arrays, one per tensor, named `<tensor>.npy`.

Read without `np.load`: each member's .npy header is parsed by NumPy's own header reader (a literal,
never a pickle; object arrays are refused), checked against the member's size, and stored members are
then read straight from the file a chunk at a time; compressed members (`np.savez_compressed`) stream
through zlib. NumPy writes an ml_dtypes bfloat16 array with the descr '<V2' (a 2-byte void), so '<V2'
reads as bfloat16 and bfloat16 is written so.
"""

from __future__ import annotations

import ast
import io
import struct
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from accel.checkpoint.base import CHUNK, DTYPES, Chunk, Entry, FileReader, TensorInfo, counted, shape_of
from accel.checkpoint.torch_bin import PARSE_ERRORS
from accel.errors import CheckpointError

BF16_DESCR = "<V2"
MAGIC = b"\x93NUMPY"
MAX_HEADER = 1 << 20


def _descr(dtype: np.dtype) -> str:
    return BF16_DESCR if dtype.name == "bfloat16" else dtype.str


def _dtype(descr: object, where: str) -> np.dtype:
    if descr == BF16_DESCR:
        return DTYPES["bfloat16"]
    try:
        dtype = np.dtype(descr) if isinstance(descr, str) else None  # a list descr is a record type
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or dtype.name not in DTYPES or dtype.name == "bfloat16" or dtype.byteorder == ">":
        raise CheckpointError(f"{where}: unsupported array type {str(descr)[:40]!r} "
                              "(object, record, big-endian or other non-numeric arrays cannot be converted)")
    return DTYPES[dtype.name]


class NpzFile(FileReader):
    def __init__(self, path: str | Path):
        super().__init__(path)
        self.members: dict[str, zipfile.ZipInfo] = {}  # compressed members, read through zipfile
        self.fortran: set[str] = set()
        size = self._stat()
        try:
            with open(self.path, "rb") as f:
                if not zipfile.is_zipfile(f):
                    raise CheckpointError("not a zip archive; not an .npz file")
                f.seek(0)
                z = zipfile.ZipFile(f)
                for zi in z.infolist():
                    self._member(z, f, size, zi)
        except CheckpointError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        except PARSE_ERRORS as e:
            raise CheckpointError(f"{self.path}: not a readable .npz ({type(e).__name__}: {str(e)[:120]})") from None
        except OSError as e:  # a seek to where a damaged directory points, or a real read failure
            raise CheckpointError(f"{self.path}: not a readable .npz ({e.strerror or e})") from None

    def _member(self, z: zipfile.ZipFile, f: io.BufferedReader, size: int, zi: zipfile.ZipInfo) -> None:
        if not zi.filename.endswith(".npy"):
            raise CheckpointError(f"member {zi.filename!r} is not a .npy array")
        name = zi.filename[: -len(".npy")]
        with z.open(zi) as m:
            head = m.read(10)
            if len(head) != 10 or head[:6] != MAGIC or head[6] not in (1, 2, 3):
                raise CheckpointError(f"member {zi.filename!r} is not a .npy array (bad magic)")
            if head[6] == 1:
                n, pre = struct.unpack("<H", head[8:10])[0], 10
            else:
                n, pre = struct.unpack("<I", head[8:10] + m.read(2))[0], 12
            if n > MAX_HEADER:
                raise CheckpointError(f"member {zi.filename!r} has an implausible header of {n} bytes")
            raw = m.read(n)
        header = ast.literal_eval(raw.decode("latin1" if head[6] < 3 else "utf-8"))
        where = f"array {name!r}"
        if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
            raise CheckpointError(f"{where}: the .npy header is not {{descr, fortran_order, shape}}")
        info = TensorInfo(_dtype(header["descr"], where), shape_of(header["shape"], where))
        if zi.file_size != pre + n + info.nbytes:
            raise CheckpointError(f"{where}: shape {list(info.shape)} of {info.dtype.name} needs {info.nbytes} bytes, "
                                  f"the member holds {zi.file_size - pre - n}")
        if header["fortran_order"] is True and len(info.shape) > 1:
            self.fortran.add(name)
        elif header["fortran_order"] is not False and header["fortran_order"] is not True:
            raise CheckpointError(f"{where}: fortran_order is not a boolean")
        if zi.compress_type == zipfile.ZIP_STORED and zi.compress_size == zi.file_size and not zi.flag_bits & 1:
            f.seek(zi.header_offset)
            local = f.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                raise CheckpointError(f"{where}: no local header where the zip directory says")
            start = zi.header_offset + 30 + sum(struct.unpack("<HH", local[26:30])) + pre + n
            if start + info.nbytes > size:
                raise CheckpointError(f"{where}: data runs past the end of the file; truncated?")
            self._add(name, info, [(start, info.nbytes)])
        else:
            if zi.file_size > 1100 * zi.compress_size + 4096:  # deflate expands at most ~1032 times
                raise CheckpointError(f"{where}: claims {zi.file_size} bytes from {zi.compress_size} compressed")
            self._add(name, info, [(-1, info.nbytes)])
            self.members[name] = zi

    def chunks(self, name: str, begin: int = 0, end: int | None = None, size: int = CHUNK) -> Iterator[Chunk]:
        if name not in self.members and name not in self.fortran:
            yield from super().chunks(name, begin, end, size)
            return
        info = self.info(name)
        end = info.nbytes if end is None else end
        if name in self.fortran:  # stored column-major: gathered into C order
            raw = np.ascontiguousarray(self._fortran(name)).reshape(-1).view(np.uint8).data
            for pos in range(begin, end, size):
                yield bytes(raw[pos : min(end, pos + size)])
            return
        yield from self._inflate(name, begin, end, size)

    def _inflate(self, name: str, begin: int, end: int, size: int) -> Iterator[Chunk]:
        zi = self.members[name]
        try:
            with zipfile.ZipFile(self.path) as z, z.open(zi) as m:
                m.read(zi.file_size - self.info(name).nbytes)  # the .npy header
                pos = 0
                while pos < end:
                    want = min(size, end - pos) if pos >= begin else min(size, begin - pos)
                    chunk = m.read(want)
                    if len(chunk) != want:
                        raise CheckpointError(f"{self.path}: array {name!r} ended early")
                    if pos >= begin:
                        yield chunk
                    pos += want
        except CheckpointError:
            raise
        except PARSE_ERRORS as e:
            raise CheckpointError(f"{self.path}: array {name!r} is damaged ({type(e).__name__}: {e})") from None

    def _fortran(self, name: str) -> np.ndarray:
        info = self.info(name)
        data = b"".join(self._inflate(name, 0, info.nbytes, CHUNK)) if name in self.members else \
            self._pread(info.nbytes, self.layout[name][1][0][0])
        return np.frombuffer(data, info.dtype).reshape(info.shape, order="F")


def _npy_header(info: TensorInfo) -> bytes:
    text = repr({"descr": _descr(info.dtype), "fortran_order": False, "shape": info.shape}).encode("latin1")
    version, pre = (1, 10) if len(text) < 65000 else (2, 12)
    text += b" " * (-(pre + len(text) + 1) % 64) + b"\n"  # NumPy pads the header to 64 bytes
    length = struct.pack("<H" if version == 1 else "<I", len(text))
    return MAGIC + bytes([version, 0]) + length + text


def write_entries(path: str | Path, entries: Sequence[Entry]) -> None:
    """Stream entries into an uncompressed .npz that np.load reads."""
    seen = set()
    for e in entries:
        if e.name in seen:
            raise CheckpointError(f"tensor {e.name!r} appears twice")
        seen.add(e.name)
    with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for e in entries:
            head = _npy_header(e.info)
            zi = zipfile.ZipInfo(e.name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            zi.file_size = len(head) + e.info.nbytes
            with z.open(zi, "w") as w:
                w.write(head)
                for chunk in counted(e, str(path)):
                    w.write(chunk)


def write(path: str | Path, tensors: dict[str, np.ndarray]) -> None:
    from accel.checkpoint.base import entries_of

    write_entries(path, entries_of(tensors))
