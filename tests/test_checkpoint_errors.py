"""Bad input to `accel convert`: every case is one line on stderr, exit code 2, and nothing left behind
where the output would have gone (no output, no temporary file or directory)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from accel.checkpoint import mindspore_ckpt, npz, safetensors, torch_bin
from accel.checkpoint.base import entries_of
from accel.cli import main
from accel.errors import CheckpointError
from tests.test_checkpoint_convert import synthetic


def varint(n: int) -> bytes:
    out = b""
    while True:
        out += bytes([(n & 0x7F) | (0x80 if n >> 7 else 0)])
        n >>= 7
        if not n:
            return out


def ckpt_value(tag: str, ttype: str, dims: list[int], content: bytes) -> bytes:
    """One Checkpoint.Value on the protobuf wire (independent of the writer under test)."""
    field = lambda k, b: bytes([k]) + varint(len(b)) + b  # noqa: E731
    tensor = b"".join(b"\x08" + varint(x) for x in dims) + field(0x12, ttype.encode()) + field(0x1A, content)
    return field(0x0A, field(0x0A, tag.encode()) + field(0x12, tensor))


def st_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def st_rewrite(path: Path, header_text: str, data: bytes) -> None:
    raw = header_text.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.fixture
def env(tmp_path):
    """A valid Baichuan checkpoint in every format, and an empty directory for outputs."""
    params = synthetic("baichuan")
    src = tmp_path / "src"
    src.mkdir()
    safetensors.write(src / "model.safetensors", params, {"format": "pt"})
    out = tmp_path / "out"
    out.mkdir()
    return tmp_path, src, out, params


def run_case(capsys, out: Path, args: list[str], *needles: str) -> str:
    before = sorted(out.rglob("*"))
    rc = main(["convert", *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("accel convert: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert sorted(out.rglob("*")) == before, "something was left behind"
    leftovers = [p for p in out.parent.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    return lines[0]


def to(out: Path, fmt: str = "mindspore-ckpt", name: str = "x.ckpt") -> list[str]:
    return ["--model", "baichuan", "--to", f"{fmt}:{out / name}"]


# --- safetensors --------------------------------------------------------------------------------------


def test_truncated_safetensors(env, capsys):
    tmp, src, out, _ = env
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    run_case(capsys, out, ["--from", f"safetensors:{f}", *to(out)], "model.safetensors", "truncated?")


def test_header_claims_more_bytes_than_exist(env, capsys):
    tmp, src, out, _ = env
    f = src / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(raw) * 3) + raw[8:])
    run_case(capsys, out, ["--from", f"safetensors:{f}", *to(out)], "header claims", "truncated?")


def test_safetensors_shape_disagrees_with_bytes(env, capsys):
    tmp, src, out, _ = env
    f = src / "model.safetensors"
    header, data = st_header(f)
    header["model.norm.weight"]["shape"] = [33]
    st_rewrite(f, json.dumps(header), data)
    run_case(capsys, out, ["--from", f"safetensors:{f}", *to(out)], "'model.norm.weight'", "needs 132 bytes",
             "gives 128")


def test_safetensors_duplicate_tensor_names(env, capsys):
    tmp, src, out, _ = env
    f = src / "model.safetensors"
    header, data = st_header(f)
    text = json.dumps(header)
    entry = json.dumps(header["model.norm.weight"])
    st_rewrite(f, text[:-1] + f', "model.norm.weight": {entry}}}', data)
    run_case(capsys, out, ["--from", f"safetensors:{f}", *to(out)], "'model.norm.weight' appears twice")


def test_safetensors_unknown_dtype(env, capsys):
    tmp, src, out, _ = env
    f = src / "model.safetensors"
    header, data = st_header(f)
    header["lm_head.weight"]["dtype"] = "F8_E4M3"
    st_rewrite(f, json.dumps(header), data)
    run_case(capsys, out, ["--from", f"safetensors:{f}", *to(out)], "unknown dtype 'F8_E4M3'")


def test_safetensors_overlapping_tensors(env, capsys):
    tmp, src, out, _ = env
    f = src / "model.safetensors"
    header, data = st_header(f)
    header["model.norm.weight"]["data_offsets"] = header["model.layers.0.input_layernorm.weight"]["data_offsets"]
    st_rewrite(f, json.dumps(header), data)
    run_case(capsys, out, ["--from", f"safetensors:{f}", *to(out)], "overlaps the tensor before it")


def test_empty_file(env, capsys):
    tmp, src, out, _ = env
    (src / "model.safetensors").write_bytes(b"")
    run_case(capsys, out, ["--from", f"safetensors:{src}", *to(out)], "too short")


def test_missing_source(env, capsys):
    tmp, src, out, _ = env
    run_case(capsys, out, ["--from", f"mindspore-ckpt:{tmp / 'nope.ckpt'}", *to(out)], "nope.ckpt: no such file")


# --- sharded HF directories ---------------------------------------------------------------------------


def sharded(src: Path, params: dict, shard_of: dict | None = None) -> None:
    (src / "model.safetensors").unlink()
    names = list(params)
    safetensors.write(src / "a.safetensors", {n: params[n] for n in names[:8]})
    safetensors.write(src / "b.safetensors", {n: params[n] for n in names[8:]})
    weight_map = {n: ("a.safetensors" if i < 8 else "b.safetensors") for i, n in enumerate(names)}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map | (shard_of or {})}))


def test_missing_shard(env, capsys):
    tmp, src, out, params = env
    sharded(src, params)
    (src / "b.safetensors").unlink()
    run_case(capsys, out, ["--from", f"safetensors:{src}", *to(out)], "shard 'b.safetensors' is missing")


def test_index_points_outside_the_directory(env, capsys):
    tmp, src, out, params = env
    shutil.copy(src / "model.safetensors", tmp / "elsewhere.safetensors")
    sharded(src, params, {"lm_head.weight": "../elsewhere.safetensors"})
    run_case(capsys, out, ["--from", f"safetensors:{src}", *to(out)], "'../elsewhere.safetensors' points outside")


def test_index_is_not_json(env, capsys):
    tmp, src, out, params = env
    sharded(src, params)
    (src / "model.safetensors.index.json").write_text("{weight_map: oops")
    run_case(capsys, out, ["--from", f"safetensors:{src}", *to(out)], "(a checkpoint index) is not valid JSON")


# --- torch-bin ----------------------------------------------------------------------------------------


class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_would_run_code(env, capsys):
    tmp, src, out, _ = env
    marker = tmp / "pwned"
    with zipfile.ZipFile(src / "pytorch_model.bin", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": Exploit(marker)}, protocol=2))
    (src / "model.safetensors").unlink()
    run_case(capsys, out, ["--from", f"torch-bin:{src}", *to(out)], "posix.system", "could run code")
    assert not marker.exists()


def _with_stride(tmp: Path, stride: tuple[int, int]) -> Path:
    """torch.save's file of one (1, 3) float32 tensor, its pickled stride (3, 1) replaced by `stride`."""
    import torch

    good, bad = tmp / "one.bin", tmp / "strided" / "pytorch_model.bin"
    bad.parent.mkdir()
    torch.save({"w": torch.arange(3, dtype=torch.float32).reshape(1, 3)}, good)

    def long1(n: int) -> bytes:
        return b"\x8a" + bytes([9]) + n.to_bytes(9, "little", signed=True)

    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for zi in zin.infolist():
            data = zin.read(zi)
            if zi.filename.endswith("data.pkl"):
                size_then_stride = b"K\x01K\x03\x86q\x08K\x03K\x01\x86"
                assert data.count(size_then_stride) == 1
                data = data.replace(size_then_stride, b"K\x01K\x03\x86q\x08" + long1(stride[0]) + long1(stride[1])
                                    + b"\x86")
            zout.writestr(zi, data)
    return bad


def test_torch_bin_strides_past_int64(env, capsys):
    """A stride of 2^70 on the size-1 dimension is never used: the tensor reads as saved (torch.load
    itself would overflow). On the size-3 dimension it is an error naming the tensor, from convert and
    verify alike."""
    tmp, src, out, _ = env
    harmless = _with_stride(tmp, (2**70, 1))
    assert main(["convert", "--from", f"torch-bin:{harmless}", "--to", f"npz:{out / 'w.npz'}"]) == 0
    np.testing.assert_array_equal(np.load(out / "w.npz")["w"], np.arange(3, dtype=np.float32).reshape(1, 3))
    (out / "w.npz").unlink()
    (out / "w.npz.manifest.json").unlink()
    capsys.readouterr()
    shutil.rmtree(harmless.parent)
    bad = _with_stride(tmp, (3, 2**70))
    run_case(capsys, out, ["--from", f"torch-bin:{bad}", *to(out)], "tensor 'w'", "reaches past its storage")
    assert main(["verify", f"torch-bin:{bad}", f"torch-bin:{bad}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tensor 'w'" in err[0] and "reaches past its storage" in err[0], err


def test_torch_bin_storage_smaller_than_its_tensor(env, capsys):
    tmp, src, out, params = env
    good = tmp / "good.bin"
    torch_bin.write_entries(good, entries_of(params))
    bad = src / "pytorch_model.bin"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for zi in zin.infolist():
            data = zin.read(zi)
            zout.writestr(zi.filename, data[:-4] if zi.filename == "archive/data/3" else data)
    run_case(capsys, out, ["--from", f"torch-bin:{bad}", *to(out)], "storage data/3 holds", "need")


def test_legacy_torch_save_format(env, capsys):
    import torch

    tmp, src, out, _ = env
    f = tmp / "legacy.bin"
    torch.save({"w": torch.ones(3)}, f, _use_new_zipfile_serialization=False)
    run_case(capsys, out, ["--from", f"torch-bin:{f}", *to(out)], "legacy", "re-save it")


def test_truncated_torch_bin(env, capsys):
    import torch

    tmp, src, out, _ = env
    f = tmp / "t.bin"
    torch.save({"w": torch.ones(300)}, f)
    f.write_bytes(f.read_bytes()[:700])
    run_case(capsys, out, ["--from", f"torch-bin:{f}", *to(out)], "t.bin: not a zip archive")


# --- MindSpore .ckpt ----------------------------------------------------------------------------------


def test_truncated_ckpt(env, capsys):
    tmp, src, out, params = env
    f = tmp / "m.ckpt"
    mindspore_ckpt.write(f, params)
    f.write_bytes(f.read_bytes()[:-100])
    run_case(capsys, out, ["--from", f"mindspore-ckpt:{f}", *to(out, "safetensors", "x.safetensors")],
             "m.ckpt", "corrupt")


def test_ckpt_dims_disagree_with_content(env, capsys):
    tmp, src, out, _ = env
    f = tmp / "m.ckpt"
    f.write_bytes(ckpt_value("lm_head.weight", "Float32", [4, 3], b"\0" * 44))
    run_case(capsys, out, ["--from", f"mindspore-ckpt:{f}", *to(out, "npz", "x.npz")],
             "'lm_head.weight' has shape [4, 3] of float32 (48 bytes) but 44 bytes of data")


def test_ckpt_duplicate_tag(env, capsys):
    tmp, src, out, _ = env
    f = tmp / "m.ckpt"
    one = ckpt_value("lm_head.weight", "Float32", [2], b"\0" * 8)
    f.write_bytes(one + ckpt_value("model.norm_out.weight", "Float32", [1], b"\0" * 4) + one)
    run_case(capsys, out, ["--from", f"mindspore-ckpt:{f}", *to(out, "npz", "x.npz")],
             "'lm_head.weight' appears twice")


def test_ckpt_unknown_tensor_type(env, capsys):
    tmp, src, out, _ = env
    f = tmp / "m.ckpt"
    f.write_bytes(ckpt_value("lm_head.weight", "Float8E4M3", [2], b"\0" * 2))
    run_case(capsys, out, ["--from", f"mindspore-ckpt:{f}", *to(out, "npz", "x.npz")],
             "unknown tensor_type 'Float8E4M3'")


def test_ckpt_split_pieces_disagree(env, capsys):
    tmp, src, out, _ = env
    f = tmp / "m.ckpt"
    f.write_bytes(ckpt_value("w", "Float32", [4], b"\0" * 8) + ckpt_value("w", "Float32", [5], b"\0" * 8))
    run_case(capsys, out, ["--from", f"mindspore-ckpt:{f}", *to(out, "npz", "x.npz")],
             "pieces of tensor 'w' disagree")


def test_ckpt_crc_mismatch(env, capsys):
    tmp, src, out, _ = env
    f = tmp / "m.ckpt"
    body = ckpt_value("lm_head.weight", "Float32", [2], b"\0" * 8)
    f.write_bytes(body + b"crc_num" + (12345).to_bytes(10, "big"))
    run_case(capsys, out, ["--from", f"mindspore-ckpt:{f}", *to(out, "npz", "x.npz")], "CRC-32", "damaged")


def test_ckpt_missing_part_of_a_fused_tensor(env, capsys):
    tmp, src, out, params = env
    ms = tmp / "m.ckpt"
    assert main(["convert", "--model", "baichuan", "--from", f"safetensors:{src}", "--to", f"mindspore-ckpt:{ms}"]) == 0
    capsys.readouterr()
    reader = mindspore_ckpt.MindSporeCkptFile(ms)
    mindspore_ckpt.write(ms, {k: reader.get(k) for k in reader.keys() if k != "model.layers.1.attention.wk.weight"})
    run_case(capsys, out, ["--from", f"mindspore-ckpt:{ms}", *to(out, "safetensors", "x.safetensors")],
             "cannot rebuild model.layers.1.self_attn.W_pack.weight", "wk.weight is missing")


# --- npz, MindSpore safetensors -----------------------------------------------------------------------


def test_npz_with_a_pickled_object_array(env, capsys):
    tmp, src, out, _ = env
    f = tmp / "x.npz"
    np.savez(f, w=np.array([{"a": 1}], dtype=object))
    run_case(capsys, out, ["--from", f"npz:{f}", *to(out)], "array 'w'", "unsupported array type '|O'")


def test_truncated_npz(env, capsys):
    tmp, src, out, params = env
    f = tmp / "x.npz"
    npz.write(f, params)
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    run_case(capsys, out, ["--from", f"npz:{f}", *to(out)], "x.npz: not a zip archive")


def test_mindspore_safetensors_int4(env, capsys):
    tmp, src, out, _ = env
    f = tmp / "q.safetensors"
    safetensors.write(f, {"w": np.zeros(4, np.int8)}, {"format": "ms", "w": "Int4"})
    run_case(capsys, out, ["--from", f"mindspore-safetensors:{f}", *to(out)], "'w' is stored as MindSpore 'Int4'")


# --- key maps and options -----------------------------------------------------------------------------


def test_key_unknown_to_the_key_map(env, capsys):
    tmp, src, out, params = env
    safetensors.write(src / "model.safetensors", params | {"model.layers.0.self_attn.rotary.cos": np.ones(2)})
    run_case(capsys, out, ["--from", f"safetensors:{src}", *to(out)],
             "'model.layers.0.self_attn.rotary.cos' is not in the baichuan key map", "--allow-unmapped")
    assert main(["convert", "--from", f"safetensors:{src}", *to(out), "--allow-unmapped"]) == 0


def test_config_disagrees_with_the_fused_rows(env, capsys):
    tmp, src, out, _ = env
    cfg = tmp / "config.json"
    cfg.write_text(json.dumps({"model_type": "baichuan", "hidden_size": 24, "num_attention_heads": 2}))
    run_case(capsys, out, ["--from", f"safetensors:{src}", *to(out), "--config", str(cfg)],
             "W_pack.weight has 96 rows but the config gives q=24+kv=24+kv=24 = 72")


def test_names_cannot_be_mapped_without_a_family(env, capsys):
    tmp, src, out, _ = env
    run_case(capsys, out, ["--from", f"safetensors:{src}", "--to", f"mindspore-ckpt:{out / 'x.ckpt'}"],
             "without the model family", "--model")


def test_unknown_format(env, capsys):
    tmp, src, out, _ = env
    run_case(capsys, out, ["--from", f"gguf:{src}", *to(out)], "unknown checkpoint format 'gguf'")


def test_bad_max_shard_size(env, capsys):
    tmp, src, out, _ = env
    run_case(capsys, out, ["--from", f"safetensors:{src}", *to(out, "safetensors", "dir"),
                           "--max-shard-size", "2 lots"], "is not a size")


# --- where the output goes ----------------------------------------------------------------------------


def test_output_would_overwrite_the_source(env, capsys):
    tmp, src, out, _ = env
    before = (src / "model.safetensors").read_bytes()
    run_case(capsys, out, ["--from", f"safetensors:{src}", "--to", f"safetensors:{src / 'model.safetensors'}"],
             "is part of the source")
    assert (src / "model.safetensors").read_bytes() == before
    # the config the conversion reads beside the weights, and a file whose name the manifest would take
    (src / "x.npz.manifest.json").write_text("{}")
    (src / "config.json").write_text('{"architectures": []}')
    files = {f: ((src / f).read_bytes(), (src / f).stat().st_mtime_ns) for f in ("config.json", "x.npz.manifest.json")}
    run_case(capsys, out, ["--from", f"safetensors:{src}", "--to", f"npz:{src / 'config.json'}"],
             "is part of the source")
    run_case(capsys, out, ["--from", f"safetensors:{src}", "--to", f"npz:{src / 'x.npz'}"],
             "x.npz.manifest.json is part of the source")
    run_case(capsys, out, ["--from", f"safetensors:{src}", "--to", f"npz:{src / 'config.json'}", "--overwrite"],
             "is part of the source")
    assert {f: ((src / f).read_bytes(), (src / f).stat().st_mtime_ns) for f in files} == files
    assert not (src / "x.npz").exists() and not [p for p in src.iterdir() if p.name.endswith(".tmp")]
    # an existing output is replaced only with --overwrite
    (out / "y.npz").write_bytes(b"mine")
    run_case(capsys, out, ["--from", f"safetensors:{src}", "--to", f"npz:{out / 'y.npz'}"], "already exists",
             "--overwrite")
    assert (out / "y.npz").read_bytes() == b"mine"
    assert main(["convert", "--from", f"safetensors:{src}", "--to", f"npz:{out / 'y.npz'}", "--overwrite"]) == 0
    assert (out / "y.npz").read_bytes() != b"mine"


def test_infer_never_writes_over_what_it_reads_and_needs_overwrite(tmp_path, capsys):
    from tests.conftest import save_hf_qwen2

    directory = save_hf_qwen2(tmp_path / "ck")
    (directory / "weights.npy").symlink_to(directory / "model.safetensors")
    capsys.readouterr()
    files = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in directory.iterdir()}
    infer = ["infer", "--model", str(directory), "--input-ids", "1,2", "--overwrite", "--out"]
    for out in ("config.json", "model.safetensors", "weights.npy"):
        assert main([*infer, str(directory / out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is a file this command reads" in err[0], err
    assert {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in directory.iterdir()} == files
    (tmp_path / "o.npy").write_bytes(b"mine")
    assert main(infer[:-2] + ["--out", str(tmp_path / "o.npy")]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "o.npy").read_bytes() == b"mine"
    assert main([*infer, str(tmp_path / "o.npy")]) == 0
    assert np.load(tmp_path / "o.npy").shape[:2] == (1, 2)


def test_a_stale_temporary_of_a_dead_process_is_swept(env, capsys):
    import subprocess

    tmp, src, out, _ = env
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is free now
    stale = out / f".z.npz.{dead.pid}.abc.tmp"
    stale.mkdir()
    (stale / "z.npz").write_bytes(b"half")
    running = subprocess.Popen(["sleep", "60"])  # another conversion, still running: its temporary is kept
    live = out / f".z.npz.{running.pid}.def.tmp"
    live.mkdir()
    try:
        assert main(["convert", "--from", f"safetensors:{src}", "--to", f"npz:{out / 'z.npz'}"]) == 0
    finally:
        running.kill()
        running.wait()
    assert not stale.exists() and live.exists()


def test_sharded_output_directory_exists(env, capsys):
    tmp, src, out, _ = env
    (out / "hf").mkdir()
    run_case(capsys, out, ["--from", f"safetensors:{src}", "--to", f"torch-bin:{out / 'hf'}"], "already exists")


def test_output_parent_is_a_file(env, capsys):
    tmp, src, out, _ = env
    (out / "file").write_text("x")
    run_case(capsys, out, ["--from", f"safetensors:{src}", *to(out / "file")], "cannot write", "Not a directory")


def test_output_under_proc(env, capsys):
    tmp, src, out, _ = env
    run_case(capsys, out, ["--from", f"safetensors:{src}", "--model", "baichuan", "--to",
                           "mindspore-ckpt:/proc/accel-convert-test.ckpt"],
             "cannot write /proc/accel-convert-test.ckpt")
    assert not Path("/proc/accel-convert-test.ckpt").exists()


@pytest.mark.parametrize("fmt,name", [("safetensors", "x.safetensors"), ("npz", "x.npz"), ("mindspore-ckpt", "x.ckpt"),
                                      ("torch-bin", "x.bin")])
def test_an_empty_tensor_with_a_dimension_past_int64_is_refused_for_every_writer(env, capsys, fmt, name):
    """numel 0, so no size check catches it: each writer would write a header no reader takes."""
    tmp, src, out, _ = env
    header = json.dumps({"x": {"dtype": "F32", "shape": [2**64 + 5, 0], "data_offsets": [0, 0]}}).encode()
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    run_case(capsys, out, ["--from", f"safetensors:{src}", "--to", f"{fmt}:{out / name}"],
             "shape", "integers in [0, 2^63)")


def test_full_disk(env):
    """RLIMIT_FSIZE makes writes past 64 KiB fail with EFBIG, for root too (CPython ignores SIGXFSZ)."""
    tmp, src, out, params = env
    big = {f"model.layers.{i}.mlp.up_proj.weight": np.ones((256, 256), np.float32) for i in range(4)}
    safetensors.write(src / "model.safetensors", params | big)
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)); "
            "from accel.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "convert", "--from", f"safetensors:{src}", *to(out)],
                       capture_output=True, text=True, timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "cannot write" in lines[0] and "File too large" in lines[0]
    assert list(out.iterdir()) == []


def test_disk_full_while_a_worker_copies(env, capsys, monkeypatch):
    """The disk fills while a worker writes a tensor's bytes into the output: one line naming the output
    and the cause, the other workers stop, nothing is left behind, no file descriptor leaks."""
    import errno

    tmp, src, out, params = env
    safetensors.write(src / "model.safetensors", params | {"lm_head.weight": np.ones((64, 160_000), np.float32)})
    real, writes = os.pwrite, []

    def pwrite(fd, data, offset):
        writes.append(offset)
        if len(writes) == 30:  # inside lm_head's 41 MB, 1 MiB at a time
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    fds = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "pwrite", pwrite)
    run_case(capsys, out, ["--from", f"safetensors:{src}", *to(out)],
             f"cannot write {out / 'x.ckpt'}: No space left on device")
    assert 30 <= len(writes) < 60
    assert len(os.listdir("/proc/self/fd")) == fds


def test_failure_in_the_middle_of_a_cast_tensor(env, capsys, monkeypatch):
    """A read that fails after the writer and the hashing threads have started (a tensor cast chunk by
    chunk): the error surfaces, the threads stop, and the half-written output is removed."""
    from accel.checkpoint.base import FileReader

    tmp, src, out, params = env
    safetensors.write(src / "model.safetensors", params | {"lm_head.weight": np.ones((64, 160_000), np.float32)})
    calls, view = [], FileReader._view

    def failing(self, n, offset):
        calls.append(n)
        if len(calls) == 22:  # 20 small tensors, then the second 16 MiB chunk of the 41 MB lm_head
            raise CheckpointError(f"{self.path}: ended early while reading; was it truncated while open?")
        return view(self, n, offset)

    monkeypatch.setattr(FileReader, "_view", failing)
    run_case(capsys, out, ["--from", f"safetensors:{src}", "--dtype", "float16", *to(out)],
             "ended early while reading")
    assert len(calls) == 22 and calls[-1] == 16 << 20


def test_source_truncated_while_copying(env, capsys, monkeypatch):
    """The source file cut short while a worker copies a tensor out of it (no cast: the bytes go file to
    file): the short read is an error naming the file, the other workers stop, nothing is left behind,
    no file descriptor leaks."""
    tmp, src, out, params = env
    f = src / "model.safetensors"
    safetensors.write(f, params | {"lm_head.weight": np.ones((64, 160_000), np.float32)})
    size, real, reads = f.stat().st_size, os.preadv, []

    def preadv(fd, buffers, offset):
        reads.append(offset)
        if len(reads) == 30:  # inside lm_head's 41 MB
            os.truncate(f, size // 2)
        return real(fd, buffers, offset)

    fds = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "preadv", preadv)
    run_case(capsys, out, ["--from", f"safetensors:{src}", *to(out)],
             f"{f}: ended early while reading; was it truncated while open?")
    assert 30 < len(reads) < 60  # stopped at the cut, not after reading every tensor
    assert len(os.listdir("/proc/self/fd")) == fds  # the source closed, the workers' descriptors too


@pytest.mark.parametrize("edit, field", [
    ('"num_attention_heads": 0', "num_attention_heads"),
    ('"num_hidden_layers": "2"', "num_hidden_layers"),
    ('"num_hidden_layers": 1e9', "num_hidden_layers"),
    ('"num_hidden_layers": null', "num_layers comes out as 'None'"),
    ('"num_attention_heads": Infinity', "num_attention_heads"),
    ('"rope_scaling": "linear"', "rope_scaling"),
    ('"rms_norm_eps": -1', "rms_norm_eps"),
    ('"tie_word_embeddings": "no"', "tie_word_embeddings"),
    ('"num_key_value_heads": 3', "key/value heads"),
    ('"hidden_size": 66', "not a multiple of num_attention_heads"),
    ('"model_type": 7', "model_type"),
    ('"vocab_size": 1' + "0" * 5000, "not valid JSON"),
    ('"x": ' + "[" * 100000 + "]" * 100000, "not valid JSON"),
])
def test_config_fields_of_the_wrong_type_or_range_are_named(tmp_path, capsys, edit, field):
    """config.json fields no family accepts: a one-line error naming the field, before anything is built
    (not a ZeroDivisionError, TypeError, AttributeError, RecursionError or a hang from inside)."""
    from accel.cli import main
    from tests.conftest import save_hf_qwen2

    directory = save_hf_qwen2(tmp_path / "ck")
    capsys.readouterr()  # transformers' progress bar
    text = (directory / "config.json").read_text()
    key = edit.split(":")[0]
    lines = [line for line in text.rstrip().rstrip("}").rstrip().rstrip(",").splitlines()
             if not line.strip().startswith(key)]
    (directory / "config.json").write_text("\n".join(lines) + ",\n  " + edit + "\n}\n")
    code = main(["infer", "--model", str(directory), "--input-ids", "1,2", "--out", str(tmp_path / "o.npy")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and field in err, err[:500]
    assert not (tmp_path / "o.npy").exists()


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_terminated_convert_leaves_nothing_behind(tmp_path, signame):
    """SIGTERM/SIGHUP in the middle of writing: the temporary output is removed, nothing else appears,
    and the exit code says which signal."""
    import signal
    import subprocess
    import sys
    import time

    from safetensors.numpy import save_file

    src = tmp_path / "big.safetensors"
    rng = np.random.default_rng(0)
    save_file({f"w{i}": rng.standard_normal((1024, 1024), dtype=np.float32) for i in range(96)}, str(src))
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "accel.cli", "convert", "--from", f"safetensors:{src}",
                             "--to", f"mindspore-ckpt:{out / 'big.ckpt'}", "--keymap", "keep"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not list(out.glob(".big.ckpt.*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the conversion ended before its temporary output appeared"
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + getattr(signal, signame), err
    assert f"terminated by {signame}" in err and "Traceback" not in err
    assert list(out.iterdir()) == []


def test_the_ckpt_writer_refuses_a_size_its_int64_fields_cannot_hold():
    from accel.checkpoint.mindspore_ckpt import varint
    from accel.errors import CheckpointError

    assert varint(300) == b"\xac\x02" and varint((1 << 63) - 1)[-1] == 0x7F
    for n in [-1, 1 << 63, (1 << 64) + 5]:
        with pytest.raises(CheckpointError, match="does not fit"):
            varint(n)


@pytest.mark.parametrize("fmt", ["torch-bin", "npz", "safetensors", "mindspore-ckpt"])
def test_a_fifo_source_is_refused_not_waited_on(tmp_path, capsys, fmt):
    fifo = tmp_path / "weights.in"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    out.mkdir()
    run_case(capsys, out, ["--from", f"{fmt}:{fifo}", "--to", f"npz:{out / 'x.npz'}"], "is not a regular file")


def test_a_hub_cache_snapshot_loads_and_a_link_elsewhere_is_refused(tmp_path):
    """transformers' cache: models--org--name/snapshots/REV/ holds links into ../../blobs/."""
    from accel.checkpoint.base import entries_of
    from accel.checkpoint.hf import write_directory
    from accel.errors import CheckpointError
    from accel.models import from_preset, from_pretrained
    from tests.conftest import save_hf_qwen2

    model, params = from_preset("qwen2-tiny")
    plain = tmp_path / "plain"
    plain.mkdir()
    save_hf_qwen2(tmp_path / "cfg")
    write_directory(plain, "safetensors", entries_of(params), 200_000)  # a few shards and an index
    (plain / "config.json").write_text((tmp_path / "cfg" / "config.json").read_text())
    root = tmp_path / "hub" / "models--team--qwen2"
    blobs, snapshot = root / "blobs", root / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(plain.iterdir())):
        os.replace(f, blobs / f"blob{i}")
        (snapshot / f.name).symlink_to(f"../../blobs/blob{i}")
    assert len(list(snapshot.glob("*.safetensors"))) > 1
    _, loaded = from_pretrained(snapshot)
    assert all(np.array_equal(loaded[k], params[k]) for k in params)

    shard = sorted(snapshot.glob("model-*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(shard.resolve(), outside)
    shard.unlink()
    shard.symlink_to(outside)
    with pytest.raises(CheckpointError, match="points outside the checkpoint directory"):
        from_pretrained(snapshot)


def test_a_torch_bin_record_that_inflates_is_refused_unread(tmp_path):
    """A deflated byteorder record that declares 64 MB (a zip bomb's shape): refused from its declared
    size, before anything is inflated."""
    import pickle
    import tracemalloc
    import zipfile

    from accel.checkpoint.torch_bin import TorchBinFile
    from accel.errors import CheckpointError

    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        with z.open("archive/byteorder", "w") as f:
            zeros = bytes(1 << 20)
            for _ in range(64):
                f.write(zeros)
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    with pytest.raises(CheckpointError, match="byteorder record declares"):
        TorchBinFile(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20


def test_a_convert_config_with_impossible_sizes_is_named(env, capsys):
    tmp, src, out, _ = env
    for text, words in [('{"num_attention_heads": Infinity}', "num_attention_heads"),
                        ('{"hidden_size": "64"}', "hidden_size"), ("[" * 100000, "is not valid JSON (nested deeper")]:
        bad = tmp / "bad.json"
        bad.write_text(text)
        run_case(capsys, out, ["--from", f"safetensors:{src}", "--config", str(bad), *to(out)], words)
