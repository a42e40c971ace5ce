"""Every reader, fed thousands of damaged files, either reads them or raises CheckpointError: nothing
else escapes (no IndexError from a short header, no MemoryError from a claimed size, no pickle run).

Inputs are mostly mutations of valid files, written by our writers and by the reference libraries:
bit flips, overwritten bytes, truncation, inserted and deleted runs, and edits of the structure itself
(a header entry's numbers and dtype, a zip member's content re-zipped with a valid CRC, so the
parser behind the zip layer is reached), plus some pure noise."""

from __future__ import annotations

import atexit
import io
import itertools
import json
import os
import pickle
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as st_save_file

from accel.checkpoint import mindspore_ckpt, npz, safetensors, torch_bin
from accel.checkpoint.base import entries_of
from accel.checkpoint.mindspore_ckpt import MindSporeCkptFile
from accel.checkpoint.npz import NpzFile
from accel.checkpoint.safetensors import MindSporeSafetensorsFile, SafetensorsFile
from accel.checkpoint.torch_bin import TorchBinFile
from accel.errors import CheckpointError

FUZZ = settings(max_examples=2000, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
WORK = Path(tempfile.mkdtemp(prefix="accel-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
atexit.register(shutil.rmtree, WORK, True)
COUNTER = itertools.count()

rng = np.random.default_rng(0)
TENSORS = {
    "a.weight": rng.standard_normal((3, 4)).astype(np.float32),
    "b.bias": rng.standard_normal(5).astype(ml_dtypes.bfloat16),
    "c": np.arange(6, dtype=np.int64).reshape(2, 3),
    "d": np.array(1.5, np.float16),
    "e": np.array([True, False]),
}


def _bytes(write) -> bytes:
    """What write(file object) writes."""
    f = io.BytesIO()
    write(f)
    return f.getvalue()


def _torch_seeds() -> list[bytes]:
    import torch

    path = WORK / "seed.bin"
    torch_bin.write_entries(path, entries_of(TENSORS))
    seeds = [path.read_bytes()]
    module = torch.nn.Linear(3, 2)
    seeds.append(_bytes(lambda f: torch.save(module.state_dict(), f)))  # OrderedDict with _metadata
    base = torch.arange(12.0).reshape(3, 4)
    seeds.append(_bytes(lambda f: torch.save({"view": base[:, 1:3], "tied": base, "h": torch.ones(2).half()}, f)))
    return seeds


def _file(write) -> bytes:
    """What write(path) writes."""
    path = WORK / f"seed-{next(COUNTER)}"
    write(path)
    data = path.read_bytes()
    path.unlink()
    return data


SEEDS = {
    "safetensors": [_file(lambda p: safetensors.write(p, TENSORS, {"format": "pt"})),
                    st_save_file({k: v for k, v in TENSORS.items() if v.dtype != ml_dtypes.bfloat16})],
    "mindspore-safetensors": [_file(lambda p: safetensors.write(p, TENSORS, {"format": "ms"}))],
    "mindspore-ckpt": [_file(lambda p: mindspore_ckpt.write(p, TENSORS)),
                       _file(lambda p: mindspore_ckpt.write(p, TENSORS, slice_bytes=16))],
    "npz": [_file(lambda p: npz.write(p, TENSORS)),
            _bytes(lambda f: np.savez_compressed(f, x=np.arange(50.0), y=np.ones((2, 3), np.int32))),
            _bytes(lambda f: np.savez(f, f=np.asfortranarray(np.arange(6.0).reshape(2, 3))))],
    "torch-bin": _torch_seeds(),
}
READERS = {"safetensors": SafetensorsFile, "mindspore-safetensors": MindSporeSafetensorsFile,
           "mindspore-ckpt": MindSporeCkptFile, "npz": NpzFile, "torch-bin": TorchBinFile}


def _rezip(data: bytes, member: int, edit) -> bytes:
    """The zip with one member's content edited and a valid CRC: damage that reaches the inner parser."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
        infos = zin.infolist()
        target = infos[member % len(infos)].filename
        for zi in infos:
            content = zin.read(zi)
            zout.writestr(zi, edit(content) if zi.filename == target else content)
    return out.getvalue()


def _header_edit(data: bytes, pick: int, field: str, value: object) -> bytes:
    """A safetensors header with one entry's field replaced."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    names = [k for k in header if k != "__metadata__"]
    header[names[pick % len(names)]][field] = value
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


@st.composite
def mutated(draw, fmt: str) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS[fmt])))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "byte", "truncate", "insert", "delete", "structure"]))
        # positions near the start (headers, framing) more often than deep in the data
        hi = len(data) - 1 if draw(st.booleans()) else min(len(data) - 1, 160)
        pos = draw(st.integers(0, max(hi, 0)))
        if not data:
            break
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif fmt.endswith("safetensors") and len(data) > 8:
            field = draw(st.sampled_from(["shape", "data_offsets", "dtype"]))
            value = {"shape": st.lists(st.integers(-2, 40), max_size=3),
                     "data_offsets": st.lists(st.integers(-8, 400), min_size=2, max_size=2),
                     "dtype": st.sampled_from(["F32", "BF16", "I64", "U8", "F8_E5M2", "", "f32"])}[field]
            try:
                data = bytearray(_header_edit(bytes(data), draw(st.integers(0, 9)), field, draw(value)))
            except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
                pass  # an earlier mutation already broke the header
        elif fmt in ("npz", "torch-bin"):
            cut, flip = draw(st.integers(0, 400)), draw(st.integers(0, 4000))

            def edit(content: bytes, cut=cut, flip=flip) -> bytes:
                content = bytearray(content[: len(content) - cut % (len(content) + 1)])
                if content:
                    content[flip % len(content)] ^= 0xFF
                return bytes(content)

            try:
                data = bytearray(_rezip(bytes(data), draw(st.integers(0, 20)), edit))
            except Exception:  # an earlier mutation already broke the archive beyond re-zipping
                pass
        else:  # ckpt: a varint field pushed to an extreme
            data[pos : pos + 1] = draw(st.sampled_from([b"\xff" * 10, b"\x80", b"\x0a\xff\xff\xff\x0f", b"\x08\x00"]))
    return bytes(data)


def inputs(fmt: str):
    return st.one_of(mutated(fmt), mutated(fmt), mutated(fmt), st.binary(max_size=600))


def read_all(fmt: str, data: bytes) -> None:
    path = WORK / f"{fmt}-{next(COUNTER)}"
    path.write_bytes(data)
    try:
        reader = READERS[fmt](path)
        for name in reader.keys():
            a = reader.get(name)
            assert a.shape == reader.shape(name)
    except CheckpointError as e:
        assert str(e) and "\n" not in str(e)
    finally:
        path.unlink()


def test_seeds_are_valid():
    for fmt, seeds in SEEDS.items():
        for data in seeds:
            path = WORK / "seed"
            path.write_bytes(data)
            assert READERS[fmt](path).keys()


@pytest.mark.parametrize("fmt", list(READERS))
def test_reader_survives_damaged_files(fmt):
    @FUZZ
    @given(data=inputs(fmt))
    def check(data: bytes) -> None:
        read_all(fmt, data)

    check()


def test_damaged_pickles_never_run_code(tmp_path):
    """Pickles that reach REDUCE/BUILD/INST with whatever is on the stack, inside a valid archive."""
    marker = tmp_path / "ran"

    class Boom:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    payloads = [pickle.dumps({"w": Boom()}, protocol=p) for p in (0, 2, 4)]
    payloads += [b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(K\x01K\x02tR.",  # a call with junk arguments
                 b"\x80\x02cbuiltins\neval\nX\x03\x00\x00\x001+1\x85R.",
                 b"\x80\x02}(X\x01\x00\x00\x00wccollections\nOrderedDict\n)R}bu."]  # a dict in place of a tensor
    for k, payload in enumerate(payloads):
        path = tmp_path / f"{k}.bin"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", payload)
        with pytest.raises(CheckpointError):
            TorchBinFile(path)
    assert not marker.exists()
