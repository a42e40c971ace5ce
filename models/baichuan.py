"""Baichuan2-7B and Baichuan2-13B (`model_type: baichuan`, remote code), over the op set, with the parameter
names of the original checkpoints.

Both: MHA whose Q, K and V come from one fused `W_pack` projection without bias, [Q | K | V]; RMSNorm;
SwiGLU MLP with separate gate/up projections; NormHead: the logits use `lm_head.weight` with each row
divided by its L2 norm (the checkpoint stores the raw weight). No bias anywhere.
7B encodes positions with half-rotate RoPE (base 10000); 13B with ALiBi, the bias slope_h * j on key j
that its inference path adds (equal under softmax to the relative -slope_h * (i - j)).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from accel.errors import ModelError
from accel.models._layers import (
    KVCache,
    Model,
    Param,
    Params,
    alibi_slopes,
    attend,
    rope_inv_freq,
    rope_tables,
    split_fused,
    tap,
)


@dataclass(frozen=True)
class Baichuan(Model):
    model_type: ClassVar[str] = "baichuan"
    # Real sizes from the config.json of baichuan-inc/Baichuan2-7B-Base and Baichuan2-13B-Base.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "baichuan2-7b-tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                                  alibi=False),
        # 6 heads, not a power of two: the slopes take the interleave 13B's 40 heads take
        "baichuan2-13b-tiny": dict(vocab_size=256, hidden_size=48, intermediate_size=128, num_layers=2, num_heads=6,
                                   alibi=True),
        "baichuan2-7b": dict(vocab_size=125696, hidden_size=4096, intermediate_size=11008, num_layers=32,
                             num_heads=32, alibi=False),
        "baichuan2-13b": dict(vocab_size=125696, hidden_size=5120, intermediate_size=13696, num_layers=40,
                              num_heads=40, alibi=True),
    }

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    alibi: bool  # True: 13B (ALiBi); False: 7B (RoPE)
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], name: str) -> Baichuan:
        if cfg.get("vocab_size") == 64000:
            raise ModelError(f"{name}: Baichuan 1 checkpoints (vocab 64000, no NormHead) are not supported; "
                             "Baichuan2-7B and -13B are")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelError(f"{name}: hidden_act {cfg['hidden_act']!r} is not supported (Baichuan2 uses silu)")
        # 7B and 13B ship different modeling code under one model_type. Only 7B's reads
        # max_position_embeddings (its RoPE table), so its config.json carries the field and 13B's does
        # not; configs without it are told apart by width, as vLLM does (hidden_size 4096 is the 7B).
        rope = "max_position_embeddings" in cfg or cfg["hidden_size"] == 4096
        return cls(
            name=name,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            alibi=not rope,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        )

    def param_spec(self) -> dict[str, Param]:
        D, I = self.hidden_size, self.intermediate_size
        spec = {"model.embed_tokens.weight": Param((self.vocab_size, D))}
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            spec |= {
                p + "input_layernorm.weight": Param((D,), "norm"),
                p + "self_attn.W_pack.weight": Param((3 * D, D)),  # [Q | K | V]
                p + "self_attn.o_proj.weight": Param((D, D)),
                p + "post_attention_layernorm.weight": Param((D,), "norm"),
                p + "mlp.gate_proj.weight": Param((I, D)),
                p + "mlp.up_proj.weight": Param((I, D)),
                p + "mlp.down_proj.weight": Param((D, I)),
            }
        spec["model.norm.weight"] = Param((D,), "norm")
        spec["lm_head.weight"] = Param((self.vocab_size, D))
        return spec

    def forward(self, ops: Any, params: Params, input_ids: Any, cache: KVCache | None = None,
                taps: dict | None = None, training: bool = False) -> Any:
        b, s = input_ids.shape
        past = cache.length if cache is not None else 0
        D, h, eps = self.hidden_size, self.num_heads, self.rms_norm_eps
        x = tap(taps, "embed", "embedding", ops.embedding(params["model.embed_tokens.weight"], input_ids))  # (b, s, D)
        mask = cos = sin = None
        if self.alibi:
            # (h, 1, past + s): slope_h * j for every key j, the causal part left to attention
            mask = tap(taps, "alibi", "alibi_bias", ops.alibi_bias(ops.asarray(alibi_slopes(h), "float32"), past + s))
        else:
            cos, sin = rope_tables(ops, rope_inv_freq(self.head_dim, 10000.0), past, s, taps)  # (s, d/2)
        for i in range(self.num_layers):
            p, t = f"model.layers.{i}.", f"layers.{i}."
            hn = tap(taps, t + "input_norm", "rms_norm", ops.rms_norm(x, params[p + "input_layernorm.weight"], eps))
            qkv = ops.linear(hn, params[p + "self_attn.W_pack.weight"])  # (b, s, 3D)
            q, k, v = split_fused(ops, qkv, (D, D, D), (h, h, h))  # (b, s, h, d)
            tap(taps, t + "q", "split", q)
            tap(taps, t + "k", "split", k)
            if not self.alibi:
                q = tap(taps, t + "q_rope", "rope", ops.rope(q, cos, sin, "half"))
                k = tap(taps, t + "k_rope", "rope", ops.rope(k, cos, sin, "half"))
            a = attend(ops, q, k, v, layer=i, cache=cache, scale=self.head_dim**-0.5, mask=mask, taps=taps)
            a = tap(taps, t + "attn_out", "linear", ops.linear(a, params[p + "self_attn.o_proj.weight"]))
            x = ops.add(x, a)
            hn = tap(taps, t + "post_norm", "rms_norm",
                     ops.rms_norm(x, params[p + "post_attention_layernorm.weight"], eps))
            gate = ops.silu(ops.linear(hn, params[p + "mlp.gate_proj.weight"]))
            m = tap(taps, t + "mlp_act", "silu", ops.mul(gate, ops.linear(hn, params[p + "mlp.up_proj.weight"])))
            m = tap(taps, t + "mlp_out", "linear", ops.linear(m, params[p + "mlp.down_proj.weight"]))
            x = tap(taps, t + "out", "add", ops.add(x, m))
        if cache is not None:
            cache.length = past + s
        x = tap(taps, "final_norm", "rms_norm", ops.rms_norm(x, params["model.norm.weight"], eps))
        # NormHead: rows normalised in the weight's dtype, as the original does once at its first
        # inference call
        head = ops.l2_normalize(params["lm_head.weight"], axis=-1)
        return tap(taps, "logits", "linear", ops.linear(x, head))  # (b, s, vocab)
