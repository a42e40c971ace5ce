"""ChatGLM2-6B and ChatGLM3-6B (`model_type: chatglm`), over the op set, with the parameter names of the
original checkpoints (THUDM's remote code).

Multi-query attention whose Q, K and V come from one fused `query_key_value` projection with a bias,
laid out [Q (heads * d) | K (groups * d) | V (groups * d)]; RoPE on the first half of each head's dims
only, rotating interleaved pairs (x[2i], x[2i + 1]); RMSNorm; a SwiGLU MLP whose `dense_h_to_4h` holds
[gate | up]; an `output_layer` not tied to the embedding. The checkpoint carries the rotary `inv_freq`
buffer; the original forward reads only its dtype and recomputes the frequencies (with `rope_ratio`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from accel.errors import ModelError
from accel.models._layers import (
    KVCache,
    Model,
    Param,
    Params,
    attend,
    rope_inv_freq,
    rope_tables,
    split_fused,
    tap,
)

INV_FREQ = "transformer.rotary_pos_emb.inv_freq"


@dataclass(frozen=True)
class ChatGLM(Model):
    model_type: ClassVar[str] = "chatglm"
    # Real sizes from the config.json of THUDM/chatglm2-6b and THUDM/chatglm3-6b (identical shapes).
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "chatglm3-tiny": dict(vocab_size=256, hidden_size=64, ffn_hidden_size=96, num_layers=2, num_heads=4,
                              kv_channels=16, num_groups=2, seq_length=256),
        "chatglm2-6b": dict(vocab_size=65024, hidden_size=4096, ffn_hidden_size=13696, num_layers=28, num_heads=32,
                            kv_channels=128, num_groups=2, seq_length=32768),
        "chatglm3-6b": dict(vocab_size=65024, hidden_size=4096, ffn_hidden_size=13696, num_layers=28, num_heads=32,
                            kv_channels=128, num_groups=2, seq_length=32768),
    }

    name: str
    vocab_size: int  # padded_vocab_size
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    kv_channels: int  # the head dim
    num_groups: int  # KV heads: multi_query_group_num, or num_heads without multi-query attention
    seq_length: int = 32768
    layernorm_epsilon: float = 1e-5
    rope_ratio: float = 1.0
    post_layer_norm: bool = True

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def rot_dim(self) -> int:
        return self.kv_channels // 2  # RotaryEmbedding(kv_channels // 2): half of each head rotates

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], name: str) -> ChatGLM:
        # Variants the original code supports but no released ChatGLM2/3 checkpoint uses: refused
        # rather than computed wrong.
        unsupported = {
            "quantization_bit": "quantization (quantization_bit)",
            "pre_seq_len": "the P-tuning prefix encoder (pre_seq_len)",
            "add_bias_linear": "add_bias_linear (biases on the dense and MLP layers)",
            "apply_residual_connection_post_layernorm": "apply_residual_connection_post_layernorm",
        }
        for field, what in unsupported.items():
            if cfg.get(field):
                raise ModelError(f"{name}: {what} is not supported")
        if not cfg.get("rmsnorm", True):
            raise ModelError(f"{name}: LayerNorm (rmsnorm: false) is not supported")
        if not (cfg.get("add_qkv_bias") or cfg.get("add_bias_linear")):
            raise ModelError(f"{name}: query_key_value without a bias (add_qkv_bias: false) is not supported")
        heads = cfg["num_attention_heads"]
        return cls(
            name=name,
            vocab_size=cfg.get("padded_vocab_size") or cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            ffn_hidden_size=cfg["ffn_hidden_size"],
            num_layers=cfg["num_layers"],
            num_heads=heads,
            kv_channels=cfg.get("kv_channels") or cfg["hidden_size"] // heads,
            num_groups=cfg["multi_query_group_num"] if cfg.get("multi_query_attention") else heads,
            seq_length=cfg.get("seq_length", 2048),
            layernorm_epsilon=float(cfg.get("layernorm_epsilon", 1e-5)),
            rope_ratio=float(cfg.get("rope_ratio", 1.0)),
            post_layer_norm=bool(cfg.get("post_layer_norm", True)),
        )

    def param_spec(self) -> dict[str, Param]:
        D, F, d = self.hidden_size, self.ffn_hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_groups * d
        spec = {
            "transformer.embedding.word_embeddings.weight": Param((self.vocab_size, D)),
            INV_FREQ: Param((self.rot_dim // 2,), "buffer"),
        }
        for i in range(self.num_layers):
            p = f"transformer.encoder.layers.{i}."
            spec |= {
                p + "input_layernorm.weight": Param((D,), "norm"),
                p + "self_attention.query_key_value.weight": Param((q + 2 * kv, D)),
                p + "self_attention.query_key_value.bias": Param((q + 2 * kv,)),
                p + "self_attention.dense.weight": Param((D, q)),
                p + "post_attention_layernorm.weight": Param((D,), "norm"),
                p + "mlp.dense_h_to_4h.weight": Param((2 * F, D)),  # [gate | up]
                p + "mlp.dense_4h_to_h.weight": Param((D, F)),
            }
        if self.post_layer_norm:
            spec["transformer.encoder.final_layernorm.weight"] = Param((D,), "norm")
        spec["transformer.output_layer.weight"] = Param((self.vocab_size, D))
        return spec

    def buffers(self) -> dict[str, np.ndarray]:
        # As the original registers it: base 10000 whatever rope_ratio says (forward recomputes).
        return {INV_FREQ: rope_inv_freq(self.rot_dim, 10000.0)}

    def forward(self, ops: Any, params: Params, input_ids: Any, cache: KVCache | None = None,
                taps: dict | None = None, training: bool = False) -> Any:
        b, s = input_ids.shape
        past = cache.length if cache is not None else 0
        d, h, g = self.head_dim, self.num_heads, self.num_groups
        eps = self.layernorm_epsilon
        x = tap(taps, "embed", "embedding",
                ops.embedding(params["transformer.embedding.word_embeddings.weight"], input_ids))  # (b, s, D)
        # Positions past .. past + s - 1, as the original's generation passes them in position_ids.
        cos, sin = rope_tables(ops, rope_inv_freq(self.rot_dim, 10000.0 * self.rope_ratio), past, s, taps)  # (s, d/4)
        for i in range(self.num_layers):
            p, t = f"transformer.encoder.layers.{i}.", f"layers.{i}."
            hn = tap(taps, t + "input_norm", "rms_norm", ops.rms_norm(x, params[p + "input_layernorm.weight"], eps))
            qkv = ops.linear(hn, params[p + "self_attention.query_key_value.weight"],
                             params[p + "self_attention.query_key_value.bias"])  # (b, s, (h + 2g) d)
            q, k, v = split_fused(ops, qkv, (h * d, g * d, g * d), (h, g, g))  # (b, s, h|g, d)
            tap(taps, t + "q", "split", q)
            tap(taps, t + "k", "split", k)
            q = tap(taps, t + "q_rope", "rope", ops.rope(q, cos, sin, "interleaved"))
            k = tap(taps, t + "k_rope", "rope", ops.rope(k, cos, sin, "interleaved"))
            a = attend(ops, q, k, v, layer=i, cache=cache, scale=d**-0.5, taps=taps)  # (b, s, h*d)
            a = tap(taps, t + "attn_out", "linear", ops.linear(a, params[p + "self_attention.dense.weight"]))
            x = ops.add(x, a)
            hn = tap(taps, t + "post_norm", "rms_norm",
                     ops.rms_norm(x, params[p + "post_attention_layernorm.weight"], eps))
            m = tap(taps, t + "mlp_act", "swiglu", ops.swiglu(ops.linear(hn, params[p + "mlp.dense_h_to_4h.weight"])))
            m = tap(taps, t + "mlp_out", "linear", ops.linear(m, params[p + "mlp.dense_4h_to_h.weight"]))
            x = tap(taps, t + "out", "add", ops.add(x, m))
        if cache is not None:
            cache.length = past + s
        if self.post_layer_norm:
            x = tap(taps, "final_norm", "rms_norm",
                    ops.rms_norm(x, params["transformer.encoder.final_layernorm.weight"], eps))
        return tap(taps, "logits", "linear", ops.linear(x, params["transformer.output_layer.weight"]))  # (b, s, V)
