"""Tiny checkpoints in the exact layout of the original ChatGLM2/3, Qwen (v1) and Baichuan2 releases: tensor
names, shapes and fused blocks as their modeling code declares them, and config.json with the fields
those repositories ship. They are written here from the published layouts (not from the parameter specs
under test), with the `safetensors` package, or as pytorch_model.bin through conftest's `to_torch_bin`.

Also float64 NumPy building blocks for references written from the published math, one sequence at a
time, independent of accel's op set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.conftest import to_torch_bin

# --- writing checkpoints ----------------------------------------------------------------------------


def write_checkpoint(directory: Path, config: dict, tensors: dict[str, np.ndarray],
                     layout: str = "safetensors") -> Path:
    """config.json plus the weights: layout "safetensors" (model.safetensors), "bin" (pytorch_model.bin) or
    "bin-sharded" (3 pytorch_model-*.bin shards plus their index)."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    if layout == "bin":
        to_torch_bin(directory, 1)
    elif layout == "bin-sharded":
        to_torch_bin(directory, 3)
    elif layout != "safetensors":
        raise ValueError(layout)
    return directory


class _Random:
    """Weights scaled so that activations stay O(1): attention is far from uniform and RoPE, ALiBi and
    the norms visibly matter (HF's 0.02 init would make most of them vanish)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def linear(self, out: int, inp: int) -> np.ndarray:
        return (self.rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    def vector(self, n: int, center: float = 0.0, scale: float = 0.1) -> np.ndarray:
        return (center + scale * self.rng.standard_normal(n)).astype(np.float32)

    def embedding(self, vocab: int, dim: int) -> np.ndarray:
        return self.rng.standard_normal((vocab, dim)).astype(np.float32)


# --- ChatGLM2/3 (THUDM/chatglm3-6b layout) ------------------------------------------------------------


def chatglm_config(**overrides) -> dict:
    """config.json of THUDM/chatglm3-6b with tiny sizes."""
    cfg = {
        "_name_or_path": "THUDM/chatglm3-6b", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "ffn_hidden_size": 96,
        "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": 64, "kv_channels": 16,
        "layernorm_epsilon": 1e-05, "multi_query_attention": True, "multi_query_group_num": 2,
        "num_attention_heads": 4, "num_layers": 2, "original_rope": True, "padded_vocab_size": 256,
        "post_layer_norm": True, "rmsnorm": True, "seq_length": 256, "use_cache": True, "torch_dtype": "float16",
        "transformers_version": "4.30.2", "tie_word_embeddings": False, "eos_token_id": 2, "pad_token_id": 0,
    }
    return cfg | overrides


def chatglm_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    r = _Random(seed)
    h, d, H, F = cfg["hidden_size"], cfg["kv_channels"], cfg["num_attention_heads"], cfg["ffn_hidden_size"]
    G = cfg["multi_query_group_num"] if cfg["multi_query_attention"] else H
    qkv = H * d + 2 * G * d
    rot = d // 2  # RotaryEmbedding(kv_channels // 2); its persistent buffer is stored in the model dtype
    t = {"transformer.embedding.word_embeddings.weight": r.embedding(cfg["padded_vocab_size"], h),
         "transformer.rotary_pos_emb.inv_freq": (1.0 / 10000 ** (np.arange(0, rot, 2) / rot)).astype(np.float16)}
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        t |= {p + "input_layernorm.weight": r.vector(h, 1.0),
              p + "self_attention.query_key_value.weight": r.linear(qkv, h),
              p + "self_attention.query_key_value.bias": r.vector(qkv, 0.0, 0.3),
              p + "self_attention.dense.weight": r.linear(h, H * d),
              p + "post_attention_layernorm.weight": r.vector(h, 1.0),
              p + "mlp.dense_h_to_4h.weight": r.linear(2 * F, h),
              p + "mlp.dense_4h_to_h.weight": r.linear(h, F)}
    t["transformer.encoder.final_layernorm.weight"] = r.vector(h, 1.0)
    t["transformer.output_layer.weight"] = r.linear(cfg["padded_vocab_size"], h)
    return t


# --- Qwen v1 (Qwen/Qwen-7B layout) --------------------------------------------------------------------


def qwen_config(**overrides) -> dict:
    """config.json of Qwen/Qwen-7B (Sept 2023) with tiny sizes; seq_length 16 so that test prompts pass it."""
    cfg = {
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen",
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                     "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "attn_dropout_prob": 0.0, "bf16": False, "emb_dropout_prob": 0.0, "fp16": False, "fp32": False,
        "hidden_size": 64, "intermediate_size": 192, "initializer_range": 0.02, "kv_channels": 16,
        "layer_norm_epsilon": 1e-06, "max_position_embeddings": 64, "no_bias": True, "num_attention_heads": 4,
        "num_hidden_layers": 2, "onnx_safe": None, "rotary_emb_base": 10000, "rotary_pct": 1.0,
        "scale_attn_weights": True, "seq_length": 16, "tie_word_embeddings": False,
        "tokenizer_class": "QWenTokenizer", "transformers_version": "4.32.0", "use_cache": True,
        "use_dynamic_ntk": True, "use_flash_attn": "auto", "use_logn_attn": True, "vocab_size": 256,
        "softmax_in_fp32": False, "use_cache_quantization": False, "use_cache_kernel": False,
    }
    return cfg | overrides


def qwen_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    r = _Random(seed)
    H, F = cfg["hidden_size"], cfg["intermediate_size"] // 2
    P = cfg["kv_channels"] * cfg["num_attention_heads"]
    t = {"transformer.wte.weight": r.embedding(cfg["vocab_size"], H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        t |= {p + "ln_1.weight": r.vector(H, 1.0),
              p + "attn.c_attn.weight": r.linear(3 * P, H),
              p + "attn.c_attn.bias": r.vector(3 * P, 0.0, 0.3),
              p + "attn.c_proj.weight": r.linear(P, H),
              p + "ln_2.weight": r.vector(H, 1.0),
              p + "mlp.w1.weight": r.linear(F, H),
              p + "mlp.w2.weight": r.linear(F, H),
              p + "mlp.c_proj.weight": r.linear(H, F)}
    t["transformer.ln_f.weight"] = r.vector(H, 1.0)
    t["lm_head.weight"] = r.linear(cfg["vocab_size"], H)
    return t


# --- Baichuan2 (baichuan-inc/Baichuan2-{7B,13B}-Base layout) -------------------------------------------


def baichuan_config(variant: str, **overrides) -> dict:
    """config.json of Baichuan2-7B-Base or Baichuan2-13B-Base with tiny sizes. Only the 7B one has
    max_position_embeddings (its RoPE table length); 13B's has model_max_length (its ALiBi cache)."""
    cfg = {
        "architectures": ["BaichuanForCausalLM"], "model_type": "baichuan",
        "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                     "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu", "initializer_range": 0.02,
        "model_max_length": 4096, "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": True, "z_loss_weight": 0, "_from_model_config": True, "vocab_size": 256,
        "tokenizer_class": "BaichuanTokenizer", "num_hidden_layers": 2,
    }
    if variant == "7b":
        cfg |= {"hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 4,
                "max_position_embeddings": 4096, "transformers_version": "4.29.2"}
    elif variant == "13b":  # 6 heads: not a power of two, as 13B's 40
        cfg |= {"hidden_size": 48, "intermediate_size": 128, "num_attention_heads": 6,
                "gradient_checkpointing": [False], "transformers_version": "4.29.2"}
    else:
        raise ValueError(variant)
    return cfg | overrides


def baichuan_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    r = _Random(seed)
    H, I = cfg["hidden_size"], cfg["intermediate_size"]
    t = {"model.embed_tokens.weight": r.embedding(cfg["vocab_size"], H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": r.vector(H, 1.0),
              p + "self_attn.W_pack.weight": r.linear(3 * H, H),
              p + "self_attn.o_proj.weight": r.linear(H, H),
              p + "post_attention_layernorm.weight": r.vector(H, 1.0),
              p + "mlp.gate_proj.weight": r.linear(I, H),
              p + "mlp.up_proj.weight": r.linear(I, H),
              p + "mlp.down_proj.weight": r.linear(H, I)}
    t["model.norm.weight"] = r.vector(H, 1.0)
    # NormHead stores the raw weight; rows of unequal norms so that normalising matters
    row_scale = r.rng.uniform(0.5, 3.0, (cfg["vocab_size"], 1))
    t["lm_head.weight"] = (r.linear(cfg["vocab_size"], H) * row_scale).astype(np.float32)
    return t


# --- float64 NumPy building blocks (one sequence: x (n, dim), heads (n, heads, d)) ---------------------


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def rope_half(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """GPT-NeoX/LLaMA rotation of the first 2 * len(inv_freq) dims of x (n, heads, d):
    x * cos + rotate_half(x) * sin with the angle table duplicated over both halves."""
    rot = 2 * len(inv_freq)
    ang = positions[:, None] * inv_freq[None, :]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]
    xr, rest = x[..., :rot], x[..., rot:]
    rotated = np.concatenate([-xr[..., rot // 2:], xr[..., : rot // 2]], -1)
    return np.concatenate([xr * cos + rotated * sin, rest], -1)


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """softmax(q k^T / sqrt(d) + bias) v over keys j <= i; q/k/v (n, heads, d), bias (heads, n, n)."""
    n, _, d = q.shape
    scores = np.einsum("ihd,jhd->hij", q, k) / np.sqrt(d)
    if bias is not None:
        scores = scores + bias
    scores = np.where(np.tril(np.ones((n, n), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hij,jhd->ihd", p, v)


def f64(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float64) for k, v in tensors.items()}
