"""What every checkpoint reader and writer shares.

A reader lists tensors (`keys`), describes one without reading it (`info`: dtype and shape), and
streams its little-endian C-order bytes in chunks (`chunks`), so a conversion holds about one chunk in
memory, never the model. `get` materialises one tensor as a NumPy array. A writer takes `Entry`s (name,
dtype, shape and a callable that yields the bytes) and streams them out in order.

File readers hand out each chunk as a view of a memory mapping of just that chunk's window of the
file: no copy into a buffer, and the window is unmapped once the chunk is consumed (mapped pages count
towards the process's resident memory, so a mapping of the whole file would not stay small).

A tensor stored in its file as it is (no gather, no inflate) can also be handed to a writer as `Span`s,
byte ranges of the open file. The writer leaves room for a span's bytes where they go and hands the
span that place (`Span.defer`), so whoever made the span copies them there, later and on another thread
(`transfer`: read into a small buffer, seen by a hash on the way, written at their place); a span with
nobody to defer to is copied on the spot the same way.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar

import ml_dtypes
import numpy as np

from accel.errors import CheckpointError

CHUNK = 16 << 20  # bytes per read: large enough for full disk speed, small against the memory budget

# Every dtype a checkpoint may hold, by the name conversions and manifests use (np.dtype.name).
DTYPES: dict[str, np.dtype] = {np.dtype(t).name: np.dtype(t) for t in (
    np.float64, np.float32, np.float16, ml_dtypes.bfloat16, np.int64, np.int32, np.int16, np.int8,
    np.uint64, np.uint32, np.uint16, np.uint8, np.bool_)}
FLOATS = ("float64", "float32", "float16", "bfloat16")
Chunk = bytes | memoryview


@dataclass(frozen=True)
class TensorInfo:
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Span:
    """`length` bytes at `offset` of the file open as `fd` (`path`, for errors). `defer(span, begin, end,
    out_fd, out_offset)`, when set, takes over copying bytes begin..end of the span to out_offset of
    out_fd: the writer calls it and moves on, leaving that room in its file."""

    fd: int
    offset: int
    length: int
    path: Path | None = None
    defer: Callable[[Span, int, int, int, int], None] | None = None


@dataclass(frozen=True)
class Entry:
    """One tensor to write: `chunks()` yields its bytes (little-endian, C order); `spans()`, when given,
    yields the same bytes as ranges of open files, for a file-to-file copy. A writer calls one of the two,
    once (`pieces`)."""

    name: str
    info: TensorInfo
    chunks: Callable[[], Iterable[Chunk]]
    spans: Callable[[], Iterable[Span]] | None = None


class Reader(Protocol):
    path: Path

    def keys(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> np.ndarray: ...

    def items(self) -> Iterator[tuple[str, np.ndarray]]: ...

    def chunks(self, name: str, begin: int = 0, end: int | None = None, size: int = CHUNK) -> Iterator[Chunk]: ...


def shape_of(value: object, where: str) -> tuple[int, ...]:
    """A shape from untrusted data: a list of at most 64 (NumPy's limit) integers in [0, 2^63), what every
    format and framework holds (a dimension past int64, even of an empty tensor, no writer can write)."""
    if (not isinstance(value, list | tuple) or len(value) > 64
            or not all(type(x) is int and 0 <= x < 1 << 63 for x in value)):
        raise CheckpointError(f"{where}: shape {str(value)[:80]} is not a list of at most 64 integers in [0, 2^63)")
    return tuple(value)


def entries_of(tensors: dict[str, np.ndarray]) -> list[Entry]:
    """Writer entries for in-memory arrays."""
    out = []
    for name, a in tensors.items():
        a = np.asarray(a)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        if a.dtype.name == "bfloat16" and a.dtype != DTYPES["bfloat16"]:
            a = a.view(DTYPES["bfloat16"])  # MindSpore registers a bfloat16 of its own with NumPy
        if a.dtype.name not in DTYPES or a.dtype != DTYPES[a.dtype.name]:
            raise CheckpointError(f"tensor {name!r}: dtype {a.dtype} cannot be stored in a checkpoint")
        a = a if a.flags.c_contiguous else a.copy(order="C")  # ascontiguousarray would make 0-d 1-d
        out.append(Entry(name, TensorInfo(a.dtype, a.shape), _bytes_of(a)))
    return out


def _bytes_of(a: np.ndarray) -> Callable[[], list[memoryview]]:
    return lambda: [a.reshape(-1).view(np.uint8).data]


def size_of(piece: Chunk | Span) -> int:
    return piece.length if isinstance(piece, Span) else memoryview(piece).nbytes


def pieces(entry: Entry, where: str) -> Iterator[Chunk | Span]:
    """The entry's bytes, as spans when it has them (else chunks), checked to add up to exactly the bytes
    its shape and dtype need."""
    return _counted(entry, entry.chunks() if entry.spans is None else entry.spans(), where)


def counted(entry: Entry, where: str) -> Iterator[Chunk]:
    """entry.chunks(), checked as `pieces` checks them (for writers that take bytes only)."""
    return _counted(entry, entry.chunks(), where)


P = TypeVar("P", Chunk, Span, Chunk | Span)


def _counted(entry: Entry, items: Iterable[P], where: str) -> Iterator[P]:
    total = 0
    for piece in items:
        total += size_of(piece)
        if total > entry.info.nbytes:
            break
        yield piece
    if total != entry.info.nbytes:
        raise CheckpointError(f"{where}: tensor {entry.name!r} produced {total} bytes, its shape "
                              f"{list(entry.info.shape)} of {entry.info.dtype.name} needs {entry.info.nbytes}")


def truncated(path: Path | None) -> CheckpointError:
    """A read of a file that came up short after its header was checked: it shrank while open."""
    return CheckpointError(f"{path}: ended early while reading; was it truncated while open?")


def put(out: BinaryIO, piece: Chunk | Span, begin: int = 0, end: int | None = None) -> None:
    """Bytes begin..end of a piece appended to `out`. For a span, the room is left in the file and the
    span's `defer` fills it, later; a span without one is copied in at once (`transfer`)."""
    if not isinstance(piece, Span):
        out.write(memoryview(piece).cast("B")[begin:end])
        return
    end = piece.length if end is None else end
    out.flush()  # the bytes go at the file position, after what is buffered
    at = out.tell()
    if piece.defer is not None:
        piece.defer(piece, begin, end, out.fileno(), at)
    else:
        transfer(piece, begin, end, out.fileno(), at, memoryview(bytearray(min(end - begin, 1 << 20))),
                 lambda _: None)
    out.seek(end - begin, os.SEEK_CUR)


def transfer(span: Span, begin: int, end: int, out_fd: int, out_offset: int, buf: memoryview,
             seen: Callable[[memoryview], object]) -> None:
    """Bytes begin..end of `span` read into `buf` a piece at a time, each shown to `seen` (a hash's
    update) and written at out_offset of out_fd: the bytes are read from memory once for both. A read
    that comes up short is a source truncated while open."""
    pos = begin
    while pos < end:
        view = buf[: min(len(buf), end - pos)]
        n = os.preadv(span.fd, [view], span.offset + pos)
        if n == 0:
            raise truncated(span.path)
        view = view[:n]
        seen(view)
        done = 0
        while done < n:
            done += os.pwrite(out_fd, view[done:], out_offset + pos - begin + done)
        pos += n


class FileReader:
    """Tensors stored as byte segments of one file; subclasses fill `self.layout` after checking it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        # name -> (info, [(file offset, length), ...]): several segments when a format splits a tensor
        self.layout: dict[str, tuple[TensorInfo, list[tuple[int, int]]]] = {}
        self._fd: int | None = None

    def _stat(self) -> int:
        """Size of the file, with a missing or unreadable path as a CheckpointError."""
        try:
            if self.path.is_dir():
                raise CheckpointError(f"{self.path}: is a directory, not a file")
            return self.path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no such file") from None
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror or e})") from None

    def _add(self, name: str, info: TensorInfo, segments: list[tuple[int, int]]) -> None:
        if name in self.layout:
            raise CheckpointError(f"{self.path}: tensor {name!r} appears twice")
        if sum(n for _, n in segments) != info.nbytes:
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {list(info.shape)} of {info.dtype.name} "
                                  f"({info.nbytes} bytes) but {sum(n for _, n in segments)} bytes of data")
        self.layout[name] = (info, segments)

    def keys(self) -> list[str]:
        return list(self.layout)

    def info(self, name: str) -> TensorInfo:
        return self.layout[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.layout[name][0].shape

    def _fileno(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise CheckpointError(f"{self.path}: cannot read ({e.strerror or e})") from None
        return self._fd

    def _pread(self, n: int, offset: int) -> bytes:
        data = os.pread(self._fileno(), n, offset)
        if len(data) != n:
            raise truncated(self.path)
        return data

    def copyable(self, name: str) -> bool:
        """Whether the tensor's bytes lie in the file as they are, at `windows(name)`: true unless a
        subclass gathers or inflates some tensors in its own `chunks`."""
        return type(self).chunks is FileReader.chunks

    def _view(self, n: int, offset: int) -> memoryview:
        """n bytes at offset as a view of a mapping of just that window: no copy. The window is unmapped
        as soon as the view is dropped, so mapped pages never pile up in the resident set."""
        fd = self._fileno()
        if os.fstat(fd).st_size < offset + n:  # a mapping past the end would fault (SIGBUS) when read
            raise truncated(self.path)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        window = mmap.mmap(fd, offset + n - start, offset=start, access=mmap.ACCESS_READ)
        return memoryview(window)[offset - start : offset - start + n]

    def windows(self, name: str, begin: int = 0, end: int | None = None, size: int = CHUNK) -> Iterator[Span]:
        """Where the tensor's bytes begin..end (default: all) lie in the file, at most `size` at a time."""
        info, segments = self.layout[name]
        end = info.nbytes if end is None else end
        pos = 0  # tensor offset at the start of the current segment
        for offset, length in segments:
            lo, hi = max(begin, pos), min(end, pos + length)
            while lo < hi:
                n = min(size, hi - lo)
                yield Span(self._fileno(), offset + lo - pos, n, self.path)
                lo += n
            pos += length

    def chunks(self, name: str, begin: int = 0, end: int | None = None, size: int = CHUNK) -> Iterator[Chunk]:
        """The tensor's bytes begin..end (default: all), at most `size` at a time; each chunk is valid
        until the next one is asked for."""
        for w in self.windows(name, begin, end, size):
            yield self._view(w.length, w.offset)

    def get(self, name: str) -> np.ndarray:
        info = self.info(name)
        out = np.empty(info.nbytes, np.uint8)
        pos = 0
        for chunk in self.chunks(name):
            out[pos : pos + len(chunk)] = np.frombuffer(chunk, np.uint8)
            pos += len(chunk)
        return out.view(info.dtype).reshape(info.shape)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.layout:
            yield name, self.get(name)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
