"""A distributed MindSpore checkpoint (rank_*/ shards and the parallel strategy file the run wrote) read
as the full tensors, as MindSpore's transform_checkpoints would merge them, without loading a model.

The strategy file is MindSpore's `ParallelStrategyMap` protobuf (mindspore/train/node_strategy_pb2.py):
per sliced parameter a device matrix (the devices' arrangement, last axis fastest in rank order) and a
tensor map (for each tensor axis, the device-matrix axis it is split over, counted from the right; -1:
not split). A parameter the strategy does not name is replicated. Each merged tensor is planned as byte
ranges of the ranks' shards, so it streams a block at a time; where several ranks hold the same slice
(data-parallel replicas, or replicated parameters), every copy is read and must be equal.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from math import prod
from pathlib import Path

import numpy as np

from accel.checkpoint.base import CHUNK, Chunk, TensorInfo
from accel.checkpoint.mindspore_ckpt import MindSporeCkptFile
from accel.errors import CheckpointError

Piece = tuple[int, int, int]  # (rank, byte offset in its shard, length)


def is_distributed(path: Path) -> bool:
    return path.is_dir() and any(re.fullmatch(r"rank_\d+", p.name) for p in path.iterdir() if p.is_dir())


def find_strategy(directory: Path) -> Path:
    """The strategy file: a *strategy*.ckpt in the directory (or its strategy/ folder)."""
    found = sorted(p for d in (directory, directory / "strategy") if d.is_dir() for p in d.glob("*strategy*.ckpt"))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(p.name for p in found)})"
        raise CheckpointError(f"{directory} holds {what} parallel strategy file(s) (*strategy*.ckpt): put the one "
                              "the training run wrote (strategy_ckpt_config's save_file) beside the rank_* folders")
    return found[0]


def read_strategy(path: Path) -> dict[str, tuple[list[int], list[int]]]:
    """{parameter: (device matrix, tensor map)} of a strategy file."""
    from google.protobuf.message import DecodeError
    from mindspore.train import node_strategy_pb2  # framework-import-ok: the format is MindSpore's own

    m = node_strategy_pb2.ParallelStrategyMap()
    try:
        m.ParseFromString(path.read_bytes())
    except DecodeError:
        raise CheckpointError(f"{path} is not a MindSpore parallel strategy file (no ParallelStrategyMap)") from None
    out = {}
    for item in m.parallel_layout_item:
        lay = item.parallel_layouts
        if lay.opt_weight_shard_size > 1:
            raise CheckpointError(f"{path}: {item.param_name} is also sharded by the optimizer (optimizer "
                                  "parallel); merge with MindSpore's transform_checkpoints")
        if len(lay.dev_matrix) != 1 or len(lay.tensor_map) != 1:
            raise CheckpointError(f"{path}: {item.param_name} has {len(lay.tensor_map)} tensor maps; one expected")
        out[item.param_name] = (list(lay.dev_matrix[0].dim), list(lay.tensor_map[0].dim))
    return out


class MergedCheckpoint:
    """The full tensors of DIR/rank_*/*.ckpt through the strategy file."""

    def __init__(self, path: str | Path, strategy: str | Path | None = None):
        self.path = Path(path)
        ranks = sorted((int(p.name[5:]), p) for p in self.path.iterdir() if re.fullmatch(r"rank_\d+", p.name))
        numbers = [r for r, _ in ranks]
        if numbers != list(range(len(ranks))):
            raise CheckpointError(f"{self.path}: rank folders {numbers} are not rank_0..rank_{len(ranks) - 1}")
        self.shards = []
        for _, folder in ranks:
            files = sorted(folder.glob("*.ckpt"))
            if len(files) != 1:
                raise CheckpointError(f"{folder} holds {len(files)} .ckpt files ({', '.join(f.name for f in files)}); "
                                      "keep the one step to merge")
            self.shards.append(MindSporeCkptFile(files[0]))
        self.layouts = read_strategy(Path(strategy) if strategy else find_strategy(self.path))
        names = self.shards[0].keys()
        for r, s in enumerate(self.shards[1:], 1):
            if s.keys() != names:
                extra = sorted(set(s.keys()) ^ set(names))[:1]
                raise CheckpointError(f"rank_{r} and rank_0 hold different tensors (e.g. {extra}): not one run's "
                                      "shards")
        self._infos = {n: self._merged_info(n) for n in names}

    def _split(self, name: str) -> tuple[list[int], list[int]]:
        """(shards along each axis, the device-matrix axis of each; -1 not split)."""
        shape = self.shards[0].shape(name)
        if name not in self.layouts:
            return [1] * len(shape), [-1] * len(shape)
        dev, tmap = self.layouts[name]
        if prod(dev) != len(self.shards) or len(tmap) != len(shape):
            raise CheckpointError(f"{name}: strategy device matrix {dev} / tensor map {tmap} does not fit "
                                  f"{len(self.shards)} ranks and shape {list(shape)}")
        axes = [len(dev) - 1 - m if m >= 0 else -1 for m in tmap]
        return [dev[a] if a >= 0 else 1 for a in axes], axes

    def _merged_info(self, name: str) -> TensorInfo:
        info = self.shards[0].info(name)
        n, _ = self._split(name)
        for r, s in enumerate(self.shards[1:], 1):
            if s.info(name) != info:
                raise CheckpointError(f"{name}: rank_{r}'s slice is {s.info(name)}, rank_0's {info}")
        return TensorInfo(info.dtype, tuple(d * k for d, k in zip(info.shape, n)))

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        if name not in self._infos:
            raise CheckpointError(f"{self.path}: no tensor {name}")
        return self._infos[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def _holders(self, name: str) -> dict[tuple[int, ...], list[int]]:
        """The ranks holding each slice, by its index along every axis."""
        n, axes = self._split(name)
        dev = self.layouts[name][0] if name in self.layouts else [len(self.shards)]
        out: dict[tuple[int, ...], list[int]] = {}
        for r in range(len(self.shards)):
            coord = np.unravel_index(r, dev)
            out.setdefault(tuple(int(coord[a]) if a >= 0 else 0 for a in axes), []).append(r)
        return out

    def _pieces(self, name: str) -> Iterator[tuple[list[int], int, int]]:
        """(ranks holding it, offset in their slice, length) of each run of the merged tensor's bytes."""
        info, n = self.info(name), self._split(name)[0]
        holders = self._holders(name)
        item = info.dtype.itemsize
        split = [k for k, c in enumerate(n) if c > 1]
        if not split:
            yield holders[(0,) * len(n)], 0, info.nbytes
            return
        last = split[-1]
        local = self.shards[0].shape(name)
        run = local[last] * prod(local[last + 1:]) * item  # contiguous in the slice and in the whole
        for outer in np.ndindex(*info.shape[:last]):
            index = tuple(i // local[k] for k, i in enumerate(outer))
            within = sum(i % local[k] * prod(local[k + 1:last]) for k, i in enumerate(outer)) * run
            for j in range(n[last]):
                yield holders[index + (j,) + (0,) * (len(n) - last - 1)], within, run

    def chunks(self, name: str, begin: int = 0, end: int | None = None, size: int = CHUNK) -> Iterator[Chunk]:
        info = self.info(name)
        end = info.nbytes if end is None else end
        pos = 0
        for ranks, offset, length in self._pieces(name):
            lo, hi = max(begin, pos), min(end, pos + length)
            if lo < hi:
                for at in range(lo, hi, size):
                    stop = min(hi, at + size)
                    first, *others = (self._slice(r, name, offset + at - pos, offset + stop - pos) for r in ranks)
                    for r, other in zip(ranks[1:], others):
                        if other != first:
                            raise CheckpointError(f"{name}: rank_{r}'s copy differs from rank_{ranks[0]}'s; the "
                                                  "shards are not one step of one run")
                    yield first
            pos += length
            if pos >= end:
                return

    def _slice(self, rank: int, name: str, begin: int, end: int) -> bytes:
        return b"".join(bytes(c) for c in self.shards[rank].chunks(name, begin, end))

    def get(self, name: str) -> np.ndarray:
        info = self.info(name)
        data = b"".join(bytes(c) for c in self.chunks(name))
        return np.frombuffer(data, info.dtype).reshape(info.shape).copy()

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.keys():
            yield name, self.get(name)
