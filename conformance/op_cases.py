"""Inputs of the op-level cases: for every op in accel.ops, a few shapes (odd sizes included), drawn
from a seeded generator. Float inputs are rounded to the case dtype before both the target and the
float64 oracle see them, so the comparison measures the op, not the rounding of its inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from accel.ops import OP_NAMES


@dataclass(frozen=True)
class OpCase:
    op: str
    shape: str  # a short label of the variant ("small", "odd", "gqa", ...)
    make: Callable[[np.random.Generator], tuple[list[Any], dict[str, Any]]]
    exact: bool = False  # data movement: bit-exact at any dtype


def _n(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return rng.standard_normal(shape) * scale


def _attention(b: int, sq: int, skv: int, hq: int, hkv: int, d: int, mask: bool = False):
    def make(rng):
        kwargs: dict[str, Any] = {"scale": d**-0.5, "causal": True}
        if mask:
            kwargs["mask"] = _n(rng, hq, sq, skv, scale=0.5)
        return [_n(rng, b, sq, hq, d), _n(rng, b, skv, hkv, d), _n(rng, b, skv, hkv, d)], kwargs
    return make


def _rope(style: str, s: int, h: int, d: int, rot: int):
    def make(rng):
        angle = np.arange(s)[:, None] * (10000.0 ** (-np.arange(0, rot, 2) / rot))[None, :]
        return [_n(rng, 2, s, h, d), np.cos(angle), np.sin(angle), style], {}
    return make


CASES: list[OpCase] = [
    OpCase("embedding", "small", lambda r: ([_n(r, 50, 16), r.integers(0, 50, (2, 7))], {}), exact=True),
    OpCase("linear", "bias", lambda r: ([_n(r, 2, 5, 24), _n(r, 40, 24, scale=0.2), _n(r, 40)], {})),
    OpCase("linear", "odd", lambda r: ([_n(r, 3, 7, 33), _n(r, 17, 33, scale=0.2)], {})),
    OpCase("matmul", "batched", lambda r: ([_n(r, 3, 5, 24), _n(r, 3, 24, 9)], {})),
    OpCase("matmul", "broadcast", lambda r: ([_n(r, 2, 3, 7, 13), _n(r, 13, 5)], {})),
    OpCase("add", "broadcast", lambda r: ([_n(r, 3, 7, 33), _n(r, 33)], {})),
    OpCase("add", "scalar", lambda r: ([_n(r, 5, 9), 0.75], {})),
    OpCase("sub", "broadcast", lambda r: ([_n(r, 3, 7, 33), _n(r, 7, 1)], {})),
    OpCase("mul", "broadcast", lambda r: ([_n(r, 3, 7, 33), _n(r, 33)], {})),
    OpCase("mul", "scalar", lambda r: ([_n(r, 5, 9), -1.5], {})),
    OpCase("div", "odd", lambda r: ([_n(r, 5, 9), 1.5 + np.abs(_n(r, 5, 9))], {})),
    OpCase("sqrt", "odd", lambda r: ([np.abs(_n(r, 7, 13)) + 0.1], {})),
    OpCase("sum", "axis", lambda r: ([_n(r, 4, 9, 33)], {"axis": -1, "keepdims": True})),
    OpCase("sum", "all", lambda r: ([_n(r, 5, 17)], {})),
    OpCase("mean", "axis", lambda r: ([_n(r, 4, 9, 33)], {"axis": 1})),
    OpCase("rms_norm", "small", lambda r: ([_n(r, 2, 5, 64), 1 + 0.1 * _n(r, 64), 1e-6], {})),
    OpCase("rms_norm", "odd", lambda r: ([_n(r, 3, 7, 33, scale=3.0), 1 + 0.1 * _n(r, 33), 1e-5], {})),
    OpCase("layer_norm", "odd", lambda r: ([_n(r, 3, 7, 33, scale=2.0) + 1, 1 + 0.1 * _n(r, 33), _n(r, 33), 1e-5], {})),
    OpCase("l2_normalize", "rows", lambda r: ([_n(r, 37, 24)], {"axis": -1})),
    OpCase("rope_cache", "small", lambda r: ([np.arange(3, 14), 10000.0 ** (-np.arange(0, 16, 2) / 16)], {})),
    OpCase("rope", "half", _rope("half", 9, 3, 16, 16)),
    OpCase("rope", "half-partial", _rope("half", 7, 2, 24, 8)),
    OpCase("rope", "interleaved", _rope("interleaved", 9, 3, 16, 16)),
    OpCase("rope", "interleaved-partial", _rope("interleaved", 7, 2, 16, 8)),
    OpCase("alibi_bias", "odd", lambda r: ([np.abs(_n(r, 5)) * 0.5, 11], {})),
    OpCase("attention", "mha", _attention(2, 8, 8, 4, 4, 16)),
    OpCase("attention", "gqa-odd", _attention(1, 7, 7, 6, 2, 12)),
    OpCase("attention", "mqa-cached", _attention(1, 3, 11, 4, 1, 16)),
    OpCase("attention", "decode", _attention(2, 1, 9, 4, 2, 16)),
    OpCase("attention", "mask", _attention(1, 6, 6, 4, 4, 8, mask=True)),
    OpCase("silu", "odd", lambda r: ([_n(r, 7, 13, scale=3.0)], {})),
    OpCase("gelu", "exact", lambda r: ([_n(r, 7, 13, scale=2.0)], {})),
    OpCase("gelu", "tanh", lambda r: ([_n(r, 7, 13, scale=2.0)], {"approximate": "tanh"})),
    OpCase("swiglu", "odd", lambda r: ([_n(r, 3, 5, 2 * 19, scale=2.0)], {})),
    OpCase("softmax", "odd", lambda r: ([_n(r, 3, 7, 33, scale=3.0)], {"axis": -1})),
    OpCase("softmax", "axis0", lambda r: ([_n(r, 9, 5, scale=3.0)], {"axis": 0})),
    OpCase("log_softmax", "odd", lambda r: ([_n(r, 3, 7, 33, scale=3.0)], {"axis": -1})),
    OpCase("cross_entropy", "masked", lambda r: ([_n(r, 13, 37, scale=2.0),
                                                  np.where(r.random(13) < 0.3, -100, r.integers(0, 37, 13))], {})),
    OpCase("reshape", "odd", lambda r: ([_n(r, 3, 7, 10)], {"shape": (21, -1)}), exact=True),
    OpCase("transpose", "odd", lambda r: ([_n(r, 3, 7, 5, 2)], {"axes": (0, 2, 1, 3)}), exact=True),
    OpCase("concat", "odd", lambda r: ([[_n(r, 3, 4, 5), _n(r, 3, 1, 5), _n(r, 3, 6, 5)]], {"axis": 1}), exact=True),
    OpCase("split", "odd", lambda r: ([_n(r, 3, 11, 5), [4, 2, 5]], {"axis": 1}), exact=True),
    OpCase("where", "broadcast", lambda r: ([r.random((4, 7)) < 0.5, _n(r, 4, 7), _n(r, 7)], {}), exact=True),
    OpCase("cast", "to-float32", lambda r: ([_n(r, 5, 9)], {"dtype": "float32"}), exact=True),
]

assert {c.op for c in CASES} == set(OP_NAMES), "every op needs an op-level case"
