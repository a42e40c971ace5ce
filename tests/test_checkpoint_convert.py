"""`accel convert` / `accel verify`: round trips HF <-> MindFormers for every family, fused q/k/v blocks
split by the config's head counts, dtype casts rounding as ml_dtypes does, manifests, sharded outputs,
and the source left untouched. Expected values come from NumPy slicing and independent readers (the
safetensors library, torch.load), never from the code under test."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from accel.checkpoint import mindspore_ckpt, safetensors
from accel.checkpoint.convert import convert
from accel.checkpoint.hf import HFCheckpoint
from accel.checkpoint.mindspore_ckpt import MindSporeCkptFile
from accel.checkpoint.safetensors import SafetensorsFile
from accel.cli import main

BF16 = np.dtype(ml_dtypes.bfloat16)

# Tiny checkpoints with each family's original names and fused layouts (notes: chatglm.md §1, qwen1.md §1,
# baichuan.md §1): h hidden, H heads, d head dim, G kv groups, F ffn, V vocab.
h, H, d, G, F, V = 32, 4, 8, 2, 40, 64
CONFIGS = {
    "chatglm": {"model_type": "chatglm", "hidden_size": h, "num_attention_heads": H, "kv_channels": d,
                "multi_query_attention": True, "multi_query_group_num": G, "ffn_hidden_size": F,
                "padded_vocab_size": V, "num_layers": 2},
    "qwen": {"model_type": "qwen", "hidden_size": h, "num_attention_heads": H, "kv_channels": d,
             "intermediate_size": 2 * F, "vocab_size": V, "num_hidden_layers": 2},
    "baichuan": {"model_type": "baichuan", "hidden_size": h, "num_attention_heads": H, "intermediate_size": F,
                 "vocab_size": V, "num_hidden_layers": 2},
}


def synthetic(family: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes: dict[str, tuple[int, ...]] = {}
    if family == "chatglm":
        shapes["transformer.embedding.word_embeddings.weight"] = (V, h)
        shapes["transformer.rotary_pos_emb.inv_freq"] = (d // 4,)
        for i in range(2):
            p = f"transformer.encoder.layers.{i}."
            shapes |= {p + "input_layernorm.weight": (h,),
                       p + "self_attention.query_key_value.weight": (H * d + 2 * G * d, h),
                       p + "self_attention.query_key_value.bias": (H * d + 2 * G * d,),
                       p + "self_attention.dense.weight": (h, H * d), p + "post_attention_layernorm.weight": (h,),
                       p + "mlp.dense_h_to_4h.weight": (2 * F, h), p + "mlp.dense_4h_to_h.weight": (h, F)}
        shapes |= {"transformer.encoder.final_layernorm.weight": (h,), "transformer.output_layer.weight": (V, h)}
    elif family == "qwen":
        shapes["transformer.wte.weight"] = (V, h)
        for i in range(2):
            p = f"transformer.h.{i}."
            shapes |= {p + "ln_1.weight": (h,), p + "attn.c_attn.weight": (3 * H * d, h),
                       p + "attn.c_attn.bias": (3 * H * d,), p + "attn.c_proj.weight": (h, H * d),
                       p + "ln_2.weight": (h,), p + "mlp.w1.weight": (F, h), p + "mlp.w2.weight": (F, h),
                       p + "mlp.c_proj.weight": (h, F)}
        shapes |= {"transformer.ln_f.weight": (h,), "lm_head.weight": (V, h)}
    elif family == "baichuan":
        shapes["model.embed_tokens.weight"] = (V, h)
        for i in range(2):
            p = f"model.layers.{i}."
            shapes |= {p + "input_layernorm.weight": (h,), p + "self_attn.W_pack.weight": (3 * h, h),
                       p + "self_attn.o_proj.weight": (h, h), p + "post_attention_layernorm.weight": (h,),
                       p + "mlp.gate_proj.weight": (F, h), p + "mlp.up_proj.weight": (F, h),
                       p + "mlp.down_proj.weight": (h, F)}
        shapes |= {"model.norm.weight": (h,), "lm_head.weight": (V, h)}
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def preset_params(name: str) -> tuple[str, dict[str, np.ndarray]]:
    from accel.models import presets

    model = presets()[name].preset(name)
    return model.model_type, model.init_params(seed=3)


def tiny_presets() -> list[str]:
    from accel.models import presets

    return sorted(n for n in presets() if n.endswith("-tiny"))


def cli(*args: str) -> int:
    return main(list(args))


def write_hf(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    safetensors.write(path, tensors, {"format": "pt"})  # the metadata save_pretrained writes, as our writer does
    return path


@pytest.mark.parametrize("family", ["chatglm", "qwen", "baichuan"])
def test_synthetic_round_trip_and_split_blocks(tmp_path, family):
    params = synthetic(family)
    src = write_hf(tmp_path / "model.safetensors", params)
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS[family]))
    ms = tmp_path / "ms.ckpt"
    assert cli("convert", "--from", f"safetensors:{src}", "--to", f"mindspore-ckpt:{ms}") == 0
    ckpt = MindSporeCkptFile(ms)
    fused, (wq, wk, wv) = {
        "chatglm": ("transformer.encoder.layers.1.self_attention.query_key_value.weight",
                    [f"transformer.encoder.layers.1.self_attention.w{x}.weight" for x in "qkv"]),
        "qwen": ("transformer.h.1.attn.c_attn.weight", [f"transformer.layers.1.attention.w{x}.weight" for x in "qkv"]),
        "baichuan": ("model.layers.1.self_attn.W_pack.weight",
                     [f"model.layers.1.attention.w{x}.weight" for x in "qkv"]),
    }[family]
    q, kv = H * d, (G if family == "chatglm" else H) * d
    np.testing.assert_array_equal(ckpt.get(wq), params[fused][:q])
    np.testing.assert_array_equal(ckpt.get(wk), params[fused][q : q + kv])
    np.testing.assert_array_equal(ckpt.get(wv), params[fused][q + kv :])
    assert not any("query_key_value" in k or "c_attn" in k or "W_pack" in k for k in ckpt.keys())
    back = tmp_path / "back.safetensors"
    assert cli("convert", "--model", family, "--from", f"mindspore-ckpt:{ms}", "--to", f"safetensors:{back}") == 0
    assert back.read_bytes() == src.read_bytes()  # same names, order, dtypes and bytes


def test_split_sizes_come_from_the_config_or_the_shapes(tmp_path):
    params = synthetic("chatglm")
    src = write_hf(tmp_path / "in.safetensors", params)
    # no config.json beside it: q from self_attention.dense's input width, kv from the remaining rows
    out = tmp_path / "a.ckpt"
    convert(f"safetensors:{src}", f"mindspore-ckpt:{out}", model="chatglm")
    assert MindSporeCkptFile(out).shape("transformer.encoder.layers.0.self_attention.wk.bias") == (G * d,)
    # a config with one kv group claims q + 2 kv = 32 + 16 rows, the tensor has 64: refused
    cfg = tmp_path / "one-group.json"
    cfg.write_text(json.dumps(CONFIGS["chatglm"] | {"multi_query_group_num": 1}))
    with pytest.raises(Exception, match="64 rows but the config gives q=32\\+kv=8\\+kv=8"):
        convert(f"safetensors:{src}", f"mindspore-ckpt:{tmp_path / 'b.ckpt'}", config=cfg)
    # multi_query_attention off means every head has its own k and v: 32 + 32 + 32 rows
    cfg.write_text(json.dumps(CONFIGS["chatglm"] | {"multi_query_attention": False}))
    with pytest.raises(Exception, match="q=32\\+kv=32\\+kv=32"):
        convert(f"safetensors:{src}", f"mindspore-ckpt:{tmp_path / 'c.ckpt'}", config=cfg)
    assert not (tmp_path / "b.ckpt").exists() and not (tmp_path / "c.ckpt").exists()


@pytest.mark.parametrize("preset", tiny_presets())
def test_preset_round_trip_is_bit_exact(tmp_path, preset):
    family, params = preset_params(preset)
    src = write_hf(tmp_path / "model.safetensors", params)
    ms, back = tmp_path / "model.ckpt", tmp_path / "back.safetensors"
    assert cli("convert", "--model", preset, "--from", f"safetensors:{src}", "--to", f"mindspore-ckpt:{ms}") == 0
    assert cli("convert", "--model", family, "--from", f"mindspore-ckpt:{ms}", "--to", f"safetensors:{back}") == 0
    assert back.read_bytes() == src.read_bytes()
    ckpt = MindSporeCkptFile(ms)
    hf_qkv = ("W_pack.weight", "c_attn.weight", "query_key_value.weight", "q_proj.weight")
    assert any(".wq." in k for k in ckpt.keys()) and not any(k.endswith(hf_qkv) for k in ckpt.keys())
    for name, a in load_file(back).items():
        np.testing.assert_array_equal(a, params[name])


@pytest.mark.parametrize("to", ["bfloat16", "float16"])
def test_dtype_cast_rounds_as_ml_dtypes(tmp_path, to):
    rng = np.random.default_rng(1)
    bits = np.concatenate([
        rng.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32),  # anything, NaNs included
        (rng.integers(0, 2**16, 1000, dtype=np.uint32) << 16) | 0x8000,  # exact bf16 ties
        (rng.integers(0x3800, 0x4400, 1000, dtype=np.uint32) << 16) | 0x1000,  # fp16 ties in range
    ]).astype(np.uint32)
    x = bits.view(np.float32)
    ints = np.arange(-5, 5, dtype=np.int32)
    src = write_hf(tmp_path / "x.safetensors", {"x": x.reshape(60, 100), "n": ints})
    out = tmp_path / "x.npz"
    assert cli("convert", "--from", f"safetensors:{src}", "--to", f"npz:{out}", "--dtype", to) == 0
    with np.load(out) as z:
        got, n = z["x"], z["n"]
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(ml_dtypes.bfloat16 if to == "bfloat16" else np.float16).reshape(60, 100)
    assert got.dtype.itemsize == 2 and got.view(np.uint16).tobytes() == want.view(np.uint16).tobytes()
    assert n.dtype == np.int32 and np.array_equal(n, ints)  # integers are never cast


def test_bf16_source_to_fp16(tmp_path):
    x = (np.random.default_rng(2).standard_normal(5000) * 100).astype(BF16)
    src = write_hf(tmp_path / "x.safetensors", {"x": x})
    out = tmp_path / "x.safetensors.out.safetensors"
    convert(f"safetensors:{src}", f"safetensors:{out}", dtype="float16")
    assert load_file(out)["x"].tobytes() == x.astype(np.float16).tobytes()


def test_verify_reports_equality_and_names_the_differing_tensor(tmp_path, capsys):
    params = synthetic("chatglm")
    src = write_hf(tmp_path / "model.safetensors", params)
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["chatglm"]))
    ms = tmp_path / "model.ckpt"
    convert(f"safetensors:{src}", f"mindspore-ckpt:{ms}")
    assert cli("verify", f"safetensors:{src}", f"mindspore-ckpt:{ms}") == 0
    assert "equal: 18 tensors" in capsys.readouterr().out  # under HF names: q/k/v fused back

    # change one value of layer 1's wk and one of the output layer, in a copy
    ckpt = MindSporeCkptFile(ms)
    tensors = {k: ckpt.get(k).copy() for k in ckpt.keys()}
    tensors["transformer.encoder.layers.1.self_attention.wk.weight"][3, 5] += 1.0
    tensors["transformer.output_layer.weight"][0, 0] = np.nan
    bad = tmp_path / "bad.ckpt"
    mindspore_ckpt.write(bad, tensors)
    assert cli("verify", f"safetensors:{src}", f"mindspore-ckpt:{bad}", "--model", "chatglm") == 1
    out = capsys.readouterr().out
    assert "transformer.encoder.layers.1.self_attention.query_key_value.weight" in out and "1 of 2048 values" in out
    assert "transformer.output_layer.weight" in out and "differ: 2 of 18 tensors" in out
    assert "layers.0" not in out

    del tensors["transformer.encoder.final_layernorm.weight"]
    mindspore_ckpt.write(bad, tensors)
    assert cli("verify", f"mindspore-ckpt:{ms}", f"mindspore-ckpt:{bad}") == 1
    line = [s for s in capsys.readouterr().out.splitlines() if "final_layernorm" in s]
    assert len(line) == 1 and f"only in {ms}" in line[0]


def test_manifest_holds_the_sha256_of_every_tensor(tmp_path):
    params = synthetic("baichuan")
    src = write_hf(tmp_path / "in.safetensors", params)
    out = tmp_path / "out"  # a directory: a sharded HF checkpoint
    r = convert(f"safetensors:{src}", f"safetensors:{out}", model="baichuan", dtype="bfloat16",
                max_shard_size="10KB")
    manifest = json.loads((tmp_path / "out.manifest.json").read_text())
    assert r.manifest == tmp_path / "out.manifest.json" and manifest["format"] == "safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 4 and set(index["weight_map"].values()) == set(shards)
    seen = {}
    for shard in shards:
        tensors = load_file(out / shard)
        assert sum(a.nbytes for a in tensors.values()) <= 10_000 or len(tensors) == 1
        for name, a in tensors.items():
            seen[name] = a
            entry = manifest["tensors"][name]
            assert entry["file"] == shard and entry["dtype"] == "bfloat16" and entry["shape"] == list(a.shape)
            assert entry["sha256"] == hashlib.sha256(a.tobytes()).hexdigest()
            assert a.tobytes() == params[name].astype(BF16).tobytes()
    assert set(seen) == set(params) == set(manifest["tensors"])


def test_source_is_never_modified(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    params = synthetic("qwen")
    names = list(params)
    write_hf(d / "model-00001-of-00002.safetensors", {n: params[n] for n in names[:9]})
    write_hf(d / "model-00002-of-00002.safetensors", {n: params[n] for n in names[9:]})
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: f"model-0000{1 + (i >= 9)}-of-00002.safetensors" for i, n in enumerate(names)}}))
    (d / "config.json").write_text(json.dumps(CONFIGS["qwen"]))
    os.utime(d / "config.json", ns=(1_000_000_000, 1_000_000_000))

    def snapshot():
        return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.iterdir())}

    before = snapshot()
    for target in (f"mindspore-ckpt:{tmp_path / 'a.ckpt'}", f"torch-bin:{tmp_path / 'bin'}",
                   f"npz:{tmp_path / 'c.npz'}", f"mindspore-safetensors:{tmp_path / 'd.safetensors'}"):
        assert cli("convert", "--from", f"safetensors:{d}", "--to", target) == 0
    # refusals that name the source itself
    assert cli("convert", "--from", f"safetensors:{d}", "--to",
               f"safetensors:{d / 'model-00001-of-00002.safetensors'}") == 2
    assert cli("convert", "--from", f"safetensors:{d}", "--to", f"safetensors:{d}") == 2
    assert snapshot() == before
    assert sorted(p.name for p in d.iterdir()) == sorted(before)


def test_transformers_checkpoint_to_mindspore_and_back_to_torch_bin(qwen2_dir, tmp_path):
    """A real save_pretrained checkpoint: family and config from its config.json, out to a .ckpt, back to
    a pytorch_model.bin directory that torch.load(weights_only=True) reads and accel.models loads."""
    import torch

    from accel.models import from_pretrained

    ms = tmp_path / "qwen2.ckpt"
    assert cli("convert", "--from", f"safetensors:{qwen2_dir}", "--to", f"mindspore-ckpt:{ms}") == 0
    assert "model.tok_embeddings.embedding_weight" in MindSporeCkptFile(ms).keys()
    out = tmp_path / "qwen2-bin"
    assert cli("convert", "--from", f"mindspore-ckpt:{ms}", "--to", f"torch-bin:{out}", "--config",
               str(qwen2_dir / "config.json"), "--max-shard-size", "200KB") == 0
    assert (out / "pytorch_model.bin.index.json").is_file() and (out / "config.json").is_file()
    original = HFCheckpoint(qwen2_dir)
    loaded = {}
    for shard in out.glob("pytorch_model-*.bin"):
        loaded |= torch.load(shard, weights_only=True, mmap=True)
    assert set(loaded) == set(original.keys())
    for name in loaded:
        np.testing.assert_array_equal(loaded[name].numpy(), original.get(name))
    _, params = from_pretrained(out)
    np.testing.assert_array_equal(params["lm_head.weight"], original.get("lm_head.weight"))


def test_unmapped_tensors_error_unless_allowed(tmp_path):
    params = synthetic("baichuan") | {"model.layers.0.self_attn.lora_A.weight": np.ones((2, 3), np.float32)}
    src = write_hf(tmp_path / "in.safetensors", params)
    with pytest.raises(Exception, match="lora_A.weight' is not in the baichuan key map"):
        convert(f"safetensors:{src}", f"mindspore-ckpt:{tmp_path / 'a.ckpt'}", model="baichuan")
    r = convert(f"safetensors:{src}", f"mindspore-ckpt:{tmp_path / 'a.ckpt'}", model="baichuan",
                allow_unmapped=True)
    assert r.rules["unmapped"] == 1
    np.testing.assert_array_equal(MindSporeCkptFile(tmp_path / "a.ckpt").get(
        "model.layers.0.self_attn.lora_A.weight"), np.ones((2, 3), np.float32))


def test_progress_reports_tensors_and_bytes(tmp_path):
    src = write_hf(tmp_path / "in.safetensors", synthetic("qwen"))
    stream = io.StringIO()
    r = convert(f"safetensors:{src}", f"mindspore-ckpt:{tmp_path / 'a.ckpt'}", model="qwen", progress=stream,
                progress_every=0.0)
    lines = stream.getvalue().splitlines()
    assert r.tensors == 27  # 19 HF tensors, c_attn weight and bias of 2 layers each split in three
    assert lines[-1].startswith("27/27 tensors, ") and " / " in lines[-1] and "B/s" in lines[-1]


def test_names_already_on_the_wanted_side_are_kept(tmp_path):
    """An HF-named .ckpt (written with --keymap hf) converts back to safetensors with no renaming: the
    naming is read from the names themselves, not assumed from the format."""
    params = synthetic("qwen")
    src = write_hf(tmp_path / "in.safetensors", params)
    ms = tmp_path / "hf-named.ckpt"
    r = convert(f"safetensors:{src}", f"mindspore-ckpt:{ms}", model="qwen", keymap="hf")
    assert r.rules == {"same": len(params)} and list(MindSporeCkptFile(ms).keys()) == list(params)
    back = tmp_path / "back.safetensors"
    r = convert(f"mindspore-ckpt:{ms}", f"safetensors:{back}", model="qwen")
    assert (r.source_names, r.output_names) == ("hf", "hf") and back.read_bytes() == src.read_bytes()


def test_workers_take_the_largest_tensor_waiting_first():
    """With the only worker busy, tensors queued as a (10 B), b (1000 B), c (100 B) are done b, c, a: a
    large lm_head at the end of a checkpoint does not leave one core working alone while the rest idle."""
    from accel.checkpoint.base import Span
    from accel.checkpoint.convert import Hasher, Progress

    hasher = Hasher(Progress(4, 0, io.StringIO()), workers=1)
    try:
        busy = hasher.spans("first", 10**6, [Span(0, 0, 1)])
        next(busy)  # the worker takes "first" (the largest, however soon it wakes) and waits for its end
        for name, size in [("a", 10), ("b", 1000), ("c", 100)]:
            assert list(hasher.spans(name, size, [])) == []
        assert list(busy) == []
        assert list(hasher.results()) == ["first", "b", "c", "a"]
    finally:
        hasher.close()


@pytest.mark.parametrize("shards", [None, "10KB"])
def test_workers_open_each_output_file_once(tmp_path, monkeypatch, shards):
    """The workers write into the writer's files through descriptors of their own: one per output file,
    not one per piece (a 70B checkpoint is ~8,000 pieces of 16 MiB; a descriptor each would pass
    `ulimit -n`), and the output is still the same bytes."""
    src = write_hf(tmp_path / "in.safetensors", synthetic("qwen"))
    real, dups = os.dup, []
    monkeypatch.setattr(os, "dup", lambda fd: dups.append(fd) or real(fd))
    out = tmp_path / ("out" if shards else "out.safetensors")
    r = convert(f"safetensors:{src}", f"safetensors:{out}", max_shard_size=shards)
    files = sorted(out.glob("*.safetensors")) if shards else [out]
    assert r.tensors == 19 and (len(files) > 2 if shards else len(files) == 1)
    assert len(dups) == len(files)
    back = HFCheckpoint(out) if shards else SafetensorsFile(out)
    want = synthetic("qwen")
    assert all(np.array_equal(back.get(n), want[n]) for n in want)
