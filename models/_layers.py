"""Blocks the model families share, written over the op set: the model base class with its parameter
spec, the KV cache, taps, RoPE tables, ALiBi slopes, and the attention core.

Shapes: b batch, s new tokens, t = past + s keys, h query heads, g kv heads, d head dim, D hidden.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np

Params = Mapping[str, Any]


@dataclass(frozen=True)
class Param:
    shape: tuple[int, ...]
    init: str = "normal"  # normal | norm (ones plus noise) | zeros | buffer (computed, not a parameter)


class KVCache:
    """Keys and values of the tokens seen so far, per layer, (b, t, g, d), after RoPE."""

    def __init__(self, num_layers: int):
        self.layers: list[tuple[Any, Any] | None] = [None] * num_layers
        self.length = 0  # tokens cached; advanced by the model at the end of a forward

    def update(self, ops: Any, layer: int, k: Any, v: Any) -> tuple[Any, Any]:
        past = self.layers[layer]
        if past is not None:
            k = ops.concat([past[0], k], axis=1)
            v = ops.concat([past[1], v], axis=1)
        self.layers[layer] = (k, v)
        return k, v


class Taps(dict):
    """Named intermediate outputs collected by a forward (`layers.3.attn`), with the op that produced
    each in `ops`, so a divergence can be traced to the first op that departs from the reference.
    `inject`: values the forward takes in place of what it computed at those taps (a layer run on the
    reference's own input to it, to measure that layer's error alone). `until`: the tap after which the
    forward stops, raising TapReached (an eager forward need not run past what is measured)."""

    def __init__(self, inject: dict[str, Any] | None = None, until: str | None = None) -> None:
        super().__init__()
        self.ops: dict[str, str] = {}
        self.inject: dict[str, Any] = inject or {}
        self.until = until


class TapReached(Exception):
    """An eager forward reached its Taps' `until` tap."""


def tap(taps: dict | None, name: str, op: str, x: Any) -> Any:
    if taps is not None:
        if isinstance(taps, Taps):
            x = taps.inject.get(name, x)
            taps.ops[name] = op
        taps[name] = x
        if isinstance(taps, Taps) and taps.until == name:
            raise TapReached(name)
    return x


class Model(ABC):
    """A model family is a frozen dataclass of hyperparameters (the config) plus the methods below;
    weights live apart, in a dict named as in the original checkpoint."""

    model_type: ClassVar[str] = ""
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    name: str
    vocab_size: int
    num_layers: int

    @classmethod
    def preset(cls, name: str) -> Model:
        return cls(name=name, **cls.PRESETS[name])

    @classmethod
    @abstractmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], name: str) -> Model:
        ...

    @abstractmethod
    def param_spec(self) -> dict[str, Param]:
        ...

    @abstractmethod
    def forward(self, ops: Any, params: Params, input_ids: Any, cache: KVCache | None = None,
                taps: dict | None = None, training: bool = False) -> Any:
        ...

    def new_cache(self) -> KVCache:
        return KVCache(self.num_layers)

    def num_parameters(self) -> int:
        return sum(math.prod(p.shape) for p in self.param_spec().values() if p.init != "buffer")

    def buffers(self) -> dict[str, np.ndarray]:
        """Values of the buffers in the spec (e.g. a rotary inv_freq the checkpoint carries)."""
        return {}

    def init_params(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Seeded random float32 weights. Norm weights scatter around 1 and biases are non-zero so that
        a model which ignores either computes something visibly different."""
        rng = np.random.default_rng(seed)
        buffers = self.buffers()
        out = {}
        for name, p in self.param_spec().items():
            if p.init == "buffer":
                out[name] = buffers[name]
            elif p.init == "norm":
                out[name] = (1.0 + 0.1 * rng.standard_normal(p.shape)).astype(np.float32)
            elif p.init == "zeros":
                out[name] = np.zeros(p.shape, np.float32)
            else:
                out[name] = (0.02 * rng.standard_normal(p.shape)).astype(np.float32)
        return out

    def config_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]


# --- position encodings ---------------------------------------------------------------------------


def rope_inv_freq(rot_dim: int, base: float) -> np.ndarray:
    """inv_freq[i] = base ** (-2i / rot_dim), i < rot_dim / 2, in float32 as the HF models compute it."""
    return (1.0 / (base ** (np.arange(0, rot_dim, 2, dtype=np.int64).astype(np.float32) / rot_dim))).astype(np.float32)


def rope_tables(ops: Any, inv_freq: np.ndarray | Any, past: int, s: int,
                taps: dict | None = None) -> tuple[Any, Any]:
    """cos/sin (s, rot/2) for positions past .. past + s - 1 (tapped as "rope": the cos table)."""
    positions = ops.asarray(np.arange(past, past + s, dtype=np.int64), "int64")
    if isinstance(inv_freq, np.ndarray):
        inv_freq = ops.asarray(inv_freq, "float32")
    cos, sin = ops.rope_cache(positions, inv_freq)
    tap(taps, "rope", "rope_cache", cos)
    return cos, sin


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi slopes (Press et al.): for n a power of two, 2 ** (-8 (i + 1) / n). Otherwise the slopes of
    the nearest lower power of two n0, followed by every other slope of 2 * n0 (the even-indexed
    ones), as many as are missing: the interleave Baichuan2-13B uses for its 40 heads."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_two(num_heads)
    else:
        n0 = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two(n0) + power_of_two(2 * n0)[0::2][: num_heads - n0]
    return np.asarray(slopes, dtype=np.float32)


# --- attention core -------------------------------------------------------------------------------


def attend(ops: Any, q: Any, k: Any, v: Any, *, layer: int, cache: KVCache | None, scale: float,
           mask: Any = None, taps: dict | None = None) -> Any:
    """q (b, s, h, d), k/v (b, s, g, d) after RoPE: cache, causal attention, heads merged to
    (b, s, h * d)."""
    if cache is not None:
        k, v = cache.update(ops, layer, k, v)  # (b, t, g, d)
    out = ops.attention(q, k, v, scale=scale, causal=True, mask=mask)  # (b, s, h, d)
    tap(taps, f"layers.{layer}.attn", "attention", out)
    b, s, h, d = out.shape
    return ops.reshape(out, (b, s, h * d))


def split_heads(ops: Any, x: Any, heads: int) -> Any:
    b, s, width = x.shape
    return ops.reshape(x, (b, s, heads, width // heads))  # (b, s, heads, d)


def split_fused(ops: Any, x: Any, sizes: tuple[int, ...], heads: tuple[int, ...]) -> list[Any]:
    """A fused projection (b, s, sum(sizes)) as stored ([Q | K | V] blocks side by side) split into its
    blocks, each viewed as (b, s, heads_i, d)."""
    return [split_heads(ops, part, n) for part, n in zip(ops.split(x, list(sizes), axis=-1), heads)]


def scale_positions(ops: Any, x: Any, factors: np.ndarray) -> Any:
    """x (b, s, h, d) times factors[p] (s,) at each position p, computed in x's dtype. The op set has no
    "cast to the dtype of x", so the product goes through rope with tables cos = factor, sin = 0, which
    is exactly that multiplication with the factor cast to x's dtype (what `.type_as(query)` does
    before Qwen's logn scaling)."""
    half = x.shape[-1] // 2
    cos = np.repeat(np.asarray(factors, np.float32)[:, None], half, axis=1)  # (s, d/2)
    return ops.rope(x, ops.asarray(cos, "float32"), ops.asarray(np.zeros_like(cos), "float32"), "half")
