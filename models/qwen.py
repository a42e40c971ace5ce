"""Qwen2 (`model_type: qwen2`), over the op set, with the parameter names of the HF checkpoints.

Qwen2: GQA with q/k/v biases, half-rotate RoPE with theta from the config, RMSNorm, SwiGLU MLP with
separate gate/up projections, lm_head tied to the embedding or not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from accel.models._layers import KVCache, Model, Param, Params, attend, rope_inv_freq, rope_tables, split_heads, tap

from accel.errors import ModelError


@dataclass(frozen=True)
class Qwen2(Model):
    model_type: ClassVar[str] = "qwen2"
    # Real sizes from the config.json of Qwen/Qwen2-{0.5B,1.5B,7B,72B}.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "qwen2-tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
                           num_kv_heads=2, rope_theta=10000.0, tie_word_embeddings=False),
        "qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                           num_kv_heads=2, rope_theta=1000000.0, tie_word_embeddings=True),
        "qwen2-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                           num_kv_heads=2, rope_theta=1000000.0, tie_word_embeddings=True),
        "qwen2-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                         num_kv_heads=4, rope_theta=1000000.0, tie_word_embeddings=False),
        "qwen2-72b": dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_layers=80, num_heads=64,
                          num_kv_heads=8, rope_theta=1000000.0, tie_word_embeddings=False),
    }

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], name: str) -> Qwen2:
        if cfg.get("use_sliding_window"):
            raise ModelError(f"{name}: sliding-window attention (use_sliding_window) is not supported")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ModelError(f"{name}: rope scaling {rope.get('rope_type') or rope.get('type')!r} is not supported")
        head_dim = cfg.get("head_dim")
        if head_dim is not None and head_dim * cfg["num_attention_heads"] != cfg["hidden_size"]:
            raise ModelError(f"{name}: head_dim * num_attention_heads != hidden_size is not supported")
        return cls(
            name=name,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )

    def param_spec(self) -> dict[str, Param]:
        D, I, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        spec = {"model.embed_tokens.weight": Param((self.vocab_size, D))}
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            spec |= {
                p + "input_layernorm.weight": Param((D,), "norm"),
                p + "self_attn.q_proj.weight": Param((q, D)),
                p + "self_attn.q_proj.bias": Param((q,)),
                p + "self_attn.k_proj.weight": Param((kv, D)),
                p + "self_attn.k_proj.bias": Param((kv,)),
                p + "self_attn.v_proj.weight": Param((kv, D)),
                p + "self_attn.v_proj.bias": Param((kv,)),
                p + "self_attn.o_proj.weight": Param((D, q)),
                p + "post_attention_layernorm.weight": Param((D,), "norm"),
                p + "mlp.gate_proj.weight": Param((I, D)),
                p + "mlp.up_proj.weight": Param((I, D)),
                p + "mlp.down_proj.weight": Param((D, I)),
            }
        spec["model.norm.weight"] = Param((D,), "norm")
        if not self.tie_word_embeddings:
            spec["lm_head.weight"] = Param((self.vocab_size, D))
        return spec

    def forward(self, ops: Any, params: Params, input_ids: Any, cache: KVCache | None = None,
                taps: dict | None = None) -> Any:
        b, s = input_ids.shape
        past = cache.length if cache is not None else 0
        x = tap(taps, "embed", "embedding", ops.embedding(params["model.embed_tokens.weight"], input_ids))  # (b, s, D)
        cos, sin = rope_tables(ops, rope_inv_freq(self.head_dim, self.rope_theta), past, s)
        for i in range(self.num_layers):
            p, t = f"model.layers.{i}.", f"layers.{i}."
            h = tap(taps, t + "input_norm", "rms_norm",
                    ops.rms_norm(x, params[p + "input_layernorm.weight"], self.rms_norm_eps))
            proj = {n: ops.linear(h, params[f"{p}self_attn.{n}_proj.weight"], params[f"{p}self_attn.{n}_proj.bias"])
                    for n in "qkv"}
            q = split_heads(ops, proj["q"], self.num_heads)  # (b, s, h, d)
            k = split_heads(ops, proj["k"], self.num_kv_heads)  # (b, s, g, d)
            v = split_heads(ops, proj["v"], self.num_kv_heads)
            tap(taps, t + "q", "linear", q)
            tap(taps, t + "k", "linear", k)
            q = tap(taps, t + "q_rope", "rope", ops.rope(q, cos, sin, "half"))
            k = tap(taps, t + "k_rope", "rope", ops.rope(k, cos, sin, "half"))
            a = attend(ops, q, k, v, layer=i, cache=cache, scale=self.head_dim**-0.5, taps=taps)  # (b, s, h*d)
            a = tap(taps, t + "attn_out", "linear", ops.linear(a, params[p + "self_attn.o_proj.weight"]))
            x = ops.add(x, a)
            h = tap(taps, t + "post_norm", "rms_norm",
                    ops.rms_norm(x, params[p + "post_attention_layernorm.weight"], self.rms_norm_eps))
            gate = ops.silu(ops.linear(h, params[p + "mlp.gate_proj.weight"]))
            m = tap(taps, t + "mlp_act", "silu", ops.mul(gate, ops.linear(h, params[p + "mlp.up_proj.weight"])))
            m = tap(taps, t + "mlp_out", "linear", ops.linear(m, params[p + "mlp.down_proj.weight"]))
            x = tap(taps, t + "out", "add", ops.add(x, m))
        if cache is not None:
            cache.length = past + s
        x = tap(taps, "final_norm", "rms_norm", ops.rms_norm(x, params["model.norm.weight"], self.rms_norm_eps))
        head = params["model.embed_tokens.weight" if self.tie_word_embeddings else "lm_head.weight"]
        return tap(taps, "logits", "linear", ops.linear(x, head))  # (b, s, vocab)
