"""MindFormers generations of the key maps: Qwen2's Megatron-core names with per-group interleaved linear_qkv
and row-interleaved linear_fc1 (MindFormers 2.x), and ChatGLM2/3 with query_key_value fused, split, or
split with dense_left/dense_right. Each round trip HF -> generation -> HF is byte-identical, the fused
layouts equal references written from MindFormers' own formulas (cited below), and the way back finds the
generation from the names alone."""

from __future__ import annotations

import json

import numpy as np
import pytest

from accel.checkpoint.convert import Result, convert
from accel.checkpoint.keymap import KeyMap, MappedView
from accel.checkpoint.mindspore_ckpt import MindSporeCkptFile
from accel.checkpoint.safetensors import SafetensorsFile
from accel.cli import main
from tests.conftest import QWEN2_TINY
from tests.hf_fixtures import chatglm_config, chatglm_tensors, write_checkpoint

G = QWEN2_TINY["num_key_value_heads"]


def megatron_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, groups: int) -> np.ndarray:
    """MindFormers' QKVConvertOp._hf_to_mf (checkpoint/converter/convert_op.py) and
    TrainModelMixin.concat_qkv_interleaved: per kv group, its query heads, then its k and v rows."""
    tail = q.shape[1:]
    return np.concatenate([q.reshape(groups, -1, *tail), k.reshape(groups, -1, *tail),
                           v.reshape(groups, -1, *tail)], axis=1).reshape(-1, *tail)


def megatron_fc1(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """MindFormers' TrainModelMixin.concat_linear_fc1_interleaved: gate_0, up_0, gate_1, up_1, ..."""
    return np.stack([gate, up], axis=1).reshape(-1, gate.shape[1])


def adjacent_parts(tensors: dict[str, np.ndarray], groups: list[list[str]]) -> dict[str, np.ndarray]:
    """`tensors` reordered so that the parts of each fused tensor are adjacent and in part order, at the
    place of the first of them. Byte-identity needs that: the way back writes the parts where the fused
    tensor was. save_pretrained's alphabetical order (k_proj before o_proj before q_proj) comes back
    tensor-identical but reordered."""
    out: dict[str, np.ndarray] = {}
    for name in tensors:
        group = next((g for g in groups if name in g), [name])
        out |= {n: tensors[n] for n in group if n not in out}
    return out


def qwen2_source(qwen2_dir, tmp_path):
    from accel.checkpoint import safetensors

    hf = SafetensorsFile(qwen2_dir / "model.safetensors")
    tensors = {n: hf.get(n) for n in hf.keys()}
    groups = [[f"model.layers.{i}.self_attn.{x}_proj.{w}" for x in "qkv"] for i in range(2) for w in ("weight", "bias")]
    groups += [[f"model.layers.{i}.mlp.{x}_proj.weight" for x in ("gate", "up")] for i in range(2)]
    src = tmp_path / "qwen2" / "model.safetensors"
    src.parent.mkdir()
    (src.parent / "config.json").write_bytes((qwen2_dir / "config.json").read_bytes())
    safetensors.write(src, adjacent_parts(tensors, groups), {"format": "pt"})
    return src


def round_trip(tmp_path, src, keymap: str, **kw) -> tuple[MindSporeCkptFile, Result]:
    ms, back = src.parent / "ms.ckpt", tmp_path / "back.safetensors"  # the .ckpt beside config.json
    convert(f"safetensors:{src}", f"mindspore-ckpt:{ms}", keymap=keymap, **kw)
    r = convert(f"mindspore-ckpt:{ms}", f"safetensors:{back}", **kw)
    return MindSporeCkptFile(ms), r


# --- Qwen2 ----------------------------------------------------------------------------------------------


def test_qwen2_megatron_round_trip_and_interleaved_layouts(qwen2_dir, tmp_path):
    src = qwen2_source(qwen2_dir, tmp_path)
    hf = SafetensorsFile(src)
    ckpt, r = round_trip(tmp_path, src, "mindformers:megatron")
    assert (tmp_path / "back.safetensors").read_bytes() == src.read_bytes()
    assert (r.source_names, r.output_names) == ("mindformers:megatron", "hf")  # found from the names
    names = set(ckpt.keys())
    assert {"embedding.word_embeddings.weight", "decoder.layers.1.input_layernorm.weight",
            "decoder.layers.1.pre_mlp_layernorm.weight", "decoder.layers.1.self_attention.linear_proj.weight",
            "decoder.layers.1.mlp.linear_fc2.weight", "decoder.final_layernorm.weight",
            "output_layer.weight"} <= names
    assert not any("q_proj" in n or "gate_proj" in n or "linear_q." in n for n in names)
    p, m = "model.layers.1.", "decoder.layers.1."
    for x in ("weight", "bias"):
        qkv = ckpt.get(m + f"self_attention.linear_qkv.{x}")
        want = megatron_qkv(*(hf.get(p + f"self_attn.{n}_proj.{x}") for n in "qkv"), G)
        np.testing.assert_array_equal(qkv, want)
        # a plain [q; k; v] would already differ in the second group's first row
        assert not np.array_equal(qkv, np.concatenate([hf.get(p + f"self_attn.{n}_proj.{x}") for n in "qkv"]))
    np.testing.assert_array_equal(ckpt.get(m + "mlp.linear_fc1.weight"),
                                  megatron_fc1(hf.get(p + "mlp.gate_proj.weight"), hf.get(p + "mlp.up_proj.weight")))


def copy_source(qwen2_dir, tmp_path):
    src = tmp_path / "hf" / "model.safetensors"
    src.parent.mkdir()
    for f in ("model.safetensors", "config.json"):
        (src.parent / f).write_bytes((qwen2_dir / f).read_bytes())
    return src


def test_save_pretrained_order_comes_back_tensor_identical(qwen2_dir, tmp_path):
    src = copy_source(qwen2_dir, tmp_path)
    round_trip(tmp_path, src, "mindformers:megatron")
    a, b = SafetensorsFile(src), SafetensorsFile(tmp_path / "back.safetensors")
    assert sorted(a.keys()) == sorted(b.keys())
    for name in a.keys():
        assert a.get(name).tobytes() == b.get(name).tobytes(), name


def test_qwen2_llama_generation_still_round_trips(qwen2_dir, tmp_path):
    src = copy_source(qwen2_dir, tmp_path)
    ckpt, r = round_trip(tmp_path, src, "mindformers:llama")
    assert (tmp_path / "back.safetensors").read_bytes() == src.read_bytes()
    assert r.source_names == "mindformers:llama" and "model.layers.0.attention.wq.bias" in ckpt.keys()


def test_interleaved_tensors_stream_in_any_chunks(qwen2_dir):
    """Reads of an interleaved tensor cut at arbitrary bytes (inside a row, across groups) give the same
    bytes as the whole tensor: nothing relies on a chunk holding a whole piece."""
    hf = SafetensorsFile(qwen2_dir / "model.safetensors")
    config = json.loads((qwen2_dir / "config.json").read_text())
    view = MappedView(hf, KeyMap("qwen2", "megatron").plan(hf, "hf", "mindformers", config))
    for name in ("decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.0.mlp.linear_fc1.weight"):
        whole = view.get(name).tobytes()
        assert len(view.source(name).pieces) > 3  # interleaved, not one block per part
        for size in (1000, 100):  # batches of rows; rows larger than a chunk
            chunks = [bytes(c) for c in view.chunks(name, size=size)]
            assert b"".join(chunks) == whole and max(map(len, chunks)) <= size
        assert b"".join(bytes(c) for c in view.chunks(name, 37, 5000, size=333)) == whole[37:5000]
        cast = MappedView(hf, list(view.planned.values()), "bfloat16")  # casting cuts elements, not bytes
        assert b"".join(bytes(c) for c in cast.chunks(name, size=999)) == cast.get(name).tobytes()


def test_qwen2_megatron_needs_the_query_groups_from_a_config(qwen2_dir, tmp_path):
    """Shapes give kv heads x head dim, not the heads: without a config the layout is refused, not guessed."""
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((qwen2_dir / "model.safetensors").read_bytes())  # no config.json beside it
    with pytest.raises(Exception, match=r"query groups of .*linear_qkv\.(weight|bias): give --config"):
        convert(f"safetensors:{lone}", f"mindspore-ckpt:{tmp_path / 'a.ckpt'}", model="qwen2",
                keymap="mindformers:megatron")
    assert not (tmp_path / "a.ckpt").exists()


def test_qwen2_megatron_wrong_group_count_is_refused(qwen2_dir, tmp_path):
    """A config whose kv heads disagree with the k/v rows cannot be laid out: refused, not guessed."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(json.loads((qwen2_dir / "config.json").read_text()) | {"num_key_value_heads": 1}))
    with pytest.raises(Exception, match=r"its blocks have \[64, 32, 32\] rows, the config says \[64, 16, 16\]"):
        convert(f"safetensors:{qwen2_dir / 'model.safetensors'}", f"mindspore-ckpt:{tmp_path / 'a.ckpt'}",
                config=cfg, keymap="mindformers:megatron")


# --- ChatGLM2/3 -----------------------------------------------------------------------------------------


@pytest.fixture
def chatglm_src(tmp_path):
    cfg = chatglm_config()
    write_checkpoint(tmp_path / "glm", cfg, chatglm_tensors(cfg))
    return tmp_path / "glm" / "model.safetensors", cfg


@pytest.mark.parametrize("generation", ["qkv_concat", "split", "split_mlp"])
def test_chatglm_generations_round_trip(chatglm_src, tmp_path, generation):
    src, cfg = chatglm_src
    hf = SafetensorsFile(src)
    ckpt, r = round_trip(tmp_path, src, f"mindformers:{generation}")
    assert (tmp_path / "back.safetensors").read_bytes() == src.read_bytes()
    assert r.source_names == f"mindformers:{generation}"
    names = set(ckpt.keys())
    assert "transformer.embedding.embedding_weight" in names
    p = "transformer.encoder.layers.1."
    fused_qkv = p + "self_attention.query_key_value.bias"
    assert (fused_qkv in names) == (generation == "qkv_concat")
    assert (p + "mlp.dense_h_to_4h.weight" in names) == (generation != "split_mlp")
    if generation != "qkv_concat":  # plain row blocks q | k | v (convert_weight.py attn_split)
        q, kv = cfg["num_attention_heads"] * cfg["kv_channels"], cfg["multi_query_group_num"] * cfg["kv_channels"]
        np.testing.assert_array_equal(ckpt.get(p + "self_attention.wk.bias"), hf.get(fused_qkv)[q : q + kv])
    if generation == "split_mlp":  # dense_left is the first ffn_hidden_size rows (convert_weight.py mlp_split)
        w = hf.get(p + "mlp.dense_h_to_4h.weight")
        np.testing.assert_array_equal(ckpt.get(p + "mlp.dense_left.weight"), w[: cfg["ffn_hidden_size"]])
        np.testing.assert_array_equal(ckpt.get(p + "mlp.dense_right.weight"), w[cfg["ffn_hidden_size"] :])


def test_chatglm_split_mlp_without_a_config_halves_the_rows(chatglm_src, tmp_path):
    src, cfg = chatglm_src
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(src.read_bytes())  # no config.json beside it
    out = tmp_path / "a.ckpt"
    convert(f"safetensors:{lone}", f"mindspore-ckpt:{out}", model="chatglm", keymap="mindformers:split_mlp")
    assert MindSporeCkptFile(out).shape("transformer.encoder.layers.0.mlp.dense_right.weight") == \
        (cfg["ffn_hidden_size"], cfg["hidden_size"])


# --- the command line -------------------------------------------------------------------------------------


def test_help_lists_the_generations(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "qwen2: llama (default), megatron" in text and "qkv_concat" in text and "split_mlp" in text


@pytest.mark.parametrize("keymap, message", [("mindformers:nope", "no generation 'nope'"),
                                             ("hf:megatron", "use hf, mindformers, mindformers:GENERATION")])
def test_unknown_generation_is_a_usage_error(qwen2_dir, tmp_path, capsys, keymap, message):
    assert main(["convert", "--from", f"safetensors:{qwen2_dir}", "--to", f"mindspore-ckpt:{tmp_path / 'a.ckpt'}",
                 "--keymap", keymap]) == 2
    assert message in capsys.readouterr().err
