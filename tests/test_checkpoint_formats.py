"""Each format's reader and writer against the reference implementation of that format: the safetensors
library, torch.save/torch.load(weights_only=True), np.savez/np.load, and MindSpore's protobuf rules
(packed dims, unknown fields, scalars). MindSpore's own loader is in test_checkpoint_mindspore.py."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from accel.checkpoint import mindspore_ckpt, npz, safetensors, torch_bin
from accel.checkpoint.base import entries_of
from accel.checkpoint.hf import HFCheckpoint
from accel.checkpoint.mindspore_ckpt import MindSporeCkptFile
from accel.checkpoint.npz import NpzFile
from accel.checkpoint.safetensors import SafetensorsFile
from accel.checkpoint.torch_bin import TorchBinFile
from accel.errors import CheckpointError
from tests.test_checkpoint_errors import ckpt_value, varint

BF16 = np.dtype(ml_dtypes.bfloat16)
rng = np.random.default_rng(0)
TENSORS = {
    "f32": rng.standard_normal((6, 5)).astype(np.float32),
    "bf16": rng.standard_normal((3, 7)).astype(BF16),
    "f16": rng.standard_normal(9).astype(np.float16),
    "f64": rng.standard_normal((2, 2)),
    "i64": np.arange(-4, 4, dtype=np.int64),
    "i32": np.arange(6, dtype=np.int32),
    "i16": np.arange(3, dtype=np.int16),
    "i8": np.arange(-3, 3, dtype=np.int8),
    "u8": np.arange(7, dtype=np.uint8),
    "bool": np.array([[True], [False]]),
    "scalar": np.array(7.25, np.float32),
    "empty": np.zeros((0, 3), np.float32),
}


def same(got: np.ndarray, want: np.ndarray) -> bool:
    # by name: once MindSpore is imported, libraries may hand out its own NumPy bfloat16 type
    return got.dtype.name == want.dtype.name and got.shape == want.shape and got.tobytes() == want.tobytes()


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(BF16) if t.dtype == torch.bfloat16 else t.numpy()


def test_safetensors_both_ways(tmp_path):
    safetensors.write(tmp_path / "ours.safetensors", TENSORS, {"format": "pt"})
    theirs = load_file(tmp_path / "ours.safetensors")
    assert all(same(theirs[k], v) for k, v in TENSORS.items())
    save_file(TENSORS, tmp_path / "theirs.safetensors", metadata={"format": "np"})
    ours = SafetensorsFile(tmp_path / "theirs.safetensors")
    assert ours.metadata == {"format": "np"} and all(same(ours.get(k), v) for k, v in TENSORS.items())


@pytest.mark.parametrize("mmap", [False, True])
def test_torch_load_reads_our_bin(tmp_path, mmap):
    torch_bin.write_entries(tmp_path / "ours.bin", entries_of(TENSORS))
    state = torch.load(tmp_path / "ours.bin", weights_only=True, mmap=mmap)
    assert list(state) == list(TENSORS)
    for k, v in TENSORS.items():
        assert same(to_numpy(state[k]), v), k


def test_we_read_what_torch_save_writes(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).to(torch.bfloat16)
    torch.save(module.state_dict(), tmp_path / "sd.bin")  # an OrderedDict carrying _metadata
    r = TorchBinFile(tmp_path / "sd.bin")
    for k, v in module.state_dict().items():
        assert same(r.get(k), to_numpy(v)), k
    base = torch.arange(20.0).reshape(4, 5)
    torch.save({"view": base[:, 1:3], "row": base[2], "tied": base, "param": torch.nn.Parameter(torch.ones(2)),
                "b": torch.tensor([True, False])}, tmp_path / "views.bin")
    r = TorchBinFile(tmp_path / "views.bin")
    assert same(r.get("view"), base[:, 1:3].numpy().copy())  # non-contiguous, gathered
    assert same(r.get("row"), base[2].numpy().copy())  # an offset into the shared storage
    assert same(r.get("tied"), base.numpy()) and same(r.get("param"), np.ones(2, np.float32))
    assert b"".join(r.chunks("view", 4, 20, size=3)) == base[:, 1:3].numpy().tobytes()[4:20]


def test_expanded_views_are_refused(tmp_path):
    torch.save({"w": torch.ones(1).expand(1000)}, tmp_path / "e.bin")
    with pytest.raises(CheckpointError, match="repeats elements of its storage"):
        TorchBinFile(tmp_path / "e.bin")


def test_npz_both_ways(tmp_path):
    npz.write(tmp_path / "ours.npz", TENSORS)
    with np.load(tmp_path / "ours.npz") as z:
        for k, v in TENSORS.items():
            got = z[k].view(BF16) if v.dtype == BF16 else z[k]  # NumPy writes bfloat16 as '<V2' itself
            assert same(got, v), k
    no_bf16 = {k: v for k, v in TENSORS.items() if v.dtype != BF16}
    np.savez_compressed(tmp_path / "c.npz", **no_bf16)
    np.savez(tmp_path / "f.npz", bf16=TENSORS["bf16"], fortran=np.asfortranarray(TENSORS["f32"]))
    c, f = NpzFile(tmp_path / "c.npz"), NpzFile(tmp_path / "f.npz")
    assert all(same(c.get(k), v) for k, v in no_bf16.items())
    assert same(f.get("bf16"), TENSORS["bf16"]) and same(f.get("fortran"), TENSORS["f32"])


def test_ckpt_wire_variants(tmp_path):
    """Packed dims, unknown fields (skipped, as protobuf does), dims [0] as a scalar, split Values joined."""
    packed = varint(2) + varint(3)
    tensor = b"\x0a" + varint(len(packed)) + packed + b"\x12\x07Float32\x1a\x18" + bytes(range(24))
    tensor += b"\x28\x05" + b"\x35\x01\x02\x03\x04"  # unknown varint and fixed32 fields
    value = b"\x0a\x01a\x12" + varint(len(tensor)) + tensor + b"\x22\x02zz"  # and an unknown string field
    data = b"\x0a" + varint(len(value)) + value
    data += ckpt_value("s", "Int32", [0], b"\x07\0\0\0")
    data += ckpt_value("w", "Int8", [5], b"\1\2") + ckpt_value("w", "Int8", [5], b"\3\4\5")
    (tmp_path / "v.ckpt").write_bytes(data)
    r = MindSporeCkptFile(tmp_path / "v.ckpt")
    assert same(r.get("a"), np.frombuffer(bytes(range(24)), np.float32).reshape(2, 3))
    assert same(r.get("s"), np.array(7, np.int32)) and same(r.get("w"), np.arange(1, 6, dtype=np.int8))
    assert b"".join(r.chunks("w", 1, 4)) == b"\2\3\4"  # across the two Values


def test_ckpt_round_trip_every_dtype(tmp_path):
    mindspore_ckpt.write(tmp_path / "x.ckpt", TENSORS, slice_bytes=64)
    r = MindSporeCkptFile(tmp_path / "x.ckpt")
    assert list(r.keys()) == list(TENSORS) and all(same(r.get(k), v) for k, v in TENSORS.items())


@pytest.mark.parametrize("write", [lambda p, e: mindspore_ckpt.write_entries(p, e, slice_bytes=40),
                                   safetensors.write_entries], ids=["ckpt", "safetensors"])
def test_deferred_spans_land_where_the_writer_left_room(tmp_path, write):
    """A writer hands each span to its `defer` and leaves room for it (here tensors are also split over
    several .ckpt Values): the bytes copied in afterwards, in any order and after the writer closed its
    file, give the file the writer makes when it copies them on the spot."""
    import os
    from dataclasses import replace

    from accel.checkpoint.base import Entry, transfer

    safetensors.write(tmp_path / "src.safetensors", TENSORS)
    reader = SafetensorsFile(tmp_path / "src.safetensors")
    pending = []

    def defer(span, begin, end, fd, at):
        pending.append((span, begin, end, os.dup(fd), at))

    def entries(deferred):
        spans = lambda n: [replace(s, defer=defer) if deferred else s for s in reader.windows(n, size=16)]  # noqa: E731
        return [Entry(n, reader.info(n), lambda n=n: reader.chunks(n), lambda n=n: spans(n)) for n in reader.keys()]

    write(tmp_path / "now", entries(False))
    write(tmp_path / "later", entries(True))
    assert len(pending) > len(TENSORS)  # spans of 16 bytes, some cut again at the Values' boundaries
    seen = []
    for span, begin, end, fd, at in reversed(pending):
        transfer(span, begin, end, fd, at, memoryview(bytearray(7)), lambda b: seen.append(bytes(b)))
        os.close(fd)
    assert (tmp_path / "later").read_bytes() == (tmp_path / "now").read_bytes()
    assert sum(map(len, seen)) == sum(a.nbytes for a in TENSORS.values())  # every byte shown on its way


@pytest.mark.parametrize("fmt", ["safetensors", "torch-bin"])
def test_hf_directory_sharded(tmp_path, fmt):
    from accel.checkpoint.hf import write_directory

    d = tmp_path / "hf"
    d.mkdir()
    tensors = {k: v for k, v in TENSORS.items() if k not in ("scalar", "empty")}
    files = write_directory(d, fmt, entries_of(tensors), max_bytes=100)
    assert len(set(files.values())) > 2
    r = HFCheckpoint(d)
    assert list(r.keys()) == list(tensors) and all(same(r.get(k), v) for k, v in tensors.items())
    assert r.file_of("i8") == files["i8"]


def test_a_span_without_defer_is_copied_where_the_writer_is(tmp_path):
    # bytes 7..-3 of a span of several chunks, after what the writer has buffered, and the writer goes on
    # after them
    from accel.checkpoint import base

    src = tmp_path / "src.bin"
    payload = np.random.default_rng(0).integers(0, 256, 3 * base.CHUNK + 12345, dtype=np.uint8).tobytes()
    src.write_bytes(b"head" + payload)
    with open(src, "rb") as f, open(tmp_path / "out.bin", "wb") as out:
        out.write(b"x")
        base.put(out, base.Span(f.fileno(), 4, len(payload)), 7, len(payload) - 3)
        out.write(b"y")
    assert (tmp_path / "out.bin").read_bytes() == b"x" + payload[7:-3] + b"y"
