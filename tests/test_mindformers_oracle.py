"""MindFormers 2.1.0's own weight conversion code run on what `accel convert` writes: its Megatron-core
QKVConvertOp / ConcatConvertOp (mindformers/checkpoint/converter/convert_op.py, `_mf_to_hf`) turn our
`mindformers:megatron` Qwen2 back into the Hugging Face tensors, and its ChatGLM2 loader's own HF -> MF
conversion (mindformers/models/glm2/glm2.py, ChatGLM2ForConditionalGeneration.convert_weight_dict) gives
exactly our `qkv_concat` and `split_mlp` checkpoints. MindFormers runs in a process of its own (it sets up
logging and writes ./output/ where it runs)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from accel.checkpoint.convert import convert
from tests.conftest import save_hf_qwen2
from tests.hf_fixtures import chatglm_config, chatglm_tensors, write_checkpoint

pytest.importorskip("mindformers", reason="installed by the Makefile without its declared dependencies")

CHECK = r"""
import json, sys
import numpy as np, mindspore as ms
from safetensors.numpy import load_file
from mindformers.checkpoint.converter.convert_op import ConcatConvertOp, QKVConvertOp
from mindformers.models.glm2.glm2 import ChatGLM2ForConditionalGeneration
from mindformers.models.glm2.glm2_config import ChatGLM2Config

root = sys.argv[1]
out = {}
hf, cfg = load_file(root + "/qwen2/model.safetensors"), json.load(open(root + "/qwen2/config.json"))
mf = {k: v.asnumpy() for k, v in ms.load_checkpoint(root + "/qwen2-megatron.ckpt").items()}
nh, ng, h = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
def qkv(width):
    return QKVConvertOp(hf_names=["q", "k", "v"], mf_names=["qkv"], num_attention_heads=nh, num_query_groups=ng,
                        kv_channels=h // nh, hidden_size=width, tensor_model_parallel_size=1, optimizer_parallel_size=1)
fc1 = ConcatConvertOp(hf_names=["gate", "up"], mf_names=["fc1"])  # interleaved, MindFormers' default
for i in range(cfg["num_hidden_layers"]):
    p, a = f"decoder.layers.{i}.", f"model.layers.{i}."
    got = dict(zip("qkv", qkv(h)._mf_to_hf([mf[p + "self_attention.linear_qkv.weight"]])))
    # QKVBiasConvertOp reshapes the q bias by the kv groups and fails on grouped-query attention; the bias
    # has the weight's per-group layout, so the weight op on its (rows, 1) view reads it
    bias = qkv(1)._mf_to_hf([mf[p + "self_attention.linear_qkv.bias"].reshape(-1, 1)])
    got |= {x + "_bias": b.reshape(-1) for x, b in zip("qkv", bias)}
    gate, up = fc1._mf_to_hf([mf[p + "mlp.linear_fc1.weight"]])
    want = {x: hf[a + f"self_attn.{x}_proj.weight"] for x in "qkv"}
    want |= {x + "_bias": hf[a + f"self_attn.{x}_proj.bias"] for x in "qkv"}
    out[f"qwen2 layer {i}"] = all(np.array_equal(got[k], want[k]) for k in want) and np.array_equal(
        gate, hf[a + "mlp.gate_proj.weight"]) and np.array_equal(up, hf[a + "mlp.up_proj.weight"])
g, gcfg = load_file(root + "/chatglm/model.safetensors"), json.load(open(root + "/chatglm/config.json"))
mc = ChatGLM2Config(num_layers=gcfg["num_layers"], hidden_size=gcfg["hidden_size"],
                    ffn_hidden_size=gcfg["ffn_hidden_size"], num_attention_heads=gcfg["num_attention_heads"],
                    kv_channels=gcfg["kv_channels"], multi_query_group_num=gcfg["multi_query_group_num"],
                    multi_query_attention=True, padded_vocab_size=gcfg["padded_vocab_size"])
for generation, qkv_concat in (("qkv_concat", True), ("split_mlp", False)):
    mc.qkv_concat = qkv_concat
    theirs = ChatGLM2ForConditionalGeneration.convert_weight_dict(dict(g), model_config=mc)
    ours = {k: v.asnumpy() for k, v in ms.load_checkpoint(root + f"/chatglm-{generation}.ckpt").items()}
    out[f"chatglm {generation}"] = sorted(theirs) == sorted(ours) and all(
        np.array_equal(np.asarray(theirs[k]), ours[k]) for k in ours)
    out[f"chatglm {generation} tensors"] = len(ours)
print("RESULT " + json.dumps(out))
"""


def test_mindformers_own_conversion_code_agrees_with_accels_output(tmp_path):
    qwen2 = save_hf_qwen2(tmp_path / "qwen2")
    convert(f"safetensors:{qwen2 / 'model.safetensors'}", f"mindspore-ckpt:{tmp_path / 'qwen2-megatron.ckpt'}",
            keymap="mindformers:megatron")
    cfg = chatglm_config()
    glm = write_checkpoint(tmp_path / "chatglm", cfg, chatglm_tensors(cfg))
    for generation in ("qkv_concat", "split_mlp"):
        convert(f"safetensors:{glm / 'model.safetensors'}", f"mindspore-ckpt:{tmp_path / f'chatglm-{generation}.ckpt'}",
                keymap=f"mindformers:{generation}")
    r = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path)], capture_output=True, text=True, cwd=tmp_path,
                       timeout=600)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert result.pop("chatglm qkv_concat tensors") == 2 * 7 + 4  # query_key_value kept fused, with its bias
    assert result.pop("chatglm split_mlp tensors") == 2 * 12 + 4  # wq/wk/wv with biases, dense_left/right
    assert all(result.values()) and len(result) == 4, result
