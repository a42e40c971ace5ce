"""A Hugging Face checkpoint directory: config.json plus model.safetensors or pytorch_model.bin, or
shards listed in model.safetensors.index.json / pytorch_model.bin.index.json. Tensors are read lazily,
one at a time. `write_directory` writes one in the same layouts, sharded by size as save_pretrained does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from accel.checkpoint import safetensors, torch_bin
from accel.checkpoint.base import CHUNK, Chunk, Entry, Reader, TensorInfo
from accel.checkpoint.safetensors import SafetensorsFile
from accel.checkpoint.torch_bin import TorchBinFile
from accel.errors import CheckpointError, ModelError
from accel.inputs import read_json_object

# format -> (single file, index, shard name pattern, reader, writer)
LAYOUTS: dict[str, tuple[str, str, str, Callable[[Path], Reader], Callable[[Path, Sequence[Entry]], None]]] = {
    "safetensors": ("model.safetensors", "model.safetensors.index.json", "model-{:05d}-of-{:05d}.safetensors",
                    SafetensorsFile, lambda p, e: safetensors.write_entries(p, e, {"format": "pt"})),
    "torch-bin": ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-{:05d}-of-{:05d}.bin",
                  TorchBinFile, torch_bin.write_entries),
}


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not directory.exists():
        raise ModelError(f"model directory {directory} does not exist")
    if not directory.is_dir():
        raise ModelError(f"{directory} is not a directory; --model takes an HF checkpoint directory or a preset name")
    if not path.is_file():
        raise ModelError(f"{directory} has no config.json; is it a Hugging Face checkpoint directory?")
    return read_json_object(path, ModelError)


def _roots(directory: Path) -> list[Path]:
    """Where a checkpoint's shards may lie: its directory, and for a Hugging Face hub-cache snapshot
    (models--org--name/snapshots/REV/, whose files link to ../../blobs/) that model's cache root."""
    roots = [directory.resolve()]
    if directory.parent.name == "snapshots" and (directory.parent.parent / "blobs").is_dir():
        roots.append(directory.parent.parent.resolve())
    return roots


def _shard_path(directory: Path, name: str, index: Path) -> Path:
    shard = (directory / name).resolve()
    if not any(root in shard.parents for root in _roots(directory)):
        raise CheckpointError(f"{index}: shard {name!r} points outside the checkpoint directory")
    if not shard.is_file():
        raise CheckpointError(f"{index}: shard {name!r} is missing from {directory}")
    return shard


class HFCheckpoint:
    """name -> tensor over every weight file of an HF checkpoint directory (safetensors preferred: it
    needs no unpickling at all; `fmt` restricts it to one layout)."""

    def __init__(self, directory: str | Path, fmt: str | None = None):
        self.path = self.directory = Path(directory)
        self.files: dict[str, Reader] = {}  # tensor name -> the file holding it
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no such directory")
        for layout, (single_name, index_name, _, opener, _) in LAYOUTS.items():
            if fmt not in (None, layout):
                continue
            single, index = self.directory / single_name, self.directory / index_name
            if index.is_file():
                self._open_index(index, opener)
                return
            if single.is_file():
                f = opener(single)
                self.files = dict.fromkeys(f.keys(), f)
                return
        wanted = " or ".join(f"{LAYOUTS[k][0]} (or {LAYOUTS[k][1]})" for k in LAYOUTS if fmt in (None, k))
        raise CheckpointError(f"{self.directory} has no {wanted}")

    def _open_index(self, index: Path, opener: Callable[[Path], Reader]) -> None:
        weight_map = read_json_object(index, CheckpointError, "a checkpoint index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} is not a valid index (no weight_map object)")
        opened: dict[Path, Reader] = {}
        for name, shard_name in weight_map.items():
            if not isinstance(shard_name, str):
                raise CheckpointError(f"{index}: shard of tensor {name!r} is not a file name")
            shard = _shard_path(self.directory, shard_name, index)
            if shard not in opened:
                opened[shard] = opener(shard)
            if name not in opened[shard].keys():
                raise CheckpointError(f"{index}: tensor {name!r} is not in its shard {shard_name}")
            self.files[name] = opened[shard]
        if not self.files:
            raise CheckpointError(f"{index}: the weight_map lists no tensors")

    def keys(self) -> list[str]:
        return list(self.files)

    def info(self, name: str) -> TensorInfo:
        return self.files[name].info(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self.files[name].get(name)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.files:
            yield name, self.get(name)

    def chunks(self, name: str, begin: int = 0, end: int | None = None, size: int = CHUNK) -> Iterator[Chunk]:
        return self.files[name].chunks(name, begin, end, size)

    def file_of(self, name: str) -> str:
        return self.files[name].path.name


def shard(entries: Sequence[Entry], max_bytes: int) -> list[list[Entry]]:
    """Entries in order, cut into shards of at most max_bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.info.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.info.nbytes
    return shards


def write_directory(directory: Path, fmt: str, entries: Sequence[Entry], max_bytes: int) -> dict[str, str]:
    """Write entries as an HF checkpoint directory (which exists and is empty); name -> file written."""
    single, index_name, pattern, _, writer = LAYOUTS[fmt]
    shards = shard(entries, max_bytes)
    files = [single] if len(shards) == 1 else [pattern.format(i + 1, len(shards)) for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for file, part in zip(files, shards):
        writer(directory / file, part)
        weight_map |= {e.name: file for e in part}
    if len(shards) > 1:
        total = sum(e.info.nbytes for e in entries)
        (directory / index_name).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return weight_map
