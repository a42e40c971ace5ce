"""Qwen v1 (`model_type: qwen`, Qwen-7B/14B/72B, remote code) and Qwen2 (`model_type: qwen2`), over the op
set, with the parameter names of the original checkpoints.

Qwen v1: MHA whose Q, K and V come from one fused `c_attn` projection with a bias, [Q | K | V]; half-rotate
RoPE (rotary_pct of each head, base rotary_emb_base); RMSNorm; MLP c_proj(w1(x) * silu(w2(x))); an untied
lm_head. At inference it stretches past its training length `seq_length` with dynamic NTK (a larger RoPE
base, picked from the prompt length) and logn attention scaling (queries past seq_length grow).

Qwen2: GQA with q/k/v biases, half-rotate RoPE with theta from the config, RMSNorm, SwiGLU MLP with
separate gate/up projections, lm_head tied to the embedding or not.
"""

from __future__ import annotations

import math
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
    scale_positions,
    split_fused,
    split_heads,
    tap,
)


def ntk_alpha(length: int, seq_length: int) -> int:
    """Qwen v1's dynamic-NTK factor for a sequence of `length` tokens: 1 up to seq_length, then 3, 7, 15, ...
    as the length passes 1, 2, 4, ... times seq_length."""
    return max(2 ** math.ceil(math.log2(length / seq_length) + 1) - 1, 1)


def logn_factors(past: int, s: int, seq_length: int) -> np.ndarray:
    """Qwen v1's logn scale of the queries at positions past .. past + s - 1: log_{seq_length}(p + 1) past
    seq_length, else 1."""
    n = np.arange(past + 1, past + s + 1, dtype=np.float64)
    return np.where(n > seq_length, np.log(n) / math.log(seq_length), 1.0)


class NTKCache(KVCache):
    """The KV cache plus the dynamic-NTK factor its prefill picked."""

    ntk_alpha: int = 1


@dataclass(frozen=True)
class QWen(Model):
    model_type: ClassVar[str] = "qwen"
    # Real sizes from the config.json of Qwen/Qwen-7B (Sept 2023 revision), Qwen-14B and Qwen-72B.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # seq_length 8 makes the logn scaling act on test-length prompts; dynamic NTK stays off here
        # because its factor, frozen at prefill with the KV cache, differs by design from the one a
        # full recomputation picks once a generation crosses 2 * seq_length (tests cover it apart).
        "qwen-tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
                          kv_channels=16, seq_length=8, use_dynamic_ntk=False, use_logn_attn=True),
        "qwen-7b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_layers=32, num_heads=32,
                        kv_channels=128, seq_length=8192),
        "qwen-14b": dict(vocab_size=152064, hidden_size=5120, intermediate_size=27392, num_layers=40, num_heads=40,
                         kv_channels=128, seq_length=2048),
        "qwen-72b": dict(vocab_size=152064, hidden_size=8192, intermediate_size=49152, num_layers=80, num_heads=64,
                         kv_channels=128, seq_length=32768, rotary_emb_base=1000000.0, use_dynamic_ntk=False,
                         use_logn_attn=False),
    }

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # as in config.json: twice the width of w1 and w2
    num_layers: int
    num_heads: int
    kv_channels: int
    seq_length: int  # the training length that dynamic NTK and logn scaling extend
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000.0
    layer_norm_epsilon: float = 1e-6
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rot_dim(self) -> int:
        return self.kv_channels if self.rotary_pct == 1.0 else int(self.kv_channels * self.rotary_pct)

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], name: str) -> QWen:
        def field(key: str, old: str) -> Any:  # the first release wrote GPT-2 names (n_embd, ...)
            return cfg[key] if key in cfg else cfg[old]

        hidden, heads = field("hidden_size", "n_embd"), field("num_attention_heads", "n_head")
        kv_channels = cfg.get("kv_channels", 128)
        if kv_channels * heads != hidden:
            # c_attn is split in blocks of hidden_size but viewed as heads of kv_channels
            raise ModelError(f"{name}: kv_channels * num_attention_heads != hidden_size is not supported")
        if not cfg.get("no_bias", True):
            raise ModelError(f"{name}: biases on c_proj / w1 / w2 (no_bias: false) are not supported")
        if cfg.get("use_cache_quantization"):
            raise ModelError(f"{name}: the int8 KV cache (use_cache_quantization) is not supported")
        return cls(
            name=name,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=field("intermediate_size", "ffn_hidden_size"),
            num_layers=field("num_hidden_layers", "n_layer"),
            num_heads=heads,
            kv_channels=kv_channels,
            seq_length=cfg["seq_length"],  # QWenConfig has no default: the original needs it too
            rotary_pct=float(cfg.get("rotary_pct", 1.0)),
            rotary_emb_base=float(cfg.get("rotary_emb_base", 10000.0)),
            layer_norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-6)),
            use_dynamic_ntk=bool(cfg.get("use_dynamic_ntk", True)),
            use_logn_attn=bool(cfg.get("use_logn_attn", True)),
        )

    def new_cache(self) -> KVCache:
        return NTKCache(self.num_layers)

    def param_spec(self) -> dict[str, Param]:
        D, F = self.hidden_size, self.intermediate_size // 2
        spec = {"transformer.wte.weight": Param((self.vocab_size, D))}
        for i in range(self.num_layers):
            p = f"transformer.h.{i}."
            spec |= {
                p + "ln_1.weight": Param((D,), "norm"),
                p + "attn.c_attn.weight": Param((3 * D, D)),  # [Q | K | V]
                p + "attn.c_attn.bias": Param((3 * D,)),
                p + "attn.c_proj.weight": Param((D, D)),
                p + "ln_2.weight": Param((D,), "norm"),
                p + "mlp.w1.weight": Param((F, D)),
                p + "mlp.w2.weight": Param((F, D)),
                p + "mlp.c_proj.weight": Param((D, F)),
            }
        spec["transformer.ln_f.weight"] = Param((D,), "norm")
        spec["lm_head.weight"] = Param((self.vocab_size, D))
        return spec

    def forward(self, ops: Any, params: Params, input_ids: Any, cache: KVCache | None = None,
                taps: dict | None = None, training: bool = False) -> Any:
        b, s = input_ids.shape
        past = cache.length if cache is not None else 0
        D, h, eps = self.hidden_size, self.num_heads, self.layer_norm_epsilon
        x = tap(taps, "embed", "embedding", ops.embedding(params["transformer.wte.weight"], input_ids))  # (b, s, D)
        # Dynamic NTK: the factor is picked from the length of a forward without a past (the prompt) and
        # kept for every later step on that cache, so the cached keys stay consistent. Training uses
        # neither NTK nor logn scaling, as the original (`self.training`) does not.
        alpha = 1
        if self.use_dynamic_ntk and not training:
            alpha = getattr(cache, "ntk_alpha", 1) if past else ntk_alpha(s, self.seq_length)
            if cache is not None:
                cache.ntk_alpha = alpha  # type: ignore[attr-defined]
        base = self.rotary_emb_base * alpha ** (self.rot_dim / (self.rot_dim - 2))
        cos, sin = rope_tables(ops, rope_inv_freq(self.rot_dim, base), past, s, taps)  # (s, rot/2)
        logn = self.use_logn_attn and not training and past + s > self.seq_length
        for i in range(self.num_layers):
            p, t = f"transformer.h.{i}.", f"layers.{i}."
            hn = tap(taps, t + "input_norm", "rms_norm", ops.rms_norm(x, params[p + "ln_1.weight"], eps))
            qkv = ops.linear(hn, params[p + "attn.c_attn.weight"], params[p + "attn.c_attn.bias"])  # (b, s, 3D)
            q, k, v = split_fused(ops, qkv, (D, D, D), (h, h, h))  # (b, s, h, d)
            tap(taps, t + "q", "split", q)
            tap(taps, t + "k", "split", k)
            q = tap(taps, t + "q_rope", "rope", ops.rope(q, cos, sin, "half"))
            k = tap(taps, t + "k_rope", "rope", ops.rope(k, cos, sin, "half"))
            if logn:  # queries only, after RoPE
                q = scale_positions(ops, q, logn_factors(past, s, self.seq_length))
            a = attend(ops, q, k, v, layer=i, cache=cache, scale=self.head_dim**-0.5, taps=taps)  # (b, s, D)
            a = tap(taps, t + "attn_out", "linear", ops.linear(a, params[p + "attn.c_proj.weight"]))
            x = ops.add(x, a)
            hn = tap(taps, t + "post_norm", "rms_norm", ops.rms_norm(x, params[p + "ln_2.weight"], eps))
            # w2 is the gated branch, w1 the linear one
            gate = ops.silu(ops.linear(hn, params[p + "mlp.w2.weight"]))
            m = tap(taps, t + "mlp_act", "silu", ops.mul(ops.linear(hn, params[p + "mlp.w1.weight"]), gate))
            m = tap(taps, t + "mlp_out", "linear", ops.linear(m, params[p + "mlp.c_proj.weight"]))
            x = tap(taps, t + "out", "add", ops.add(x, m))
        if cache is not None:
            cache.length = past + s
        x = tap(taps, "final_norm", "rms_norm", ops.rms_norm(x, params["transformer.ln_f.weight"], eps))
        return tap(taps, "logits", "linear", ops.linear(x, params["lm_head.weight"]))  # (b, s, vocab)


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
                taps: dict | None = None, training: bool = False) -> Any:
        b, s = input_ids.shape
        past = cache.length if cache is not None else 0
        x = tap(taps, "embed", "embedding", ops.embedding(params["model.embed_tokens.weight"], input_ids))  # (b, s, D)
        cos, sin = rope_tables(ops, rope_inv_freq(self.head_dim, self.rope_theta), past, s, taps)
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
