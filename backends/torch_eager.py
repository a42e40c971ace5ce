"""`torch:cpu`, `torch:cuda[:i]`, `torch:npu[:i]`: eager PyTorch.

Attention runs through SDPA on cpu/cuda. On npu, rms_norm, rope, attention and swiglu go to
torch_npu's fused kernels (npu_rms_norm, npu_rotary_mul, npu_fusion_attention, npu_swiglu) when
torch_npu imports; the composites stay selectable through the routing policy.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from functools import lru_cache
from typing import Any, ClassVar

import ml_dtypes
import numpy as np

from accel.backend import BackendBase, Capabilities, impls
from accel.errors import BackendUnavailable
from accel.routing import Impl

# Once torch_npu is installed, torch's device-backend autoload imports it inside `import torch`, and
# that import fails on a machine without CANN. We import torch_npu ourselves, only for npu targets.
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

try:
    import torch
    import torch.nn.functional as F
except ImportError as e:  # pragma: no cover - torch is a core dependency
    raise BackendUnavailable(f"torch cannot be imported ({e}); pip install torch") from None

_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_LOW = (torch.float16, torch.bfloat16)


def _acc(x):
    """x in its accumulation dtype: float32 for low precision, else itself."""
    return x.float() if x.dtype in _LOW else x
_COLLECTIVES = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


@lru_cache(maxsize=1)
def _torch_npu() -> tuple[Any, str | None]:
    """(module, None) when torch_npu imports, else (None, why not)."""
    if importlib.util.find_spec("torch_npu") is None:
        return None, "torch_npu is not installed (Ascend machines with CANN: pip install 'accel-port[npu]')"
    try:
        import torch_npu
    except Exception as e:  # CANN's shared libraries missing raises ImportError or OSError
        return None, f"torch_npu is installed but cannot be imported ({str(e).splitlines()[0]}); is CANN set up?"
    return torch_npu, None


# --- composite implementations ------------------------------------------------------------------


def embedding(weight, ids):
    return F.embedding(ids, weight)


def linear(x, weight, bias=None):
    return F.linear(x, weight, bias)


def matmul(a, b):
    return torch.matmul(a, b)


def add(a, b):
    return torch.add(a, b)


def sub(a, b):
    return torch.sub(a, b)


def mul(a, b):
    return torch.mul(a, b)


def div(a, b):
    return torch.div(a, b)


def sqrt(x):
    return torch.sqrt(x)


def sum(x, axis=None, keepdims=False):  # noqa: A001
    acc = _acc(x)
    out = acc.sum() if axis is None else acc.sum(dim=axis, keepdim=keepdims)
    return out.to(x.dtype)


def mean(x, axis=None, keepdims=False):
    acc = _acc(x)
    out = acc.mean() if axis is None else acc.mean(dim=axis, keepdim=keepdims)
    return out.to(x.dtype)


def rms_norm(x, weight, eps):
    acc = _acc(x)
    normed = acc * torch.rsqrt(acc.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def l2_normalize(x, axis=-1, eps=1e-12):
    return F.normalize(x, dim=axis, eps=eps)


def rope_cache(positions, inv_freq):
    dt = torch.float64 if inv_freq.dtype == torch.float64 else torch.float32
    angle = positions.to(dt)[:, None] * inv_freq.to(dt)[None, :]
    return torch.cos(angle), torch.sin(angle)


def rope(x, cos, sin, style):
    half = cos.shape[-1]
    cos = cos.to(x.dtype)[None, :, None, :]  # (1, s, 1, rot/2)
    sin = sin.to(x.dtype)[None, :, None, :]
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    if style == "half":
        a, b = rot[..., :half], rot[..., half:]
        out = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    elif style == "interleaved":
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    else:
        raise ValueError(f"unknown rope style {style!r}")
    return out if rest.shape[-1] == 0 else torch.cat([out, rest], dim=-1)


def alibi_bias(slopes, kv_len):
    dt = torch.float64 if slopes.dtype == torch.float64 else torch.float32
    positions = torch.arange(kv_len, device=slopes.device, dtype=dt)
    return slopes.to(dt)[:, None, None] * positions[None, None, :]


def _visible(sq: int, skv: int, device) -> torch.Tensor:
    """(sq, skv) bool, True where query i (at absolute position skv - sq + i) may see key j."""
    return torch.ones(sq, skv, dtype=torch.bool, device=device).tril(skv - sq)


def attention_sdpa(q, k, v, *, scale, causal=True, mask=None):
    sq, skv = q.shape[1], k.shape[1]
    attn_mask, is_causal = None, False
    if causal and sq > 1:
        if mask is None and sq == skv:
            is_causal = True
        else:
            visible = _visible(sq, skv, q.device)
            attn_mask = visible if mask is None else mask.to(q.dtype).masked_fill(~visible, float("-inf"))
    elif mask is not None:
        attn_mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (b, heads, s, d)
        attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=bool(q.shape[2] != k.shape[2]),
    )
    return out.transpose(1, 2)


def attention(q, k, v, *, scale, causal=True, mask=None):
    sq, hq, skv, hkv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    k = k.repeat_interleave(hq // hkv, dim=2)
    v = v.repeat_interleave(hq // hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if mask is not None:
        scores = scores + mask.to(scores.dtype)
    if causal:
        scores = scores.masked_fill(~_visible(sq, skv, q.device), float("-inf"))
    probs = torch.softmax(_acc(scores), dim=-1).to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def silu(x):
    return F.silu(x)


def gelu(x, approximate="none"):
    return F.gelu(x, approximate=approximate)


def swiglu(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def softmax(x, axis=-1):
    return torch.softmax(_acc(x), dim=axis).to(x.dtype)


def log_softmax(x, axis=-1):
    return torch.log_softmax(_acc(x), dim=axis).to(x.dtype)


def cross_entropy(logits, labels, ignore_index=-100):
    labels = labels.long()
    total = F.cross_entropy(_acc(logits), labels, ignore_index=ignore_index, reduction="sum")
    # no data-dependent branch, so the same code traces under torch.compile and export; maximum, not
    # clamp(min=1), whose open upper bound TVM's importer cannot represent for an integer tensor
    count = (labels != ignore_index).sum()
    return total / torch.maximum(count, torch.ones_like(count))


def reshape(x, shape):
    return torch.reshape(x, shape)


def transpose(x, axes):
    return x.permute(*axes)


def concat(xs, axis):
    return torch.cat(list(xs), dim=axis)


def split(x, sizes, axis):
    return list(torch.split(x, list(sizes), dim=axis))


def where(cond, a, b):
    return torch.where(cond.bool(), a, b)


def cast(x, dtype):
    return x.to(_DTYPES[dtype])


# --- torch_npu fused kernels (Ascend) -------------------------------------------------------------


def rms_norm_npu(x, weight, eps):
    return _torch_npu()[0].npu_rms_norm(x, weight, epsilon=eps)[0]


def rope_npu(x, cos, sin, style):
    # npu_rotary_mul wants full-width tables, 4-D (1, s, 1, rot) for BSND: "half" repeats them
    # block-wise, "interleave" element-wise; it rotates the whole last dim, so a partial rotary
    # (ChatGLM rotates half of each head) splits the rest off first.
    half = cos.shape[-1]
    if style == "half":
        cos_full, sin_full, mode = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1), "half"
    else:
        cos_full, sin_full, mode = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1), "interleave"
    cos_full = cos_full.to(x.dtype)[None, :, None, :]
    sin_full = sin_full.to(x.dtype)[None, :, None, :]
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    out = _torch_npu()[0].npu_rotary_mul(rot.contiguous(), cos_full, sin_full, rotary_mode=mode)
    return out if rest.shape[-1] == 0 else torch.cat([out, rest], dim=-1)


_NPU_CAUSAL_MASK: dict[Any, torch.Tensor] = {}


def attention_npu(q, k, v, *, scale, causal=True, mask=None):
    # npu_fusion_attention computes softmax(scale * (pse + q k^T)) with atten_mask True = masked.
    # sparse_mode=3 is the right-down causal mask (query i at position skv - sq + i), given as the
    # compressed 2048x2048 upper triangle the kernel documents.
    tnpu = _torch_npu()[0]
    kwargs: dict[str, Any] = {}
    if causal and q.shape[1] > 1:
        if q.device not in _NPU_CAUSAL_MASK:
            _NPU_CAUSAL_MASK[q.device] = torch.ones(2048, 2048, dtype=torch.bool, device=q.device).triu(1)
        kwargs.update(atten_mask=_NPU_CAUSAL_MASK[q.device], sparse_mode=3)
    if mask is not None:
        b, heads = q.shape[0], q.shape[2]
        pse = (mask.to(torch.float32) / scale).to(q.dtype)
        kwargs["pse"] = pse.expand(b if pse.dim() == 4 and pse.shape[0] == b else 1, heads, q.shape[1], k.shape[1])
    return tnpu.npu_fusion_attention(q, k, v, q.shape[2], "BSND", scale=scale, **kwargs)[0]


def swiglu_npu(x):
    return _torch_npu()[0].npu_swiglu(x, dim=-1)


class TorchBackend(BackendBase):
    name: ClassVar[str] = "torch"
    device_kinds: ClassVar[tuple[str, ...]] = ("cpu", "cuda", "npu")

    def __init__(self, device: str, policy=None):
        kind, _, index = device.partition(":")
        self.torch_device = torch.device(kind if kind != "npu" else "npu", int(index) if index else 0) \
            if kind != "cpu" else torch.device("cpu")
        self.kind = kind
        super().__init__(device, policy)

    @classmethod
    def probe(cls, device: str) -> str | None:
        kind, _, index = device.partition(":")
        if kind == "cpu":
            return None if not index else "torch:cpu takes no device index"
        if kind == "cuda":
            if torch.version.cuda is None:
                return f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch"
            if not torch.cuda.is_available():
                return "no CUDA device or driver found (torch.cuda.is_available() is False)"
            count = torch.cuda.device_count()
        elif kind == "npu":
            module, reason = _torch_npu()
            if module is None:
                return reason
            if not torch.npu.is_available():
                return "torch_npu imports but finds no Ascend device (torch.npu.is_available() is False)"
            count = torch.npu.device_count()
        else:
            return f"torch has no device kind {kind!r}"
        if index and int(index) >= count:
            return f"{kind}:{index} does not exist: {count} {kind} device(s) here"
        return None

    def implementations(self) -> dict[str, list[Impl]]:
        table = {name: impls(composite=fn) for name, fn in _COMPOSITES.items()}
        table["attention"] = impls(sdpa=attention_sdpa, composite=attention)
        on_npu = self.kind == "npu" and _torch_npu()[0] is not None
        why_not = None if on_npu else "needs torch_npu on an npu device"
        for name, fn in _NPU_FUSED.items():
            table[name] = [Impl("fused", fn, why_not), *table[name]]
        return table

    def capabilities(self) -> Capabilities:
        dtypes = ("float32", "float16", "bfloat16", "float64") if self.kind == "cpu" \
            else ("float32", "float16", "bfloat16")
        versions = {"torch": torch.__version__}
        if self.kind == "cuda":
            versions["cuda"] = str(torch.version.cuda)
        if self.kind == "npu":
            versions["torch_npu"] = getattr(_torch_npu()[0], "__version__", "?")
        fused = tuple(op for op, variant in self.ops.routes.items() if variant in ("fused", "sdpa"))
        return Capabilities(dtypes, training=True, collectives=_COLLECTIVES[self.kind], fused_ops=fused,
                            versions=versions)

    def asarray(self, a: Any, dtype: str | None = None) -> torch.Tensor:
        a = np.asarray(a)
        # Alias a writeable C-contiguous array (a checkpoint's copy-on-write mapping is one: no copy, and
        # `.to` below returns it as it is when device and dtype already match); copy anything else,
        # since torch may write to what it is given and a read-only buffer must not be.
        a = np.array(a, copy=not a.flags.writeable or not a.flags.c_contiguous or not a.flags.aligned)
        if a.dtype == ml_dtypes.bfloat16:  # torch.from_numpy knows no ml_dtypes: move the bits
            t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(a)
        return t.to(device=self.torch_device, dtype=_DTYPES[dtype] if dtype else None)

    def to_numpy(self, x: Any) -> np.ndarray:
        if not isinstance(x, torch.Tensor):
            return np.asarray(x)
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()

    def compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return torch.no_grad()(fn)

    def value_and_grad(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """fn(params: dict, *args) -> scalar; returns g(params, *args) -> (value, grads dict)."""

        def value_and_grad(params: dict[str, torch.Tensor], *args: Any) -> tuple[Any, dict[str, Any]]:
            leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            value = fn(leaves, *args)
            grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
            out = {k: (g if g is not None else torch.zeros_like(v)) for (k, v), g in zip(leaves.items(), grads)}
            return value.detach(), out

        return value_and_grad


_COMPOSITES: dict[str, Callable[..., Any]] = {
    fn.__name__: fn
    for fn in (
        embedding, linear, matmul, add, sub, mul, div, sqrt, sum, mean, rms_norm, layer_norm, l2_normalize,
        rope_cache, rope, alibi_bias, attention, silu, gelu, swiglu, softmax, log_softmax, cross_entropy,
        reshape, transpose, concat, split, where, cast,
    )
}
_NPU_FUSED = {"rms_norm": rms_norm_npu, "rope": rope_npu, "attention": attention_npu, "swiglu": swiglu_npu}
