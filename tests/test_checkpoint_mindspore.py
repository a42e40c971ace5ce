"""MindSpore itself reads what accel writes: `mindspore.load_checkpoint` on our .ckpt (every dtype,
BFloat16, a tensor split over several Values) and MindSpore safetensors, byte-for-byte the files
`mindspore.save_checkpoint` writes; our readers on MindSpore's own files (CRC trailer included); and a
model loaded from a converted .ckpt on mindspore:cpu gives the HF original's logits on torch:cpu."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from accel.checkpoint import mindspore_ckpt, safetensors
from accel.checkpoint.convert import convert, open_named
from accel.checkpoint.mindspore_ckpt import MindSporeCkptFile
from accel.checkpoint.safetensors import MindSporeSafetensorsFile
from tests.test_checkpoint_convert import tiny_presets

ms = pytest.importorskip("mindspore")

BF16 = np.dtype(ml_dtypes.bfloat16)
rng = np.random.default_rng(0)
TENSORS = {
    "w.f32": rng.standard_normal((40, 30)).astype(np.float32),
    "w.bf16": rng.standard_normal((7, 300)).astype(BF16),
    "w.f16": rng.standard_normal((5, 3)).astype(np.float16),
    "w.f64": rng.standard_normal(4),
    "i.i64": np.arange(-3, 3, dtype=np.int64),
    "i.i32": np.arange(6, dtype=np.int32).reshape(2, 3),
    "i.u8": np.arange(5, dtype=np.uint8),
    "i.i8": np.arange(-2, 2, dtype=np.int8),
    "b.bool": np.array([True, False, True]),
    "s.scalar": np.array(2.5, np.float32),
}


def ms_tensor(a: np.ndarray):
    return ms.Tensor(a.astype(np.float32), dtype=ms.bfloat16) if a.dtype == BF16 else ms.Tensor(a)


def same(got: np.ndarray, want: np.ndarray) -> bool:
    got = got.view(BF16) if want.dtype == BF16 and got.dtype != BF16 else got
    return got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()


@pytest.mark.parametrize("slice_bytes", [mindspore_ckpt.SLICE_BYTES, 1000])
def test_load_checkpoint_reads_our_ckpt(tmp_path, slice_bytes):
    path = tmp_path / "ours.ckpt"
    mindspore_ckpt.write(path, TENSORS, slice_bytes=slice_bytes)
    if slice_bytes == 1000:  # w.f32 (4800 bytes) and w.bf16 (4200) went out as 5 Values each
        assert len(MindSporeCkptFile(path).layout["w.f32"][1]) == 5
        assert len(MindSporeCkptFile(path).layout["w.bf16"][1]) == 5
    loaded = ms.load_checkpoint(str(path))
    assert set(loaded) == set(TENSORS)
    for name, want in TENSORS.items():
        assert same(loaded[name].asnumpy(), want), name


def test_load_checkpoint_reads_our_mindspore_safetensors(tmp_path):
    path = tmp_path / "ours.safetensors"
    safetensors.write(path, TENSORS, {"format": "ms"})
    loaded = ms.load_checkpoint(str(path), format="safetensors")
    for name, want in TENSORS.items():
        assert same(loaded[name].asnumpy(), want), name


def test_our_ckpt_is_byte_identical_to_save_checkpoints(tmp_path, monkeypatch):
    from mindspore.train import serialization

    params = [{"name": k, "data": ms_tensor(v)} for k, v in TENSORS.items()]
    ms.save_checkpoint(params, str(tmp_path / "theirs.ckpt"))
    mindspore_ckpt.write(tmp_path / "ours.ckpt", TENSORS)
    assert (tmp_path / "ours.ckpt").read_bytes() == (tmp_path / "theirs.ckpt").read_bytes()
    # and with save_checkpoint's slicing of large tensors scaled down to 1 KiB per Value
    monkeypatch.setattr(serialization, "SLICE_SIZE", 1)
    ms.save_checkpoint(params, str(tmp_path / "theirs-split.ckpt"))
    mindspore_ckpt.write(tmp_path / "ours-split.ckpt", TENSORS, slice_bytes=1024)
    assert (tmp_path / "ours-split.ckpt").read_bytes() == (tmp_path / "theirs-split.ckpt").read_bytes()
    assert len(MindSporeCkptFile(tmp_path / "theirs-split.ckpt").layout["w.f32"][1]) == 5


def test_we_read_mindspores_own_files(tmp_path):
    params = [{"name": k, "data": ms_tensor(v)} for k, v in TENSORS.items()]
    ms.save_checkpoint(params, str(tmp_path / "crc.ckpt"), crc_check=True)
    ms.save_checkpoint(params, str(tmp_path / "m.safetensors"), format="safetensors")
    ckpt = MindSporeCkptFile(tmp_path / "crc.ckpt")
    assert ckpt.crc is not None
    ckpt.check_crc()
    st = MindSporeSafetensorsFile(tmp_path / "m.safetensors")
    assert st.metadata.get("format") == "ms"
    for name, want in TENSORS.items():
        assert same(ckpt.get(name), want) and same(st.get(name), want), name


def test_converted_bf16_checkpoint_loads_in_mindspore(tmp_path):
    from accel.models import from_preset

    model, params = from_preset("qwen2-tiny", seed=1)
    src = tmp_path / "model.safetensors"
    safetensors.write(src, params)
    out = tmp_path / "model.ckpt"
    convert(f"safetensors:{src}", f"mindspore-ckpt:{out}", model="qwen2", dtype="bfloat16")
    loaded = ms.load_checkpoint(str(out))
    got = loaded["model.layers.1.attention.wk.weight"].asnumpy()
    assert same(got, params["model.layers.1.self_attn.k_proj.weight"].astype(BF16))
    assert set(loaded) == set(MindSporeCkptFile(out).keys()) and len(loaded) == len(params)


@pytest.mark.parametrize("preset", tiny_presets())
def test_model_from_a_converted_ckpt_on_mindspore_matches_torch(tmp_path, preset):
    """HF safetensors -> MindFormers-named .ckpt -> read back under HF names -> mindspore:cpu, against
    the original weights on torch:cpu (float32)."""
    pytest.importorskip("accel.backends.mindspore")
    from accel.models import from_preset
    from accel.runtime import infer, place
    from accel.targets import open_target

    model, params = from_preset(preset, seed=5)
    src = tmp_path / "model.safetensors"
    safetensors.write(src, params)
    ckpt = tmp_path / "model.ckpt"
    convert(f"safetensors:{src}", f"mindspore-ckpt:{ckpt}", model=preset)
    assert not set(MindSporeCkptFile(ckpt).keys()) >= set(params)  # MindFormers names, not HF ones
    loaded = dict(open_named(f"mindspore-ckpt:{ckpt}", "hf", model=preset).items())
    assert loaded.keys() == params.keys()
    ms_cpu, torch_cpu = open_target("mindspore:cpu", policy={}), open_target("torch:cpu", policy={})
    ids = np.random.default_rng(3).integers(0, model.vocab_size, (1, 9))
    ours = infer(model, ms_cpu, place(ms_cpu, loaded, "float32"), ids)
    ref = infer(model, torch_cpu, place(torch_cpu, params, "float32"), ids)
    assert np.abs(ours - ref).max() <= 1e-4
