"""The op set: the closed list of operations the models are written in.

Each op is documented here, once, and carries its NumPy float64 reference implementation, which is
the oracle of the op-level conformance cases and the body of the `numpy:cpu` backend. Backends
implement the same names with the same signatures and do not restate these docstrings.

Conventions shared by every op:
- Arrays are the backend's own tensors. Float inputs of one op share one dtype; the result has that
  dtype unless the op says otherwise. "Low precision" means float16 or bfloat16.
- Where an op says "accumulates in float32", a backend must compute the reduction in at least
  float32 for low-precision inputs (the reference computes everything in float64).
- Elementwise ops broadcast as NumPy does, and their second operand may be a Python scalar.
- Attention tensors use the (batch, seq, heads, head_dim) layout, the one the models produce after
  splitting heads and the one fused attention kernels accept as "BSND".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from accel.dtypes import to_numpy_dtype


@dataclass(frozen=True)
class OpSpec:
    name: str
    reference: Callable[..., Any]
    doc: str


OPS: dict[str, OpSpec] = {}


def _op(fn: Callable[..., Any]) -> Callable[..., Any]:
    OPS[fn.__name__] = OpSpec(fn.__name__, fn, (fn.__doc__ or "").strip())
    return fn


def _f64(x: Any) -> Any:
    """Float arrays (any precision, bfloat16 included) to float64; ints, bools and scalars as they are."""
    # ml_dtypes' bfloat16 has kind "V"
    if isinstance(x, np.ndarray) and x.dtype.kind in "fV":
        return np.asarray(x, dtype=np.float64)
    return x


# --- lookup and linear algebra ------------------------------------------------------------------


@_op
def embedding(weight, ids):
    """Rows of `weight` (vocab, dim) picked by the integer array `ids` (...): result (..., dim)."""
    return _f64(np.asarray(weight)[np.asarray(ids)])  # the rows, then the cast: never the table in float64


@_op
def linear(x, weight, bias=None):
    """x (..., in) @ weight.T + bias, with `weight` (out, in) as PyTorch and HF checkpoints store it
    and `bias` (out,) optional. Result (..., out)."""
    x = _f64(x)
    if isinstance(weight, np.ndarray) and weight.dtype != np.float64 and weight.size > _CAST_BLOCK:
        # A low-precision weight given as it is stored (a checkpoint's mapping) is cast a block of rows
        # at a time, so the reference never holds a float64 copy of a large weight (an lm_head of 152k
        # rows is 4.4 GB at float64 for Qwen2-7B)
        rows = max(1, _CAST_BLOCK // weight.shape[1])
        y = np.concatenate([x @ _f64(weight[i:i + rows]).T for i in range(0, weight.shape[0], rows)], axis=-1)
    else:
        y = x @ _f64(weight).T
    return y if bias is None else y + _f64(bias)


_CAST_BLOCK = 1 << 24  # elements of a weight cast to float64 at once by `linear` (128 MB)


@_op
def matmul(a, b):
    """Batched matrix product with NumPy broadcasting of the leading dims (np.matmul)."""
    return _f64(a) @ _f64(b)


# --- elementwise and reductions -----------------------------------------------------------------


@_op
def add(a, b):
    """a + b, broadcasting; `b` may be a Python scalar."""
    return _f64(a) + _f64(b)


@_op
def sub(a, b):
    """a - b, broadcasting; `b` may be a Python scalar."""
    return _f64(a) - _f64(b)


@_op
def mul(a, b):
    """a * b, broadcasting; `b` may be a Python scalar."""
    return _f64(a) * _f64(b)


@_op
def div(a, b):
    """a / b, broadcasting; `b` may be a Python scalar."""
    return _f64(a) / _f64(b)


@_op
def sqrt(x):
    """Elementwise square root."""
    return np.sqrt(_f64(x))


@_op
def sum(x, axis=None, keepdims=False):  # noqa: A001 - the op's name
    """Sum over `axis` (int, tuple or None for all), accumulating in float32 at least."""
    return np.sum(_f64(x), axis=axis, keepdims=keepdims)


@_op
def mean(x, axis=None, keepdims=False):
    """Mean over `axis` (int, tuple or None for all), accumulating in float32 at least."""
    return np.mean(_f64(x), axis=axis, keepdims=keepdims)


# --- normalisation ------------------------------------------------------------------------------


@_op
def rms_norm(x, weight, eps):
    """RMSNorm over the last dim: x / sqrt(mean(x**2) + eps) * weight. Low-precision inputs are
    normalised in float32 and cast back to x's dtype before the multiplication by `weight`, as the
    HF Qwen2/Baichuan RMSNorm does."""
    x = _f64(x)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * _f64(weight)


@_op
def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last dim: (x - mean) / sqrt(var + eps) * weight + bias (biased variance),
    accumulating in float32."""
    x = _f64(x)
    mu = np.mean(x, axis=-1, keepdims=True)
    var = np.mean((x - mu) ** 2, axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * _f64(weight) + _f64(bias)


@_op
def l2_normalize(x, axis=-1, eps=1e-12):
    """x / max(||x||_2, eps) along `axis` (torch.nn.functional.normalize): Baichuan's NormHead."""
    x = _f64(x)
    return x / np.maximum(np.sqrt(np.sum(x * x, axis=axis, keepdims=True)), eps)


# --- position encodings -------------------------------------------------------------------------


@_op
def rope_cache(positions, inv_freq):
    """Rotary tables for integer `positions` (seq,) and `inv_freq` (rot/2,): returns (cos, sin), each
    (seq, rot/2) with angle[s, i] = positions[s] * inv_freq[i]. Backends compute in float32 (float64
    when inv_freq is float64)."""
    angle = np.asarray(positions, dtype=np.float64)[:, None] * _f64(inv_freq)[None, :]
    return np.cos(angle), np.sin(angle)


@_op
def rope(x, cos, sin, style):
    """Rotary position embedding of x (batch, seq, heads, dim) with tables (seq, rot/2) from
    `rope_cache`; only the first rot = 2 * cos.shape[-1] dims of each head rotate, the rest pass.

    style "half" (LLaMA, Qwen, Baichuan-7B): pairs (x[i], x[i + rot/2]) for i < rot/2.
    style "interleaved" (ChatGLM2/3): pairs (x[2i], x[2i + 1]).
    Each pair (a, b) becomes (a cos - b sin, b cos + a sin). The tables are cast to x's dtype and the
    rotation computed in that dtype, as the HF implementations do."""
    x = _f64(x)
    cos = _f64(cos)[None, :, None, :]  # (1, seq, 1, rot/2)
    sin = _f64(sin)[None, :, None, :]
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    if style == "half":
        a, b = rot[..., :half], rot[..., half:]
        out = np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    elif style == "interleaved":
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = np.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(rot.shape)
    else:
        raise ValueError(f"unknown rope style {style!r}")
    return np.concatenate([out, rest], axis=-1)


@_op
def alibi_bias(slopes, kv_len):
    """ALiBi additive bias (heads, 1, kv_len): slopes[h] * j for key position j. Adding a per-row
    constant does not change softmax, so this equals the relative form slopes[h] * (j - i) under a
    causal mask; it is the form Baichuan2-13B computes. Float32 (float64 when slopes are)."""
    return _f64(slopes)[:, None, None] * np.arange(kv_len, dtype=np.float64)[None, None, :]


# --- attention ----------------------------------------------------------------------------------


@_op
def attention(q, k, v, *, scale, causal=True, mask=None):
    """Scaled dot-product attention. q (b, sq, hq, d), k (b, skv, hkv, d), v (b, skv, hkv, dv),
    hq a multiple of hkv: query head h reads kv head h // (hq // hkv) (GQA/MQA). scores = q k^T *
    scale + mask, with `mask` additive and broadcastable to (b, hq, sq, skv). With `causal`, query i
    sits at absolute position skv - sq + i (the keys before it come from a KV cache) and sees keys
    j <= that position. Softmax accumulates in float32. Result (b, sq, hq, dv)."""
    q, k, v = _f64(q), _f64(k), _f64(v)
    sq, hq = q.shape[1], q.shape[2]
    skv, hkv = k.shape[1], k.shape[2]
    k = np.repeat(k, hq // hkv, axis=2)
    v = np.repeat(v, hq // hkv, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if mask is not None:
        scores = scores + _f64(mask)
    if causal:
        visible = np.arange(skv)[None, :] <= np.arange(sq)[:, None] + (skv - sq)
        scores = np.where(visible, scores, -np.inf)
    return np.einsum("bhqk,bkhd->bqhd", softmax(scores, axis=-1), v)


# --- activations --------------------------------------------------------------------------------


@_op
def silu(x):
    """x * sigmoid(x)."""
    x = _f64(x)
    return x / (1.0 + np.exp(-x))


@_op
def gelu(x, approximate="none"):
    """GELU: exact x * Phi(x) ("none") or the tanh approximation ("tanh")."""
    x = _f64(x)
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
    from math import erf

    return 0.5 * x * (1.0 + np.vectorize(erf)(x / np.sqrt(2.0)))


@_op
def swiglu(x):
    """SwiGLU on a fused [gate | up] last dim of size 2n: silu(x[..., :n]) * x[..., n:]."""
    x = _f64(x)
    n = x.shape[-1] // 2
    return silu(x[..., :n]) * x[..., n:]


@_op
def softmax(x, axis=-1):
    """Softmax along `axis`, accumulating in float32; rows that are all -inf give NaN."""
    x = _f64(x)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


@_op
def log_softmax(x, axis=-1):
    """log(softmax(x)) along `axis`, computed stably, accumulating in float32."""
    x = _f64(x)
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


@_op
def cross_entropy(logits, labels, ignore_index=-100):
    """Mean token cross-entropy. logits (n, vocab), labels (n,) integers; positions whose label is
    `ignore_index` count for nothing. Result: a float32 scalar (0-d); 0 when every label is
    ignored. Accumulates in float32 (float64 for float64 logits)."""
    logp = log_softmax(logits, axis=-1)
    labels = np.asarray(labels)
    keep = labels != ignore_index
    if not keep.any():
        return np.float64(0.0)
    picked = logp[np.arange(labels.shape[0])[keep], labels[keep]]
    return -np.mean(picked)


# --- shape and selection ------------------------------------------------------------------------


@_op
def reshape(x, shape):
    """View of x with `shape` (a tuple; one entry may be -1)."""
    return np.reshape(_f64(x), shape)


@_op
def transpose(x, axes):
    """Permutation of the dims by `axes` (a full permutation tuple)."""
    return np.transpose(_f64(x), axes)


@_op
def concat(xs, axis):
    """Concatenation of the sequence `xs` along `axis`."""
    return np.concatenate([_f64(x) for x in xs], axis=axis)


@_op
def split(x, sizes, axis):
    """Split x along `axis` into consecutive pieces of the given `sizes` (which sum to that dim);
    returns a list."""
    bounds = np.cumsum(sizes)[:-1]
    return np.split(_f64(x), bounds, axis=axis)


@_op
def where(cond, a, b):
    """Elementwise select: a where `cond` (bool) is true, else b; broadcasting."""
    return np.where(np.asarray(cond, dtype=bool), _f64(a), _f64(b))


@_op
def cast(x, dtype):
    """x converted to the dtype named by `dtype` ("float32", "bfloat16", "int64", ...), rounding
    to nearest even."""
    return np.asarray(x).astype(to_numpy_dtype(dtype))


OP_NAMES: tuple[str, ...] = tuple(OPS)


def reference(name: str) -> Callable[..., Any]:
    return OPS[name].reference

