"""A Hugging Face checkpoint directory: config.json plus model.safetensors or pytorch_model.bin, or
shards listed in model.safetensors.index.json / pytorch_model.bin.index.json. Tensors are read lazily,
one at a time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from accel.checkpoint.safetensors import SafetensorsFile
from accel.checkpoint.torch_bin import TorchBinFile
from accel.errors import CheckpointError, ModelError


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not directory.exists():
        raise ModelError(f"model directory {directory} does not exist")
    if not directory.is_dir():
        raise ModelError(f"{directory} is not a directory; --model takes an HF checkpoint directory or a preset name")
    if not path.is_file():
        raise ModelError(f"{directory} has no config.json; is it a Hugging Face checkpoint directory?")
    try:
        cfg = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{path} does not hold a JSON object")
    return cfg


def _shard_path(directory: Path, name: str, index: Path) -> Path:
    shard = (directory / name).resolve()
    if directory.resolve() not in shard.parents:
        raise CheckpointError(f"{index}: shard {name!r} points outside the checkpoint directory")
    if not shard.is_file():
        raise CheckpointError(f"{index}: shard {name} is missing from {directory}")
    return shard


class HFCheckpoint:
    """name -> tensor over every weight file of an HF checkpoint directory."""

    # (single file, index) in order of preference: safetensors needs no unpickling at all
    LAYOUTS = (("model.safetensors", "model.safetensors.index.json", SafetensorsFile),
               ("pytorch_model.bin", "pytorch_model.bin.index.json", TorchBinFile))

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.files: dict[str, Any] = {}  # tensor name -> the file holding it
        for single_name, index_name, opener in self.LAYOUTS:
            single, index = self.directory / single_name, self.directory / index_name
            if index.is_file():
                self._open_index(index, opener)
                return
            if single.is_file():
                f = opener(single)
                self.files = dict.fromkeys(f.keys(), f)
                return
        raise CheckpointError(f"{self.directory} has no model.safetensors, pytorch_model.bin "
                              "or a sharded index of them")

    def _open_index(self, index: Path, opener: Any) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index} is not a valid index (no weight_map object)") from None
        opened: dict[Path, Any] = {}
        for name, shard_name in weight_map.items():
            if not isinstance(shard_name, str):
                raise CheckpointError(f"{index}: shard of tensor {name!r} is not a file name")
            shard = _shard_path(self.directory, shard_name, index)
            if shard not in opened:
                opened[shard] = opener(shard)
            if name not in opened[shard].keys():
                raise CheckpointError(f"{index}: tensor {name!r} is not in its shard {shard_name}")
            self.files[name] = opened[shard]

    def keys(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self.files[name].get(name)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.files:
            yield name, self.get(name)
