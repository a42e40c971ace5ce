"""A Hugging Face checkpoint directory: config.json plus model.safetensors, or shards listed in
model.safetensors.index.json. Tensors are read lazily, one at a time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from accel.checkpoint.safetensors import SafetensorsFile
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

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.files: dict[str, SafetensorsFile] = {}  # tensor name -> the file holding it
        single = self.directory / "model.safetensors"
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index} is not a valid index (no weight_map)") from None
            opened: dict[Path, SafetensorsFile] = {}
            for name, shard_name in weight_map.items():
                shard = _shard_path(self.directory, shard_name, index)
                if shard not in opened:
                    opened[shard] = SafetensorsFile(shard)
                if name not in opened[shard].entries:
                    raise CheckpointError(f"{index}: tensor {name!r} is not in its shard {shard_name}")
                self.files[name] = opened[shard]
        elif single.is_file():
            f = SafetensorsFile(single)
            self.files = dict.fromkeys(f.keys(), f)
        else:
            raise CheckpointError(f"{self.directory} has no model.safetensors or model.safetensors.index.json")

    def keys(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self.files[name].get(name)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.files:
            yield name, self.get(name)
