"""A checkpoint's identity: the SHA-256 of every tensor's stored bytes, by name.

It is what a golden record keeps of the weights it was written from, so that a record is only ever
compared against the same weights. The digests are the ones `accel convert` puts in its manifest (the
bytes as stored, little-endian, C order), so a checkpoint converted to another format without a cast
keeps its identity. They are taken from a manifest beside the checkpoint when it is newer than every
weight file, else computed once and cached under the accel-port cache directory, keyed by the weight
files' paths, sizes, inodes and modification times.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from accel import cache_dir
from accel.checkpoint.hf import HFCheckpoint
from accel.errors import CheckpointError


def _stamp(files: list[Path]) -> list[list[object]]:
    out: list[list[object]] = []
    for f in sorted(set(files)):
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_ino, st.st_mtime_ns])
    return out


def _from_manifest(directory: Path, names: list[str], newest: int) -> dict[str, str] | None:
    """Digests from `DIR.manifest.json` written by `accel convert`, when it covers every tensor and is
    newer than the weight files."""
    manifest = directory.with_name(directory.name + ".manifest.json")
    try:
        if manifest.stat().st_mtime_ns < newest:
            return None
        tensors = json.loads(manifest.read_text())["tensors"]
        digests = {n: tensors[n]["sha256"] for n in names}
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    return digests if all(isinstance(d, str) and len(d) == 64 for d in digests.values()) else None


def tensor_digests(directory: str | Path) -> dict[str, str]:
    """name -> SHA-256 hex digest of each tensor of the HF checkpoint directory, in the checkpoint's order."""
    directory = Path(directory)
    ckpt = HFCheckpoint(directory)
    names = ckpt.keys()
    files = [ckpt.files[n].path for n in names]
    stamp = _stamp(files)
    newest = max(int(s[3]) for s in stamp)  # type: ignore[call-overload]
    found = _from_manifest(directory, names, newest)
    if found is not None:
        return found
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:32]
    cached = cache_dir() / "identity" / f"{key}.json"
    try:
        digests = json.loads(cached.read_text())
        if isinstance(digests, dict) and list(digests) == names:
            return digests
    except (OSError, ValueError, RecursionError):
        pass
    digests = {name: _digest(ckpt, name) for name in names}
    try:  # the cache is a convenience: a read-only home only costs the hashing next time
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(digests))
        os.replace(tmp, cached)
    except OSError:
        pass
    return digests


def _digest(ckpt: HFCheckpoint, name: str) -> str:
    h = hashlib.sha256()
    for chunk in ckpt.chunks(name):
        h.update(chunk)
    return h.hexdigest()


def first_difference(recorded: dict[str, str], actual: dict[str, str]) -> str | None:
    """A one-line account of the first tensor (in the recorded order) whose bytes differ, or that one
    side lacks; None when both are the same weights."""
    for name, digest in recorded.items():
        if name not in actual:
            return f"tensor {name} is missing"
        if actual[name] != digest:
            return f"tensor {name} differs (sha256 {actual[name][:12]}..., recorded {digest[:12]}...)"
    extra = [n for n in actual if n not in recorded]
    return f"tensor {extra[0]} was not in the recorded checkpoint" if extra else None


def check_same(recorded: dict[str, str], directory: str | Path, what: str) -> None:
    """Raises CheckpointError naming the first differing tensor unless `directory` holds the weights
    `recorded` describes."""
    problem = first_difference(recorded, tensor_digests(directory))
    if problem:
        raise CheckpointError(f"{directory} is not the checkpoint {what} was written from: {problem}")
