"""Streaming, verified, atomic checkpoint conversion between formats and between HF and MindFormers names.

Each output tensor is streamed from its source byte ranges through an optional dtype cast into the
writer, hashed (SHA-256) on the way, so memory holds a few chunks, never the model. A tensor that needs
no cast and lies in its source file as it is goes to the writer as byte ranges of that file: the writer
leaves room for them, and worker threads, one tensor each, read them through a small buffer, hash them
and write them into that room, so the bytes are read from memory once, and every core is busy. The
output is written under a temporary name in its destination directory (a temporary directory for a
sharded HF output) and renamed only once complete and flushed to disk, with a manifest of every
tensor's dtype, shape and SHA-256 beside it (`OUTPUT.manifest.json`). Sources are opened read-only and
an output that would replace one of their files is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import shutil
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from accel.checkpoint.base import FLOATS, Chunk, Entry, FileReader, Reader, Span, size_of, transfer
from accel.checkpoint.formats import open_reader, parse_spec, writes_directory
from accel.checkpoint.hf import HFCheckpoint, write_directory
from accel.checkpoint.keymap import SIDES, SMALL_PIECE, KeyMap, MappedView, Planned, generations, resolve_family
from accel.checkpoint.mindspore_ckpt import MindSporeCkptFile
from accel.errors import AccelError, CheckpointError, ModelError, UsageError
from accel.inputs import read_json_object
from accel.staging import discard_staged, stage_dir

DEFAULT_SHARD = 5 * 10**9  # save_pretrained's default max_shard_size, "5GB"
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'2GB' (10^9, as transformers counts), '512MiB', or a number of bytes."""
    m = re.fullmatch(r"\s*(\d{1,20}(?:\.\d{1,20})?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    size = float(m.group(1)) * UNITS[(m.group(2) or "").upper()] if m else 0.0
    if not 1 <= size <= 2**60:
        raise UsageError(f"--max-shard-size {text[:40]!r} is not a size from 1 byte to 1 EiB such as 2GB, 500MB "
                         "or 1GiB")
    return int(size)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} TB"


class Progress:
    """Tensor count and bytes on stderr, at most every `every` seconds (a line each; `\\r` on a terminal)."""

    def __init__(self, tensors: int, nbytes: int, stream: TextIO | None = None, every: float = 2.0):
        self.tensors, self.nbytes, self.every = tensors, nbytes, every
        self.stream = stream if stream is not None else sys.stderr
        self.done_tensors = self.done_bytes = 0
        self.start = self.last = time.perf_counter()
        self.printed = False
        self.lock = threading.Lock()  # the hashing threads report as they go

    def add(self, nbytes: int = 0, tensors: int = 0) -> None:
        with self.lock:
            self._add(nbytes, tensors)

    def _add(self, nbytes: int, tensors: int) -> None:
        self.done_bytes += nbytes
        self.done_tensors += tensors
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
    if not path.exists():
        raise UsageError(f"--config {path}: no such file")
    cfg = read_json_object(path, ModelError, "a model config")
    from accel.models import check_config

    check_config(cfg, path)  # the sizes the key map splits fused tensors by
    return cfg


def find_config(source: Path, config: str | Path | None) -> Path | None:
    """--config, else the config.json of an HF source directory (or beside a source file)."""
    if config is not None:
        return Path(config)
    candidate = (source if source.is_dir() else source.parent) / "config.json"
    return candidate if candidate.is_file() else None


def source_files(reader: Reader) -> set[Path]:
    """What the source is, resolved: its weight files, and for a directory the directory and every file
    in it (index, config, tokenizer: an output never lands on any of them)."""
    if isinstance(reader, HFCheckpoint):
        return ({f.path.resolve() for f in reader.files.values()} | {reader.directory.resolve()}
                | {f.resolve() for f in reader.directory.iterdir()})
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
    side, _, generation = (wanted or "").partition(":")
    if wanted not in (None, "keep") and (side not in SIDES or (generation and side != "mindformers")):
        raise UsageError(f"--keymap {wanted!r}: use hf, mindformers, mindformers:GENERATION or keep")
    if generation and generation not in generations(family)[0]:
        raise UsageError(f"--keymap {wanted}: the {family} key map has no generation {generation!r}; "
                         f"use one of {', '.join(generations(family)[0])}")
    km = KeyMap(family, generation or None)
    src = km.side_of(reader.keys(), src_names or "hf")
    dst = src if wanted in (None, "keep") else side
    planned = km.plan(reader, src, dst, config, allow_unmapped)
    # the naming recorded in the manifest says which MindFormers generation it is
    src_label = km.label(src, reader.keys())
    return planned, src_label, src_label if dst == src else km.label(dst), family


HASH_STEP = 1 << 20  # bytes hashed at a time, well within a core's L2 cache


def hash_workers() -> int:
    """Threads for the manifest's SHA-256: one per core this process may run on (at least 2, at most 8)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 2
    return max(2, min(8, cores))


class Hasher:
    """SHA-256 of every tensor on worker threads, one tensor each (hashlib releases the GIL; SHA-256 runs
    at 1.2-1.8 GB/s on one core, slower than a copy). A tensor the writer writes itself (`stream`: a cast)
    is hashed beside it, at most `in_flight` chunks (16 MiB each) waiting; a tensor given to the writer
    as spans of its source (`spans`) is copied by its worker into the room the writer leaves for it (read
    through a buffer, hashed, written: `base.transfer`), so the writer goes on at once. A free worker
    takes the largest tensor waiting, so no large one (an embedding, an lm_head) is left to a single core
    at the end while the others idle. What the workers write is put to disk as it goes, then dropped from
    the page cache (`_to_disk`). The first failure stops every worker and is raised to the writer at its
    next piece, and by `results`."""

    def __init__(self, progress: Progress, workers: int | None = None, in_flight: int = 8):
        workers = workers or hash_workers()
        self.progress = progress
        self.waiting: queue.PriorityQueue = queue.PriorityQueue()  # (-bytes, order, job), largest first
        self.threads = [threading.Thread(target=self._work, name=f"sha256-{i}", daemon=True) for i in range(workers)]
        for t in self.threads:
            t.start()
        self.slots = threading.Semaphore(max(in_flight, 2 * workers))
        self.digests: dict[str, str] = {}
        self.jobs: list[tuple[Future, queue.SimpleQueue]] = []
        self.failure: BaseException | None = None
        self.stopped = threading.Event()
        self.buffers = threading.local()
        self.outputs: dict[tuple[int, int], int] = {}  # (device, inode) of an output file -> the workers' fd
        self.written: deque[tuple[int, int, int]] = deque()  # (fd, offset, length) started to disk, to drop
        self.lag = 4 * workers  # ranges started to disk before the oldest is dropped (on disk by then)
        self.lock = threading.Lock()

    def _submit(self, work: Callable[[str, queue.SimpleQueue], None], name: str, nbytes: int) -> queue.SimpleQueue:
        q: queue.SimpleQueue = queue.SimpleQueue()
        done: Future = Future()
        self.jobs.append((done, q))
        self.waiting.put((-nbytes, len(self.jobs), (work, name, q, done)))
        return q

    def _work(self) -> None:
        while (job := self.waiting.get()[2]) is not None:
            work, name, q, done = job
            try:
                work(name, q)
            except BaseException as e:  # a bug here must not leave results() waiting
                done.set_exception(e)
            else:
                done.set_result(None)

    def stream(self, name: str, nbytes: int, chunks: Iterable[Chunk], writeback: Writeback) -> Iterator[Chunk]:
        """`chunks` (`nbytes` in all), passed through to the writer and hashed on the side."""
        q = self._submit(self._hash, name, nbytes)
        try:
            for chunk in chunks:
                self._check()
                self.slots.acquire()
                q.put(chunk)
                yield chunk  # a mapped window is unmapped once written and hashed
                writeback.add(size_of(chunk))
        finally:
            q.put(None)

    def spans(self, name: str, nbytes: int, spans: Iterable[Span]) -> Iterator[Span]:
        """`spans` (`nbytes` in all), passed to the writer to be deferred: a worker copies and hashes each
        where it goes."""
        q = self._submit(self._copy, name, nbytes)

        def defer(span: Span, begin: int, end: int, fd: int, at: int) -> None:
            q.put((span, begin, end, self._output(fd), at))

        try:
            for span in spans:
                self._check()
                yield replace(span, defer=defer)
        finally:
            q.put(None)

    def _output(self, fd: int) -> int:
        """The workers' own descriptor of the writer's file `fd` (the writer closes its file before the
        copies are done): one per output file, not one per piece (a 70B checkpoint has ~8,000 pieces)."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key not in self.outputs:
            self.outputs[key] = os.dup(fd)
        return self.outputs[key]

    def _check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def _buffer(self) -> memoryview:
        if not hasattr(self.buffers, "view"):
            self.buffers.view = memoryview(bytearray(HASH_STEP))
        return self.buffers.view

    def _hash(self, name: str, q: queue.SimpleQueue) -> None:
        # Each chunk is hashed through a buffer that stays in the core's cache: SHA-256 reading a chunk
        # straight from memory (a mapping of the page cache, or a fresh cast) stalls on every cache
        # line, while a copy streams it; copy and hash take ~15% less CPU than the hash alone.
        h, buf = hashlib.sha256(), np.frombuffer(self._buffer(), np.uint8)
        while (chunk := q.get()) is not None:
            try:
                if self.failure is None and not self.stopped.is_set():
                    data = np.frombuffer(chunk, np.uint8)
                    for i in range(0, len(data), HASH_STEP):
                        part = buf[: min(HASH_STEP, len(data) - i)]
                        np.copyto(part, data[i : i + HASH_STEP])  # NumPy releases the GIL for the copy
                        h.update(part.data)
                    self.progress.add(len(data))
                    del data
            except BaseException as e:
                self.failure = self.failure or e
            del chunk
            self.slots.release()
        self._done(name, h)

    def _copy(self, name: str, q: queue.SimpleQueue) -> None:
        h, buf = hashlib.sha256(), self._buffer()
        while (item := q.get()) is not None:
            span, begin, end, fd, at = item
            if self.failure is not None or self.stopped.is_set():
                continue
            try:
                transfer(span, begin, end, fd, at, buf, h.update)
                self._to_disk(fd, at, end - begin)
                self.progress.add(end - begin)
            except BaseException as e:
                self.failure = self.failure or e
        self._done(name, h)

    def _to_disk(self, fd: int, offset: int, length: int) -> None:
        """Start writing a range just written (posix_fadvise DONTNEED writes dirty pages back without
        waiting), and drop the range started `lag` ranges ago, on disk by now, from the page cache.
        Advice that fails changes nothing written."""
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        with self.lock:
            self.written.append((fd, offset, length))
            old = self.written.popleft() if len(self.written) > self.lag else None
        if old is not None:
            with contextlib.suppress(OSError):
                os.posix_fadvise(*old, os.POSIX_FADV_DONTNEED)

    def _done(self, name: str, h: Any) -> None:
        if self.failure is None and not self.stopped.is_set():
            self.digests[name] = h.hexdigest()
            self.progress.add(tensors=1)

    def results(self) -> dict[str, str]:
        """Every tensor's digest, once every copy is written; the first failure of any worker is raised."""
        for job, _ in self.jobs:
            job.result()
        self._check()
        return self.digests

    def close(self) -> None:
        self.stopped.set()  # a job whose stream was abandoned stops at once
        for _, q in self.jobs:
            q.put(None)
        for i, _ in enumerate(self.threads):
            self.waiting.put((float("inf"), i, None))  # after every job
        for t in self.threads:
            t.join()
        for fd in self.outputs.values():
            os.close(fd)
        self.outputs.clear()
        self.written.clear()
        self.failure = None  # its traceback holds the workers' frames, which hold this object: no cycle left


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


def _stream(view: MappedView, name: str, hasher: Hasher, writeback: Writeback) -> Callable[[], Iterator[Chunk]]:
    return lambda: hasher.stream(name, view.info(name).nbytes, view.chunks(name), writeback)


def _spans(view: MappedView, name: str, hasher: Hasher) -> Callable[[], Iterator[Span]] | None:
    """The tensor as spans of its source files, when it needs no cast and every piece of it lies in its
    file as it is (None otherwise: it streams through `_stream`)."""
    p = view.source(name)
    if view.info(name).dtype != p.info.dtype:
        return None
    if len(p.pieces) > 64 and p.info.nbytes // len(p.pieces) < SMALL_PIECE:
        return None  # interleaved rows: one span each would be a copy per row; streaming reads in batches
    parts = []
    for src, begin, end in p.pieces:
        r = view.reader.files[src] if isinstance(view.reader, HFCheckpoint) else view.reader
        if not isinstance(r, FileReader) or not r.copyable(src):
            return None
        parts.append((r, src, begin, end))

    def windows() -> Iterator[Span]:
        for r, src, begin, end in parts:
            yield from r.windows(src, begin, end)

    return lambda: hasher.spans(name, view.info(name).nbytes, windows())


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
        return stage_dir(path)
    except OSError as e:
        raise AccelError(f"cannot write {path}: {e.strerror or e}") from None


def convert(source: str, output: str, *, model: str | None = None, config: str | Path | None = None,
            dtype: str | None = None, max_shard_size: str | None = None, keymap: str | None = None,
            allow_unmapped: bool = False, progress: TextIO | None = None, progress_every: float = 2.0,
            overwrite: bool = False, strategy: str | Path | None = None) -> Result:
    """Convert `FORMAT:PATH` to `FORMAT:PATH`; see the module docstring. An output or manifest that would
    land on a file the conversion reads is refused, and an existing one is replaced only with `overwrite`."""
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

    reader = open_reader(fmt_src, src_path, Path(strategy) if strategy else None)
    if not reader.keys():
        raise CheckpointError(f"{src_path} holds no tensors")
    if isinstance(reader, MindSporeCkptFile):
        reader.check_crc()
    config_path = find_config(src_path, config)
    manifest_path = dst_path.with_name(dst_path.name + ".manifest.json")
    reads = source_files(reader) | ({Path(config_path).resolve()} if config_path else set())
    for target in (dst_path, manifest_path):
        if target.resolve() in reads:
            raise UsageError(f"{target} is part of the source (a file the conversion reads: weights, index, "
                             "config, or another file of its directory); the source is never overwritten")
    if not overwrite:
        existing = next((t for t in (dst_path, manifest_path) if t.exists() or t.is_symlink()), None)
        if existing is not None:
            raise UsageError(f"{existing} already exists; pass --overwrite to replace it")
    cfg = load_config(config_path) if config_path else None
    planned, src_names, dst_names, family = mapping(reader, fmt_src.names, fmt_dst.names, model=model, config=cfg,
                                                    keymap=keymap, allow_unmapped=allow_unmapped)
    view = MappedView(reader, planned, dtype)
    total = sum(view.info(n).nbytes for n in view.keys())
    bar = Progress(len(planned), total, progress, progress_every)
    hasher = Hasher(bar)
    try:
        stage = _stage(dst_path)
        writeback = Writeback(stage)
        entries = [Entry(n, view.info(n), _stream(view, n, hasher, writeback), _spans(view, n, hasher))
                   for n in view.keys()]
        out, manifest = stage / dst_path.name, stage / manifest_path.name
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
        digests = hasher.results()  # every tensor copied and hashed
        for f in written:
            _fsync(f)
        bar.close()
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
        discard_staged(dst_path)
    return Result(dst_path, manifest_path, len(planned), total, time.perf_counter() - start, src_names, dst_names,
                  family, dict(Counter(p.rule for p in planned)), config_path)
