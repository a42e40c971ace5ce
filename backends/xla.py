"""`xla:cpu`, `xla:gpu[:i]`, `xla:tpu[:i]`: JAX, every op in jax.numpy / jax.nn / lax, the model forward
and the gradients under `jax.jit`.

Float64 is not offered: it needs `jax_enable_x64`, a process-wide switch that would change the dtypes
of every other JAX user in the process. For the same reason integer tensors (token ids, labels) are
int32 on this backend, which holds any vocabulary.

The KV cache is a plain Python object the model mutates. Its class is registered as a pytree (the
cached tensors are the leaves; `length` and any other plain attribute are static aux data), the jitted
function returns the cache it was given, and the caller's object takes the new state. Taps (named
intermediate outputs, in an argument or in a cell of the function's closure) leave the trace as
outputs the same way. Because the models compute positions from `cache.length`, a Python int, and the
cache grows by concatenation, every (prompt length, past length) pair is its own trace: a prefill
compiles once per prompt shape and each decode step once per past length (about a second each for a
100M model on CPU), and repeated calls with the same shapes reuse the compiled executable.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from accel.backend import BackendBase, Capabilities, impls
from accel.dtypes import to_numpy_dtype
from accel.errors import BackendUnavailable
from accel.models._layers import KVCache, Taps
from accel.routing import Impl

try:
    import jax
    import jax.numpy as jnp
    from jax import lax
except ImportError as e:
    raise BackendUnavailable(f"jax cannot be imported ({e}); pip install 'accel-port[xla]'") from None

_LOW = (jnp.float16, jnp.bfloat16)
# float32 matmuls at full precision: XLA on GPU/TPU may otherwise take TF32 or bfloat16 passes
_HIGHEST = lax.Precision.HIGHEST


def _acc(x):
    """x in its accumulation dtype: float32 for low precision, else itself."""
    return x.astype(jnp.float32) if x.dtype in _LOW else x


def _dtype(name: str) -> Any:
    # int64 without x64 is int32 (ids and labels fit); asking jnp for int64 would only warn and do that
    return jnp.int32 if name == "int64" else jnp.dtype(to_numpy_dtype(name))


def _mm(a, b, out_dtype):
    """a @ b accumulated in float32 at least, rounded once to out_dtype. Low-precision operands are
    widened first (exact): XLA:CPU has no bf16 x bf16 -> f32 dot."""
    return jnp.matmul(_acc(a), _acc(b), precision=_HIGHEST).astype(out_dtype)


# --- ops ------------------------------------------------------------------------------------------


def embedding(weight, ids):
    return jnp.take(weight, ids, axis=0)


def linear(x, weight, bias=None):
    # x's last dim contracts with the weight's second as stored (out, in): written as x @ weight.T,
    # XLA:CPU copies a transposed weight on every call, which for decoding doubles the bytes moved
    y = lax.dot_general(_acc(weight), _acc(x), (((1,), (x.ndim - 1,)), ((), ())), precision=_HIGHEST)  # (out, ...)
    y = jnp.moveaxis(y, 0, -1)
    # the bias joins the float32 accumulator before the one rounding, as torch's addmm does
    return (y if bias is None else y + _acc(bias)).astype(x.dtype)


def matmul(a, b):
    return _mm(a, b, jnp.result_type(a, b))


def add(a, b):
    return jnp.add(a, b)


def sub(a, b):
    return jnp.subtract(a, b)


def mul(a, b):
    return jnp.multiply(a, b)


def div(a, b):
    return jnp.divide(a, b)


def sqrt(x):
    return jnp.sqrt(x)


def sum(x, axis=None, keepdims=False):  # noqa: A001
    return jnp.sum(_acc(x), axis=axis, keepdims=keepdims).astype(x.dtype)


def mean(x, axis=None, keepdims=False):
    return jnp.mean(_acc(x), axis=axis, keepdims=keepdims).astype(x.dtype)


def rms_norm(x, weight, eps):
    acc = _acc(x)
    normed = acc * lax.rsqrt(jnp.mean(acc * acc, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def layer_norm(x, weight, bias, eps):
    acc = _acc(x)
    mu = jnp.mean(acc, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(acc - mu), axis=-1, keepdims=True)
    # the affine part in float32 too, rounded once, as torch's layer_norm kernel does
    return ((acc - mu) * lax.rsqrt(var + eps) * _acc(weight) + _acc(bias)).astype(x.dtype)


def l2_normalize(x, axis=-1, eps=1e-12):
    acc = _acc(x)
    norm = jnp.sqrt(jnp.sum(acc * acc, axis=axis, keepdims=True))
    return (acc / jnp.maximum(norm, eps)).astype(x.dtype)


def rope_cache(positions, inv_freq):
    angle = positions.astype(jnp.float32)[:, None] * inv_freq.astype(jnp.float32)[None, :]
    return jnp.cos(angle), jnp.sin(angle)


def rope(x, cos, sin, style):
    half = cos.shape[-1]
    cos = cos.astype(x.dtype)[None, :, None, :]  # (1, s, 1, rot/2)
    sin = sin.astype(x.dtype)[None, :, None, :]
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    if style == "half":
        a, b = rot[..., :half], rot[..., half:]
        out = jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    elif style == "interleaved":
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(rot.shape)
    else:
        raise ValueError(f"unknown rope style {style!r}")
    return out if rest.shape[-1] == 0 else jnp.concatenate([out, rest], axis=-1)


def alibi_bias(slopes, kv_len):
    return slopes.astype(jnp.float32)[:, None, None] * jnp.arange(kv_len, dtype=jnp.float32)[None, None, :]


def attention(q, k, v, *, scale, causal=True, mask=None):
    sq, hq, skv, hkv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    k = jnp.repeat(k, hq // hkv, axis=2)
    v = jnp.repeat(v, hq // hkv, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", _acc(q), _acc(k), precision=_HIGHEST) * scale
    if mask is not None:
        scores = scores + mask.astype(jnp.float32)
    if causal:
        visible = jnp.arange(skv)[None, :] <= jnp.arange(sq)[:, None] + (skv - sq)
        scores = jnp.where(visible, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", _acc(probs), _acc(v), precision=_HIGHEST).astype(q.dtype)


# activations evaluate in float32 for low-precision inputs, as torch's CPU and CUDA kernels do: a tanh
# or exp evaluated in float16 itself is off by several units in the last place


def silu(x):
    return jax.nn.silu(_acc(x)).astype(x.dtype)


def gelu(x, approximate="none"):
    return jax.nn.gelu(_acc(x), approximate=approximate == "tanh").astype(x.dtype)


def swiglu(x):
    gate, up = jnp.split(_acc(x), 2, axis=-1)
    return (jax.nn.silu(gate) * up).astype(x.dtype)


def softmax(x, axis=-1):
    return jax.nn.softmax(_acc(x), axis=axis).astype(x.dtype)


def log_softmax(x, axis=-1):
    return jax.nn.log_softmax(_acc(x), axis=axis).astype(x.dtype)


def cross_entropy(logits, labels, ignore_index=-100):
    logp = jax.nn.log_softmax(_acc(logits), axis=-1)
    keep = labels != ignore_index
    picked = jnp.take_along_axis(logp, jnp.where(keep, labels, 0)[:, None], axis=-1)[:, 0]
    total = -jnp.sum(jnp.where(keep, picked, 0.0))
    # a count, not a data-dependent branch, so the same code traces under jit
    return total / jnp.maximum(jnp.sum(keep), 1).astype(total.dtype)


def reshape(x, shape):
    return jnp.reshape(x, shape)


def transpose(x, axes):
    return jnp.transpose(x, axes)


def concat(xs, axis):
    return jnp.concatenate(list(xs), axis=axis)


def split(x, sizes, axis):
    return jnp.split(x, np.cumsum(sizes)[:-1].tolist(), axis=axis)


def where(cond, a, b):
    return jnp.where(cond.astype(bool), a, b)


def cast(x, dtype):
    return x.astype(_dtype(dtype))


_OPS: dict[str, Callable[..., Any]] = {
    fn.__name__: fn
    for fn in (
        embedding, linear, matmul, add, sub, mul, div, sqrt, sum, mean, rms_norm, layer_norm, l2_normalize,
        rope_cache, rope, alibi_bias, attention, silu, gelu, swiglu, softmax, log_softmax, cross_entropy,
        reshape, transpose, concat, split, where, cast,
    )
}


# --- the KV cache as a pytree ---------------------------------------------------------------------

_REGISTERED: set[type] = set()


def _register_cache(cls: type) -> None:
    """Register a KVCache class (subclasses too: the pytree registry is by exact type)."""
    if cls in _REGISTERED:
        return

    def flatten(cache):
        static = tuple(sorted((k, v) for k, v in vars(cache).items() if k != "layers"))
        return (tuple(cache.layers),), static

    def unflatten(static, children):
        cache = object.__new__(cls)
        vars(cache).update(static)
        cache.layers = list(children[0])
        return cache

    jax.tree_util.register_pytree_node(cls, flatten, unflatten)
    _REGISTERED.add(cls)


def _caches(args: tuple, kwargs: dict) -> list[KVCache]:
    return [a for a in (*args, *kwargs.values()) if isinstance(a, KVCache)]


def _closure_taps(fn: Any) -> list[Any]:
    return [c for c in (fn.__closure__ or ()) if isinstance(c.cell_contents, Taps)]


class XlaBackend(BackendBase):
    name: ClassVar[str] = "xla"
    device_kinds: ClassVar[tuple[str, ...]] = ("cpu", "gpu", "tpu")

    def __init__(self, device: str, policy=None):
        kind, _, index = device.partition(":")
        self.kind = kind
        self.jax_device = jax.devices(kind)[int(index) if index else 0]
        super().__init__(device, policy)

    @classmethod
    def probe(cls, device: str) -> str | None:
        kind, _, index = device.partition(":")
        if kind not in cls.device_kinds:
            return f"jax has no device kind {kind!r}"
        try:
            devices = jax.devices(kind)
        except RuntimeError as e:  # the platform's plugin (jax[cuda12], libtpu) is missing
            hint = {"gpu": "pip install 'jax[cuda12]'", "tpu": "pip install 'jax[tpu]'"}.get(kind, "")
            return f"{str(e).splitlines()[0]}; {hint}".rstrip("; ")
        if index and int(index) >= len(devices):
            return f"{kind}:{index} does not exist: {len(devices)} {kind} device(s) here"
        return None

    def implementations(self) -> dict[str, list[Impl]]:
        return {name: impls(composite=fn) for name, fn in _OPS.items()}

    def capabilities(self) -> Capabilities:
        import jaxlib

        return Capabilities(("float32", "bfloat16", "float16"), training=True, compiled=True,
                            versions={"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                                      "platform": self.jax_device.platform})

    def asarray(self, a: Any, dtype: str | None = None) -> Any:
        a = np.asarray(a)
        if dtype is None and a.dtype == np.int64:
            dtype = "int64"
        if dtype is not None:
            a = a.astype(np.int32 if dtype == "int64" else to_numpy_dtype(dtype), copy=False)
        return jax.device_put(a, self.jax_device)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(jax.device_get(x))

    def compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """fn under jax.jit, retraced per input shape and per static cache state. KV caches among the
        arguments and Taps (arguments, or cells of fn's closure) are filled from the jitted outputs."""
        tap_ops: dict[str, str] = {}

        def traced(args: tuple, kwargs: dict, slots: tuple) -> tuple[Any, list[KVCache], list[dict]]:
            arg_slots, kw_slots = slots
            fresh = [Taps() for _ in range(len(arg_slots) + len(kw_slots))]
            args = tuple(fresh[arg_slots.index(i)] if i in arg_slots else a for i, a in enumerate(args))
            kwargs = {k: fresh[len(arg_slots) + kw_slots.index(k)] if k in kw_slots else v for k, v in kwargs.items()}
            cells = _closure_taps(fn)
            saved = [c.cell_contents for c in cells]
            fresh += [Taps() for _ in cells]
            for cell, taps in zip(cells, fresh[len(fresh) - len(cells):]):
                cell.cell_contents = taps  # the trace's taps hold tracers: they leave as outputs
            try:
                out = fn(*args, **kwargs)
            finally:
                for cell, taps in zip(cells, saved):
                    cell.cell_contents = taps
            for taps in fresh:
                tap_ops.update(taps.ops)
            return out, _caches(args, kwargs), [dict(t) for t in fresh]

        jitted = jax.jit(traced, static_argnums=2)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            arg_slots = tuple(i for i, a in enumerate(args) if isinstance(a, Taps))
            kw_slots = tuple(k for k, v in kwargs.items() if isinstance(v, Taps))
            targets = [args[i] for i in arg_slots] + [kwargs[k] for k in kw_slots]
            targets += [c.cell_contents for c in _closure_taps(fn)]
            caches = _caches(args, kwargs)
            for cache in caches:
                _register_cache(type(cache))
            plain_args = tuple(None if i in arg_slots else a for i, a in enumerate(args))
            plain_kwargs = {k: None if k in kw_slots else v for k, v in kwargs.items()}
            out, updated, taps_out = jitted(plain_args, plain_kwargs, (arg_slots, kw_slots))
            for cache, new in zip(caches, updated):
                vars(cache).update(vars(new))
            for taps, values in zip(targets, taps_out):
                taps.update(values)
                if isinstance(taps, Taps):
                    taps.ops.update({k: tap_ops[k] for k in values if k in tap_ops})
            return out

        return call

    def value_and_grad(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """fn(params: dict, *args) -> scalar; g(params, *args) -> (value, grads dict), jitted."""
        return jax.jit(jax.value_and_grad(fn))
