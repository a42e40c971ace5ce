"""`mindspore:cpu`, `mindspore:gpu[:i]`, `mindspore:ascend[:i]`: MindSpore, PyNative by default.

The device kind is MindSpore's device target ("CPU", "GPU", "Ascend"), set with `mindspore.set_device`;
MindSpore has one device target per process, so a process opens one mindspore device kind.

Ops are the classic `mindspore.ops` kernels, which exist on every device (the `mint` ops have no CPU
kernels). On Ascend, rms_norm, rope, attention and swiglu route to MindSpore's fused kernels
(`ops.rms_norm`, `ops.rotary_position_embedding`, `ops.flash_attention_score`, `ops.swiglu`, Ascend
only); the composites stay selectable through the routing policy.

Modes: PyNative (op by op) by default. `ACCEL_MINDSPORE_MODE=graph` (or `MindSporeBackend(device,
policy, mode="graph")`) compiles: `compile(fn)` and the loss inside `value_and_grad` go through
`mindspore.jit` (trace capture, one graph per argument structure and shapes); calls that carry Python
state a graph cannot hold (a KV cache, taps) still run op by op. `capabilities().compiled` tells which.

dtypes are measured, not assumed: the first `capabilities()` call runs each kernel family the
composites use at each float dtype on the device and claims the dtypes where all of them run. On
MindSpore 2.10 CPU that is float32 and float16: most CPU kernels (MatMul, Mul, Exp, ReduceSum, ...)
reject bfloat16. float64 is not offered (see _CANDIDATE_DTYPES). On CPU, kernels launch synchronously
(see __init__).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any, ClassVar

import ml_dtypes
import numpy as np

from accel.backend import BackendBase, Capabilities, impls
from accel.dtypes import to_numpy_dtype
from accel.errors import AccelError, BackendUnavailable, TargetUnavailable, UnsupportedDtype, UsageError
from accel.routing import Impl

# MindSpore logs warnings (missing device plugins, deprecations) at import through glog and its own
# logger, both driven by GLOG_v; 3 keeps errors only. A user's own setting wins.
os.environ.setdefault("GLOG_v", "3")

try:
    import mindspore as ms
    from mindspore import ops as P
except ImportError as e:
    raise BackendUnavailable(f"mindspore cannot be imported ({e}); pip install 'accel-port[mindspore]'") from None

_DTYPES = {"float64": ms.float64, "float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16,
           "int64": ms.int64, "int32": ms.int32, "int8": ms.int8, "uint8": ms.uint8, "bool": ms.bool_}
_LOW = (ms.float16, ms.bfloat16)
_MS_TARGET = {"cpu": "CPU", "gpu": "GPU", "ascend": "Ascend"}
_COLLECTIVES = {"cpu": "mccl", "gpu": "nccl", "ascend": "hccl"}
MODES = ("pynative", "graph")


def _acc(x):
    """x in its accumulation dtype: float32 for low precision, else itself."""
    return P.cast(x, ms.float32) if x.dtype in _LOW else x


def _back(y, like):
    return P.cast(y, like.dtype) if y.dtype != like.dtype else y


def _plugin_reason(kind: str) -> str | None:
    """None when this MindSpore package loaded its plugin for `kind`, else why not."""
    from mindspore._c_expression import MSContext

    context = MSContext.get_instance()
    if context.is_pkg_support_device(_MS_TARGET[kind]):
        return None
    error = next((line for line in context.load_plugin_error().splitlines() if line.strip()), "")
    detail = f" ({error.strip()})" if error and kind == "ascend" else ""
    if kind == "ascend":
        return (f"MindSpore's Ascend plugin did not load{detail}; on an Ascend machine install CANN and "
                "source its set_env.sh, with the mindspore wheel matching that CANN")
    return ("this MindSpore package has no usable GPU plugin (it needs libcuda and cuDNN and a GPU build "
            "of mindspore); see https://www.mindspore.cn/install")


# --- composite implementations (mindspore.ops, kernels on every device) ----------------------------


def embedding(weight, ids):
    return P.gather(weight, ids, 0)


_MATMUL_NT = P.MatMul(transpose_b=True)


def linear(x, weight, bias=None):
    # a 2-D MatMul with transpose_b reads the (out, in) weight as stored, with no transposed copy
    lead = x.shape[:-1]
    y = _MATMUL_NT(P.reshape(x, (-1, x.shape[-1])), weight)
    if bias is not None:
        y = P.add(y, bias)
    return P.reshape(y, (*lead, weight.shape[0]))


def matmul(a, b):
    return P.matmul(a, b)


def _accumulating(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn computed in float32 for low-precision inputs, the result cast back: MindSpore's CPU MatMul
    accumulates float16 in float16 (max relative error ~8e-2 on a 24-term dot product, where torch's
    CPU kernel, accumulating in float32, stays at output rounding)."""

    def accumulating(x, *args, **kwargs):
        if x.dtype not in _LOW:
            return fn(x, *args, **kwargs)
        up = [_acc(a) if isinstance(a, ms.Tensor) else a for a in args]
        return _back(fn(_acc(x), *up, **kwargs), x)

    accumulating.__name__ = fn.__name__
    return accumulating


def add(a, b):
    return P.add(a, b)


def sub(a, b):
    return P.sub(a, b)


def mul(a, b):
    return P.mul(a, b)


def div(a, b):
    return P.div(a, b)


def sqrt(x):
    return P.sqrt(x)


def sum(x, axis=None, keepdims=False):  # noqa: A001
    return _back(P.sum(_acc(x), dim=axis, keepdim=keepdims), x)


def mean(x, axis=None, keepdims=False):
    acc = _acc(x)
    out = P.mean(acc, axis=axis, keep_dims=keepdims) if axis is not None else P.mean(acc)
    return _back(out, x)


def rms_norm(x, weight, eps):
    acc = _acc(x)
    normed = P.mul(acc, P.rsqrt(P.add(P.mean(P.square(acc), -1, True), eps)))
    return P.mul(weight, _back(normed, x))


def layer_norm(x, weight, bias, eps):
    acc = _acc(x)
    centred = P.sub(acc, P.mean(acc, -1, True))
    normed = P.mul(centred, P.rsqrt(P.add(P.mean(P.square(centred), -1, True), eps)))
    return _back(P.add(P.mul(normed, _acc(weight)), _acc(bias)), x)


def l2_normalize(x, axis=-1, eps=1e-12):
    acc = _acc(x)
    norm = P.sqrt(P.sum(P.square(acc), dim=axis, keepdim=True))
    return _back(P.div(acc, P.clamp(norm, min=eps)), x)


def rope_cache(positions, inv_freq):
    dt = ms.float64 if inv_freq.dtype == ms.float64 else ms.float32
    angle = P.mul(P.reshape(P.cast(positions, dt), (-1, 1)), P.reshape(P.cast(inv_freq, dt), (1, -1)))
    return P.cos(angle), P.sin(angle)


def _tables(cos, sin, like):
    half = cos.shape[-1]
    return (P.reshape(P.cast(cos, like.dtype), (1, -1, 1, half)),  # (1, s, 1, rot/2)
            P.reshape(P.cast(sin, like.dtype), (1, -1, 1, half)))


def rope(x, cos, sin, style):
    half = cos.shape[-1]
    cos, sin = _tables(cos, sin, x)
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    if style == "half":
        a, b = rot[..., :half], rot[..., half:]
        out = P.concat([P.sub(P.mul(a, cos), P.mul(b, sin)), P.add(P.mul(b, cos), P.mul(a, sin))], -1)
    elif style == "interleaved":
        a, b = rot[..., 0::2], rot[..., 1::2]
        pairs = P.stack([P.sub(P.mul(a, cos), P.mul(b, sin)), P.add(P.mul(b, cos), P.mul(a, sin))], -1)
        out = P.reshape(pairs, rot.shape)
    else:
        raise ValueError(f"unknown rope style {style!r}")
    return out if rest.shape[-1] == 0 else P.concat([out, rest], -1)


def alibi_bias(slopes, kv_len):
    dt = ms.float64 if slopes.dtype == ms.float64 else ms.float32
    positions = P.cast(P.arange(kv_len), dt)
    return P.mul(P.reshape(P.cast(slopes, dt), (-1, 1, 1)), P.reshape(positions, (1, 1, -1)))


@lru_cache(maxsize=64)
def _causal_bias(sq: int, skv: int) -> Any:
    """(sq, skv) float32: 0 where query i (at absolute position skv - sq + i) may see key j, else -inf."""
    visible = np.arange(skv)[None, :] <= np.arange(sq)[:, None] + (skv - sq)
    return ms.Tensor(np.where(visible, 0.0, -np.inf).astype(np.float32))


def attention(q, k, v, *, scale, causal=True, mask=None):
    # GQA without repeating K/V: the query heads that share a kv head are stacked along the sequence,
    # (b, g, rep * sq, d) against (b, g, skv, d). Scores and softmax in float32 for low precision.
    b, sq, hq, d = q.shape
    skv, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    rep = hq // hkv
    qf = P.reshape(P.transpose(_acc(q), (0, 2, 1, 3)), (b, hkv, rep * sq, d))
    kf = P.transpose(_acc(k), (0, 2, 3, 1))  # (b, g, d, skv)
    scores = P.reshape(P.mul(P.matmul(qf, kf), scale), (b, hq, sq, skv))
    if mask is not None:
        scores = P.add(scores, P.cast(mask, scores.dtype))
    if causal:
        scores = P.add(scores, P.cast(_causal_bias(sq, skv), scores.dtype))
    probs = P.reshape(P.softmax(scores, -1), (b, hkv, rep * sq, skv))
    out = P.matmul(probs, P.transpose(_acc(v), (0, 2, 1, 3)))  # (b, g, rep * sq, dv)
    return _back(P.transpose(P.reshape(out, (b, hq, sq, dv)), (0, 2, 1, 3)), q)


def silu(x):
    return _back(P.silu(_acc(x)), x)


def gelu(x, approximate="none"):
    return _back(P.gelu(_acc(x), approximate=approximate), x)


def swiglu(x):
    gate, up = P.split(x, x.shape[-1] // 2, -1)
    return P.mul(silu(gate), up)


def softmax(x, axis=-1):
    return _back(P.softmax(_acc(x), axis), x)


def log_softmax(x, axis=-1):
    return _back(P.log_softmax(_acc(x), axis), x)


def cross_entropy(logits, labels, ignore_index=-100):
    logp = P.log_softmax(_acc(logits), -1)  # (n, vocab)
    labels = P.cast(labels, ms.int32)
    keep = P.not_equal(labels, ignore_index)
    safe = P.where(keep, labels, P.zeros_like(labels))  # any valid row index; masked out below
    picked = P.reshape(P.gather_elements(logp, 1, P.reshape(safe, (-1, 1))), (-1,))
    weight = P.cast(keep, logp.dtype)
    total = P.neg(P.sum(P.mul(picked, weight)))
    return P.div(total, P.clamp(P.sum(weight), min=1.0))


def reshape(x, shape):
    return P.reshape(x, tuple(shape))


def transpose(x, axes):
    return P.transpose(x, tuple(axes))


def concat(xs, axis):
    return P.concat(list(xs), axis)


def split(x, sizes, axis):
    return list(P.split(x, [int(s) for s in sizes], axis))


def _tensor_like(value, like):
    return value if isinstance(value, ms.Tensor) else ms.Tensor(value, like.dtype)


def where(cond, a, b):
    like = a if isinstance(a, ms.Tensor) else b
    return P.where(P.cast(cond, ms.bool_), _tensor_like(a, like), _tensor_like(b, like))


def cast(x, dtype):
    return P.cast(x, _DTYPES[dtype])


# --- Ascend fused kernels -------------------------------------------------------------------------


def rms_norm_fused(x, weight, eps):
    # ops.rms_norm multiplies by the weight before casting back (in float32), where HF casts first:
    # a few ULP apart in low precision.
    return P.rms_norm(x, P.cast(weight, x.dtype), eps)[0]


def rope_fused(x, cos, sin, style):
    # rotary_position_embedding takes full-width (1, s, 1, rot) tables for BSND ("half": the two halves
    # repeat block-wise, mode 0; "interleaved": element-wise, mode 1) and rotates the whole last dim, so
    # a partial rotary (ChatGLM rotates half of each head) splits the rest off first.
    half = cos.shape[-1]
    if style == "half":
        cos, sin, mode = P.concat([cos, cos], -1), P.concat([sin, sin], -1), 0
    elif style == "interleaved":
        cos, sin, mode = P.repeat_interleave(cos, 2, -1), P.repeat_interleave(sin, 2, -1), 1
    else:
        raise ValueError(f"unknown rope style {style!r}")
    cos = P.reshape(P.cast(cos, x.dtype), (1, -1, 1, 2 * half))
    sin = P.reshape(P.cast(sin, x.dtype), (1, -1, 1, 2 * half))
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    out = P.rotary_position_embedding(rot, cos, sin, mode)
    return out if rest.shape[-1] == 0 else P.concat([out, rest], -1)


@lru_cache(maxsize=1)
def _compressed_causal_mask() -> Any:
    # sparse_mode 3 (right-down causal: query i sits at skv - sq + i) takes the mask in its documented
    # compressed form, a 2048 x 2048 upper triangle, True = masked, whatever the real lengths.
    return ms.Tensor(np.triu(np.ones((2048, 2048), dtype=np.bool_), k=1))


def attention_fused(q, k, v, *, scale, causal=True, mask=None):
    if q.dtype not in _LOW:
        raise UnsupportedDtype(f"MindSpore's flash_attention_score takes float16/bfloat16, not {q.dtype}; "
                               "route float32 attention to the composite: ACCEL_OPS=attention=composite")
    if q.shape[-1] % 16 or q.shape[-1] > 512:
        raise UsageError(f"flash_attention_score needs a head dim that is a multiple of 16 up to 512, not "
                         f"{q.shape[-1]}; route attention to the composite: ACCEL_OPS=attention=composite")
    kwargs: dict[str, Any] = {}
    if causal and q.shape[1] > 1:
        kwargs.update(attn_mask=_compressed_causal_mask(), sparse_mode=3)
    if mask is not None:
        # the kernel adds real_shift after the scaling, as the op set's mask (MindSpore's documented formula)
        b, sq, heads, skv = q.shape[0], q.shape[1], q.shape[2], k.shape[1]
        shift = P.cast(mask, q.dtype)
        lead = b if len(shift.shape) == 4 and shift.shape[0] == b else 1
        kwargs["real_shift"] = P.broadcast_to(shift, (lead, heads, sq, skv))
    return P.flash_attention_score(q, k, v, q.shape[2], scalar_value=scale, input_layout="BSND", **kwargs)


def swiglu_fused(x):
    return P.swiglu(x, -1)


_COMPOSITES: dict[str, Callable[..., Any]] = {
    fn.__name__: fn
    for fn in (
        embedding, linear, matmul, add, sub, mul, div, sqrt, sum, mean, rms_norm, layer_norm, l2_normalize,
        rope_cache, rope, alibi_bias, attention, silu, gelu, swiglu, softmax, log_softmax, cross_entropy,
        reshape, transpose, concat, split, where, cast,
    )
}
_ASCEND_FUSED: dict[str, Callable[..., Any]] = {
    "rms_norm": rms_norm_fused, "rope": rope_fused, "attention": attention_fused, "swiglu": swiglu_fused}


# --- dtype measurement ----------------------------------------------------------------------------

# float64 is not offered: Ascend has no float64 MatMul, and on CPU kernels such as LogSoftmax compute
# float64 in float32 (4e-6 off the float64 oracle).
_CANDIDATE_DTYPES = ("float32", "float16", "bfloat16")


def _smoke(dtype: Any) -> None:
    """Runs one kernel of each family the composites use at `dtype`; raises if one has no kernel."""
    x = P.cast(ms.Tensor(np.linspace(-1.0, 1.0, 24, dtype=np.float32).reshape(2, 3, 4)), dtype)
    w = P.cast(ms.Tensor(np.eye(4, dtype=np.float32)), dtype)
    ids = ms.Tensor(np.array([[0, 2]], np.int64))
    outs = [linear(x, w), matmul(x, w), P.mul(x, x), P.sub(x, 1.0), P.div(x, 2.0), P.sqrt(P.abs(x)),
            P.exp(x), P.neg(x), P.sum(x, dim=-1), P.mean(x, -1, True), P.amax(x, -1, True),
            P.rsqrt(P.add(P.abs(x), 1.0)), P.softmax(x, -1), P.log_softmax(x, -1), P.silu(x), P.gelu(x),
            P.cos(x), P.gather(w, ids, 0), P.where(P.greater(x, 0.0), x, P.zeros_like(x)),
            P.concat([x, x], -1), P.transpose(x, (1, 0, 2)), P.stack([x, x], -1), x[..., 0::2]]
    for out in outs:
        out.asnumpy()


def _measure_dtypes() -> tuple[str, ...]:
    ok = []
    for name in _CANDIDATE_DTYPES:
        try:
            _smoke(_DTYPES[name])
        except (RuntimeError, TypeError, ValueError):
            continue
        ok.append(name)
    return tuple(ok)


# --- the backend ------------------------------------------------------------------------------------


class MindSporeBackend(BackendBase):
    name: ClassVar[str] = "mindspore"
    device_kinds: ClassVar[tuple[str, ...]] = ("cpu", "gpu", "ascend")
    _dtypes: ClassVar[dict[str, tuple[str, ...]]] = {}  # device kind -> measured dtypes

    def __init__(self, device: str, policy=None, mode: str | None = None):
        kind, _, index = device.partition(":")
        self.kind = kind
        self.mode = (mode or os.environ.get("ACCEL_MINDSPORE_MODE") or "pynative").lower()
        if self.mode not in MODES:
            raise UsageError(f"ACCEL_MINDSPORE_MODE={self.mode!r} is not one of {', '.join(MODES)}")
        reason = self.probe(device)
        if reason is not None:
            raise TargetUnavailable(f"mindspore:{device} is not available here: {reason}")
        try:
            ms.set_device(_MS_TARGET[kind], int(index) if index else None)
        except RuntimeError as e:  # MindSpore holds one device target per process
            current = ms.get_current_device()
            raise TargetUnavailable(f"mindspore:{device} cannot be opened: this process already runs MindSpore on "
                                    f"{current[0]} ({str(e).splitlines()[0]}); use one process per device") from None
        if kind == "cpu":
            # Synchronous launches on CPU: through the asynchronous launch queue a small MatMul costs
            # ~1.5 ms instead of ~80 us on this kind of machine, and a kernel error would surface at a
            # later, unrelated op instead of the one that failed.
            ms.runtime.launch_blocking()
        super().__init__(device, policy)

    @classmethod
    def probe(cls, device: str) -> str | None:
        kind, _, index = device.partition(":")
        if kind not in _MS_TARGET:
            return f"mindspore has no device kind {kind!r}; it has cpu, gpu, ascend"
        if kind == "cpu":
            return None if not index else "mindspore:cpu takes no device index"
        reason = _plugin_reason(kind)
        if reason is not None:
            return reason
        try:
            context = ms.device_context.ascend if kind == "ascend" else ms.device_context.gpu
            count = context.device_count()
        except RuntimeError as e:
            return f"MindSpore's {_MS_TARGET[kind]} plugin loaded but finds no device ({str(e).splitlines()[0]})"
        if count == 0:
            return f"MindSpore finds no {_MS_TARGET[kind]} device"
        if index and int(index) >= count:
            return f"{kind}:{index} does not exist: {count} {kind} device(s) here"
        return None

    def implementations(self) -> dict[str, list[Impl]]:
        table = {name: impls(composite=fn) for name, fn in _COMPOSITES.items()}
        if self.kind == "cpu":
            table["linear"], table["matmul"] = impls(composite=_accumulating(linear)), \
                impls(composite=_accumulating(matmul))
        why_not = None if self.kind == "ascend" else \
            f"MindSpore's fused kernel runs on Ascend only (no {_MS_TARGET[self.kind]} kernel)"
        for name, fn in _ASCEND_FUSED.items():
            table[name] = [Impl("fused", fn, why_not), *table[name]]
        return table

    def capabilities(self) -> Capabilities:
        if self.kind not in self._dtypes:
            type(self)._dtypes[self.kind] = _measure_dtypes()
        fused = tuple(op for op, variant in self.ops.routes.items() if variant == "fused")
        return Capabilities(self._dtypes[self.kind], training=True, collectives=_COLLECTIVES[self.kind],
                            compiled=self.mode == "graph", fused_ops=fused,
                            versions={"mindspore": ms.__version__, "mode": self.mode})

    def asarray(self, a: Any, dtype: str | None = None) -> Any:
        a = np.asarray(a)
        if dtype is not None and a.dtype != to_numpy_dtype(dtype):
            a = a.astype(to_numpy_dtype(dtype))  # on the host: exact, and rounds to nearest even as `cast` does
        # MindSpore 2.10's ms.Tensor(ndarray) copies; Tensor.from_numpy aliases the array (and holds it).
        # Alias what may be aliased, a writeable, aligned, C-contiguous array (a checkpoint's
        # copy-on-write mapping, or the cast just made); copy the rest, since MindSpore would also
        # alias a read-only buffer that a kernel must never write.
        a = np.array(a, copy=not a.flags.writeable or not a.flags.c_contiguous or not a.flags.aligned)
        return ms.Tensor.from_numpy(a)

    def to_numpy(self, x: Any) -> np.ndarray:
        if not isinstance(x, ms.Tensor):
            return np.asarray(x)
        out = x.asnumpy()
        if x.dtype == ms.bfloat16 and out.dtype != ml_dtypes.bfloat16:
            out = out.view(ml_dtypes.bfloat16)
        return out

    def compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return _GraphFunction(fn) if self.mode == "graph" else fn

    def value_and_grad(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """fn(params: dict, *args) -> scalar; returns g(params, *args) -> (value, grads dict)."""
        graph = self.mode == "graph"
        cache: dict[Any, Any] = {}

        def value_and_grad(params: dict[str, Any], *args: Any) -> tuple[Any, dict[str, Any]]:
            keys, leaves = tuple(params), list(params.values())
            n = len(keys)
            spec = _flatten(args, leaves)  # mindspore differentiates positional tensors: pass flat ones
            key = (keys, spec, _shapes(leaves)) if graph else (keys, spec)
            if key not in cache:
                def flat(*xs: Any) -> Any:
                    return fn(dict(zip(keys, xs[:n])), *_unflatten(spec, iter(xs[n:])))

                if graph:
                    _fix_trace_caller_lines()
                traced = ms.jit(flat, capture_mode="trace") if graph else flat
                cache[key] = ms.value_and_grad(traced, grad_position=tuple(range(n)))
                leaves = _distinct(leaves) if graph else leaves
            value, grads = cache[key](*leaves)
            if n == 1 and not isinstance(grads, tuple):
                grads = (grads,)
            return value, dict(zip(keys, grads))

        return value_and_grad


# --- graph mode -----------------------------------------------------------------------------------
# mindspore.jit's "ast" capture cannot parse the models (host NumPy, try/except in helpers) and its
# "bytecode" capture fails on them in 2.10; "trace" runs the Python once and records the kernels it
# launches, which suits pure functions. In 2.10 it mishandles dict arguments on a second call, so
# arguments and results travel flattened into positional tensors, one graph per structure and shapes.


class _NotTraceable(Exception):
    pass


_LEAF = ("tensor",)


def _flatten(tree: Any, leaves: list[Any]) -> Any:
    """A hashable description of `tree` (tensors, plain dicts/lists/tuples of them, constants) with its
    tensors appended to `leaves`; raises _NotTraceable on other objects (a KV cache, taps)."""
    if isinstance(tree, ms.Tensor):
        leaves.append(tree)
        return _LEAF
    if type(tree) is dict:
        keys = tuple(tree)
        return ("dict", keys, tuple(_flatten(tree[k], leaves) for k in keys))
    if type(tree) in (list, tuple):
        return (type(tree).__name__, tuple(_flatten(x, leaves) for x in tree))
    if tree is None or isinstance(tree, bool | int | float | str):
        return ("const", tree)
    raise _NotTraceable(type(tree).__name__)


def _unflatten(spec: Any, leaves: Iterator[Any]) -> Any:
    kind = spec[0]
    if kind == "tensor":
        return next(leaves)
    if kind == "dict":
        return {k: _unflatten(s, leaves) for k, s in zip(spec[1], spec[2])}
    if kind in ("list", "tuple"):
        items = [_unflatten(s, leaves) for s in spec[1]]
        return items if kind == "list" else tuple(items)
    return spec[1]


def _distinct(leaves: list[Any]) -> list[Any]:
    """leaves with repeated objects copied: a trace binds graph inputs by object, so one tensor passed
    in two places while tracing would become one input of the graph for every later call."""
    seen: set[int] = set()
    out = []
    for x in leaves:
        out.append(x.copy() if id(x) in seen else x)
        seen.add(id(x))
    return out


def _shapes(leaves: list[Any]) -> tuple[Any, ...]:
    return tuple((tuple(x.shape), x.dtype) for x in leaves)


@lru_cache(maxsize=1)
def _fix_trace_caller_lines() -> None:
    """MindSpore 2.10's trace capture walks the caller stack with inspect.stack() at every op, and formats
    `frame_info[4][0]` of each frame into a debug message: a frame without source text (`python -c`, a
    REPL, pytest's rewritten test modules) raises TypeError there, and inspect.stack() resolves every
    frame's module (milliseconds per op on a deep stack). The same walk over raw frames, without either;
    pseudo-files ("<frozen runpy>") are left out, as MindSpore logs an error for each it cannot resolve."""
    import re
    import sys

    from mindspore.graph import jit_trace

    internal = re.compile(r"mindspore/common/.*\.py|mindspore/ops/.*\.py|mindspore/nn/.*\.py")

    def caller_lines() -> tuple[list[str], list[int]]:
        names, lines = [], []
        frame: Any = sys._getframe(1)
        while frame is not None:
            name = frame.f_code.co_filename
            if not name.startswith("<") and not internal.search(name):
                names.append(name)
                lines.append(frame.f_lineno)
            frame = frame.f_back
        return names, lines

    if hasattr(jit_trace, "_get_caller_lines"):
        jit_trace._get_caller_lines = caller_lines


class _GraphFunction:
    """fn through `mindspore.jit` (trace capture), one graph per argument structure and shapes. A call
    carrying Python state a graph cannot hold or mutate (a KV cache, taps) runs op by op."""

    def __init__(self, fn: Callable[..., Any]):
        _fix_trace_caller_lines()
        self.fn = fn
        self.graphs: dict[Any, tuple[Any, list[Any]]] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves: list[Any] = []
        try:
            spec = _flatten((args, kwargs), leaves)
        except _NotTraceable:
            return self.fn(*args, **kwargs)
        key = (spec, _shapes(leaves))
        if key not in self.graphs:
            out_spec: list[Any] = []

            def flat(*xs: Any) -> tuple[Any, ...]:
                a, kw = _unflatten(spec, iter(xs))
                out_leaves: list[Any] = []
                out_spec[:] = [_flatten(self.fn(*a, **kw), out_leaves)]
                return tuple(out_leaves)

            self.graphs[key] = (ms.jit(flat, capture_mode="trace"), out_spec)
            leaves = _distinct(leaves)
        jitted, out_spec = self.graphs[key]
        try:
            out = jitted(*leaves)
        except (RuntimeError, ValueError) as e:
            raise AccelError(f"mindspore graph mode cannot run {getattr(self.fn, '__name__', 'fn')}: "
                             f"{str(e).strip().splitlines()[0]}; run with ACCEL_MINDSPORE_MODE=pynative") from None
        return _unflatten(out_spec[0], iter((out,) if isinstance(out, ms.Tensor) else out))
