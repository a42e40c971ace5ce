"""The checkpoint formats a conversion reads and writes, by the names the CLI uses (`FORMAT:PATH`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from accel.checkpoint import mindspore_ckpt, npz, safetensors, torch_bin
from accel.checkpoint.base import Entry, Reader
from accel.checkpoint.hf import HFCheckpoint
from accel.checkpoint.merge import MergedCheckpoint, is_distributed
from accel.errors import CheckpointError, UsageError


@dataclass(frozen=True)
class Format:
    name: str
    open_file: Callable[[Path], Reader]
    write_file: Callable[[Path, Sequence[Entry]], None]
    names: str | None  # the key map side its tensors are named for by default; None: as the source
    suffixes: tuple[str, ...]  # of a single file; a path without one is an HF directory (sharded formats)
    sharded: bool = False  # read and written as a Hugging Face checkpoint directory as well


FORMATS = {f.name: f for f in (
    Format("safetensors", safetensors.SafetensorsFile, lambda p, e: safetensors.write_entries(p, e, {"format": "pt"}),
           "hf", (".safetensors",), sharded=True),
    Format("torch-bin", torch_bin.TorchBinFile, torch_bin.write_entries, "hf", (".bin", ".pt", ".pth"), sharded=True),
    Format("mindspore-ckpt", mindspore_ckpt.MindSporeCkptFile, mindspore_ckpt.write_entries, "mindformers",
           (".ckpt",)),
    Format("mindspore-safetensors", safetensors.MindSporeSafetensorsFile,
           lambda p, e: safetensors.write_entries(p, e, {"format": "ms"}), "mindformers", (".safetensors",)),
    Format("npz", npz.NpzFile, npz.write_entries, None, (".npz",)),
)}


def parse_spec(text: str) -> tuple[Format, Path]:
    """`FORMAT:PATH` -> (format, path)."""
    fmt, sep, path = text.partition(":")
    if not sep or not path:
        raise UsageError(f"{text!r} is not FORMAT:PATH; formats: {', '.join(FORMATS)}")
    if fmt not in FORMATS:
        raise UsageError(f"unknown checkpoint format {fmt!r} in {text!r}; formats: {', '.join(FORMATS)}")
    return FORMATS[fmt], Path(path)


def open_reader(fmt: Format, path: Path, strategy: Path | None = None) -> Reader:
    """A file of the format, or for safetensors/torch-bin also an HF checkpoint directory, or for
    mindspore-ckpt a distributed run's rank_*/ directory (merged through `strategy`, by default the
    *strategy*.ckpt beside the rank folders)."""
    if fmt.sharded and path.is_dir():
        return HFCheckpoint(path, fmt.name)
    if fmt.name == "mindspore-ckpt" and is_distributed(path):  # rank_*/ shards of a distributed run
        return MergedCheckpoint(path, strategy)
    if strategy is not None:
        raise UsageError(f"--strategy merges a distributed MindSpore checkpoint: {path} is not a directory of "
                         "rank_* folders")
    if path.exists() and not path.is_file():  # a FIFO or device would block the read, or never end
        raise CheckpointError(f"{path} is not a regular file; give a checkpoint file"
                              + (" or directory" if fmt.sharded else ""))
    return fmt.open_file(path)


def writes_directory(fmt: Format, path: Path) -> bool:
    return fmt.sharded and not path.name.endswith(fmt.suffixes)
