"""Streaming, verified, atomic checkpoint conversion between formats and between HF and MindFormers names.

Each output tensor is streamed from its source byte ranges through an optional dtype cast into the
writer, hashed (SHA-256) on the way, so memory holds a few chunks, never the model. A tensor that needs
no cast and lies in its source file as it is goes to the writer as byte ranges of that file, which the
writer copies file to file inside the kernel (`copy_file_range`) while worker threads hash the same
bytes from a mapping of the source. The output is written under a temporary name in its destination
directory (a temporary directory for a sharded HF output) and renamed only once complete and flushed
to disk, with a manifest of every tensor's dtype, shape and SHA-256 beside it (`OUTPUT.manifest.json`).
Sources are opened read-only and an output that would replace one of their files is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

import numpy as np

from accel.checkpoint.base import FLOATS, Chunk, Entry, FileReader, Reader, Span, size_of
from accel.checkpoint.formats import open_reader, parse_spec, writes_directory
from accel.checkpoint.hf import HFCheckpoint, write_directory
from accel.checkpoint.keymap import SIDES, KeyMap, MappedView, Planned, resolve_family
from accel.checkpoint.mindspore_ckpt import MindSporeCkptFile
from accel.errors import AccelError, CheckpointError, ModelError, UsageError

DEFAULT_SHARD = 5 * 10**9  # save_pretrained's default max_shard_size, "5GB"
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'2GB' (10^9, as transformers counts), '512MiB', or a number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"--max-shard-size {text!r} is not a size such as 2GB, 500MB or 1GiB")
    return int(float(m.group(1)) * UNITS[(m.group(2) or "").upper()])


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} TB"


class Progress:
    """Tensor count and bytes on stderr, at most every `every` seconds (a line each; `\\r` on a terminal)."""

    def __init__(self, tensors: int, nbytes: int, stream: TextIO | None = None, every: float = 2.0,
                 writeback: Writeback | None = None):
        self.tensors, self.nbytes, self.every, self.writeback = tensors, nbytes, every, writeback
        self.stream = stream if stream is not None else sys.stderr
        self.done_tensors = self.done_bytes = 0
        self.start = self.last = time.perf_counter()
        self.printed = False

    def add(self, nbytes: int = 0, tensors: int = 0) -> None:
        self.done_bytes += nbytes
        self.done_tensors += tensors
        if self.writeback is not None:
            self.writeback.add(nbytes)
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            rate = self.done_bytes / max(now - self.start, 1e-9)
            tty = self.stream.isatty()
            line = (f"{self.done_tensors}/{self.tensors} tensors, {human(self.done_bytes)} / {human(self.nbytes)} "
                    f"({human(rate)}/s)")
            self.stream.write("\r" + line if tty else line + "\n")
            self.stream.flush()
            self.printed = tty

    def close(self) -> None:
        if self.printed:
            self.stream.write("\n")


@dataclass
class Result:
    output: Path
    manifest: Path
    tensors: int
    nbytes: int
    seconds: float
    source_names: str
    output_names: str
    family: str | None
    rules: dict[str, int] = field(default_factory=dict)
    config: Path | None = None


def manifest_text(manifest: dict[str, Any]) -> str:
    """JSON with one line per tensor."""
    head = {k: v for k, v in manifest.items() if k != "tensors"}
    lines = [f"  {json.dumps(n)}: {json.dumps(t)}" for n, t in manifest["tensors"].items()]
    return json.dumps(head, indent=1)[:-2] + ',\n "tensors": {\n' + ",\n".join(lines) + "\n }\n}\n"


def load_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"{path} is not a readable JSON config ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{path} does not hold a JSON object")
    return cfg


def find_config(source: Path, config: str | Path | None) -> Path | None:
    """--config, else the config.json of an HF source directory (or beside a source file)."""
    if config is not None:
        return Path(config)
    candidate = (source if source.is_dir() else source.parent) / "config.json"
    return candidate if candidate.is_file() else None


def source_files(reader: Reader) -> set[Path]:
    if isinstance(reader, HFCheckpoint):
        return {f.path.resolve() for f in reader.files.values()} | {reader.directory.resolve()}
    return {reader.path.resolve()}


def mapping(reader: Reader, src_names: str | None, dst_names: str | None, *, model: str | None,
            config: Mapping[str, Any] | None, keymap: str | None,
            allow_unmapped: bool) -> tuple[list[Planned], str, str, str | None]:
    """The plan (output tensors from source tensors), the source and output naming, and the family.
    `src_names`/`dst_names`: the naming the source and output formats use by default (None: as stored)."""
    family = resolve_family(model) if model else None
    cfg_type = config.get("model_type") if config else None
    if family and cfg_type and resolve_family(str(cfg_type)) != family:
        raise UsageError(f"--model {model} disagrees with the config's model_type {cfg_type!r}")
    family = family or (resolve_family(str(cfg_type)) if cfg_type else None)
    # by default names follow the output format, unless it names tensors as the source format does
    wanted = keymap or (None if dst_names == src_names else dst_names)
    if family is None:
        if wanted not in (None, "keep"):
            raise UsageError(f"cannot map tensor names to {wanted} without the model family: give --model "
                             "FAMILY or --config CONFIG.json, or --keymap keep to keep the names")
        return [Planned(n, reader.info(n), ((n, 0, reader.info(n).nbytes),), "same") for n in reader.keys()], \
            "as stored", "as stored", None
    km = KeyMap(family)
    src = km.side_of(reader.keys(), src_names or "hf")
    dst = src if wanted in (None, "keep") else wanted
    if dst not in SIDES:
        raise UsageError(f"--keymap {wanted!r}: use hf, mindformers or keep")
    return km.plan(reader, src, dst, config, allow_unmapped), src, dst, family


T = TypeVar("T", Chunk, Span)
HASH_STEP = 1 << 20  # bytes hashed at a time, well within a core's L2 cache


class Hasher:
    """SHA-256 of every tensor on worker threads, off the writer's path: SHA-256 runs at 1.2-1.8 GB/s on
    one core, slower than the copy itself, so tensors are hashed concurrently (hashlib releases the GIL),
    two at a time, while the writer moves on; at most `in_flight` chunks (16 MiB each) wait to be hashed.
    A tensor the writer copies file to file is hashed from views of the source mapping, one per span."""

    def __init__(self, workers: int = 2, in_flight: int = 8):
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="sha256")
        self.slots = threading.Semaphore(in_flight)
        self.digests: dict[str, str] = {}
        self.jobs: list[tuple[Future, queue.SimpleQueue]] = []

    def stream(self, name: str, chunks: Iterable[Chunk], progress: Progress) -> Iterator[Chunk]:
        """`chunks`, passed through and hashed on the side."""
        return self._feed(name, ((c, c) for c in chunks), progress)

    def spans(self, name: str, copies: Iterable[tuple[Span, Chunk]], progress: Progress) -> Iterator[Span]:
        """The spans of `copies`, passed through, while the view of the same bytes beside each is hashed."""
        return self._feed(name, copies, progress)

    def _feed(self, name: str, pairs: Iterable[tuple[T, Chunk]], progress: Progress) -> Iterator[T]:
        q: queue.SimpleQueue = queue.SimpleQueue()
        self.jobs.append((self.pool.submit(self._hash, name, q), q))
        try:
            for item, chunk in pairs:
                self.slots.acquire()
                q.put(chunk)
                del chunk  # a mapped window is unmapped as soon as it is hashed
                yield item
                progress.add(size_of(item))
        finally:
            q.put(None)
        progress.add(tensors=1)

    def _hash(self, name: str, q: queue.SimpleQueue) -> None:
        # Each chunk is hashed through a buffer that stays in the core's cache: SHA-256 reading a chunk
        # straight from memory (a mapping of the page cache, or a fresh cast) stalls on every cache
        # line, while a copy streams it; copy and hash take ~15% less CPU than the hash alone.
        h, buf = hashlib.sha256(), np.empty(HASH_STEP, np.uint8)
        while (chunk := q.get()) is not None:
            data = np.frombuffer(chunk, np.uint8)
            for i in range(0, len(data), HASH_STEP):
                part = buf[: min(HASH_STEP, len(data) - i)]
                np.copyto(part, data[i : i + HASH_STEP])  # NumPy releases the GIL for the copy
                h.update(part.data)
            del chunk, data
            self.slots.release()
        self.digests[name] = h.hexdigest()

    def results(self) -> dict[str, str]:
        for job, _ in self.jobs:
            job.result()
        return self.digests

    def close(self) -> None:
        for _, q in self.jobs:
            q.put(None)  # a job whose stream was abandoned stops at once
        self.pool.shutdown(wait=True)


class Writeback:
    """Starts the disk writes of the output every `every` bytes, so the final fsync has little left to
    do and the output does not crowd the page cache: posix_fadvise DONTNEED writes a range's dirty pages
    back without waiting, and drops its pages that are clean. Each file is advised from where its
    previous advice began: the range whose writes were started then, on disk by now, leaves the cache.
    Dropping the pages costs ~0.06 CPU-s per GB; keeping them, as `cp` does, made a casting conversion
    (which allocates as it goes) 1.6x slower on a 2-core VM."""

    def __init__(self, directory: Path, every: int = 64 << 20):
        self.directory, self.every, self.pending = directory, every, 0
        self.advised: dict[Path, tuple[int, int]] = {}  # file -> (start, end) of its last advice

    def add(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending < self.every:
            return
        self.pending = 0
        for f in self.directory.rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    size = os.fstat(fd).st_size
                    start, end = self.advised.get(f, (0, 0))
                    if size > end:
                        os.posix_fadvise(fd, start, size - start, os.POSIX_FADV_DONTNEED)
                        self.advised[f] = (end, size)
                finally:
                    os.close(fd)


def open_named(spec: str, names: str = "hf", model: str | None = None, config: str | Path | None = None,
               dtype: str | None = None) -> MappedView:
    """Any checkpoint (`FORMAT:PATH`), its tensors under `names` ("hf": the names accel.models uses),
    read lazily: e.g. a MindFormers .ckpt as the parameters of an accel model."""
    fmt, path = parse_spec(spec)
    reader = open_reader(fmt, path)
    config_path = find_config(path, config)
    cfg = load_config(config_path) if config_path else None
    planned, _, _, _ = mapping(reader, fmt.names, names, model=model, config=cfg,
                               keymap=None if fmt.names == names else names, allow_unmapped=False)
    return MappedView(reader, planned, dtype)


def _stream(view: MappedView, name: str, hasher: Hasher, progress: Progress) -> Callable[[], Iterator[Chunk]]:
    return lambda: hasher.stream(name, view.chunks(name), progress)


def _spans(view: MappedView, name: str, hasher: Hasher,
           progress: Progress) -> Callable[[], Iterator[Span]] | None:
    """The tensor as spans of its source files, when it needs no cast and every piece of it lies in its
    file as it is (None otherwise: it streams through `_stream`)."""
    p = view.source(name)
    if view.info(name).dtype != p.info.dtype:
        return None
    parts = []
    for src, begin, end in p.pieces:
        r = view.reader.files[src] if isinstance(view.reader, HFCheckpoint) else view.reader
        if not isinstance(r, FileReader) or not r.copyable(src):
            return None
        parts.append((r, src, begin, end))

    def copies() -> Iterator[tuple[Span, Chunk]]:
        for r, src, begin, end in parts:
            yield from r.copies(src, begin, end)

    return lambda: hasher.spans(name, copies(), progress)


def _fsync(path: Path) -> None:
    """Flush a written file (or a directory's entries) to disk: a rename is atomic, but without this
    a crash soon after can leave the renamed file empty."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stage(path: Path) -> Path:
    """A temporary directory beside `path` for the output and its manifest until they are complete
    (the files in it are created fresh, never truncated: ext4 flushes a truncated file on close)."""
    if not path.parent.exists():
        raise UsageError(f"directory {path.parent} does not exist")
    try:
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise AccelError(f"cannot write {path}: {e.strerror or e}") from None


def convert(source: str, output: str, *, model: str | None = None, config: str | Path | None = None,
            dtype: str | None = None, max_shard_size: str | None = None, keymap: str | None = None,
            allow_unmapped: bool = False, progress: TextIO | None = None, progress_every: float = 2.0) -> Result:
    """Convert `FORMAT:PATH` to `FORMAT:PATH`; see the module docstring."""
    start = time.perf_counter()
    fmt_src, src_path = parse_spec(source)
    fmt_dst, dst_path = parse_spec(output)
    if dtype is not None and dtype not in FLOATS:
        raise UsageError(f"--dtype {dtype!r}: use one of {', '.join(FLOATS)}")
    directory = writes_directory(fmt_dst, dst_path)
    max_bytes = parse_size(max_shard_size) if max_shard_size else DEFAULT_SHARD
    if max_shard_size and not directory:
        raise UsageError(f"--max-shard-size needs a sharded output: a directory for {fmt_dst.name} "
                         f"(not a {dst_path.suffix or 'file'} path)" if fmt_dst.sharded else
                         f"--max-shard-size: {fmt_dst.name} is written as a single file")
    if dst_path.is_dir() and not directory:
        raise UsageError(f"{dst_path} is a directory; give a file name for {fmt_dst.name}")
    if directory and dst_path.exists():
        raise UsageError(f"{dst_path} already exists; give a new directory for the sharded {fmt_dst.name} output")

    reader = open_reader(fmt_src, src_path)
    if not reader.keys():
        raise CheckpointError(f"{src_path} holds no tensors")
    if isinstance(reader, MindSporeCkptFile):
        reader.check_crc()
    if dst_path.resolve() in source_files(reader):
        raise UsageError(f"{dst_path} is part of the source; the source is never overwritten")
    config_path = find_config(src_path, config)
    cfg = load_config(config_path) if config_path else None
    planned, src_names, dst_names, family = mapping(reader, fmt_src.names, fmt_dst.names, model=model, config=cfg,
                                                    keymap=keymap, allow_unmapped=allow_unmapped)
    view = MappedView(reader, planned, dtype)
    total = sum(view.info(n).nbytes for n in view.keys())
    manifest_path = dst_path.with_name(dst_path.name + ".manifest.json")
    stage = _stage(dst_path)
    bar = Progress(len(planned), total, progress, progress_every, Writeback(stage))
    hasher = Hasher()
    entries = [Entry(n, view.info(n), _stream(view, n, hasher, bar), _spans(view, n, hasher, bar))
               for n in view.keys()]
    out, manifest = stage / dst_path.name, stage / manifest_path.name
    try:
        if directory:
            out.mkdir()
            files = write_directory(out, fmt_dst.name, entries, max_bytes)
            if config_path is not None:
                shutil.copyfile(config_path, out / "config.json")
            written = [*out.iterdir(), out]
        else:
            fmt_dst.write_file(out, entries)
            files = dict.fromkeys(view.keys(), dst_path.name)
            written = [out]
        for f in written:  # while the last tensors are still being hashed
            _fsync(f)
        bar.close()
        digests = hasher.results()
        manifest.write_text(manifest_text({
            "format": fmt_dst.name, "path": dst_path.name, "names": dst_names, "model_type": family,
            "source": {"format": fmt_src.name, "path": str(src_path), "names": src_names},
            "total_bytes": total,
            "tensors": {n: {"dtype": view.info(n).dtype.name, "shape": list(view.info(n).shape),
                            "sha256": digests[n], "file": files[n]} for n in view.keys()},
        }))
        _fsync(manifest)
        os.replace(out, dst_path)
        os.replace(manifest, manifest_path)
        _fsync(dst_path.parent)
    except OSError as e:
        raise AccelError(f"cannot write {dst_path}: {e.strerror or e}") from None
    finally:
        hasher.close()
        shutil.rmtree(stage, ignore_errors=True)
    return Result(dst_path, manifest_path, len(planned), total, time.perf_counter() - start, src_names, dst_names,
                  family, dict(Counter(p.rule for p in planned)), config_path)
