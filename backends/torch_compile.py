"""`torch-compile:cpu`, `torch-compile:cuda[:i]`, `torch-compile:npu[:i]`: the ops of `torch_eager` under
`torch.compile`, plus the graph capture through `torch.export` that the ONNX Runtime and TVM backends
lower from (`GraphBackend`, in graph_export.py).

torch.compile: inductor on cpu (C++/OpenMP kernels) and cuda (Triton); on npu, torchair's graph
backend, which is the only compile backend Ascend has (inductor has no npu code generator): without
torchair the target is unavailable, never silently eager. Mode default, `dynamic=None`: the sequence
dim of integer inputs (token ids, labels) and the cached-length dim of the KV cache are marked
dynamic, everything else (weights, heads) stays static so kernels specialise on it. The models take
positions from `cache.length`, a Python int: dynamo turns it symbolic after its first change
(automatic dynamic), so a generation costs three graphs (prefill, first decode step, general decode
step), each an inductor compile (seconds to tens of seconds on CPU, cached on disk by inductor's FX
graph cache). The cache object's mutation is a side effect dynamo replays after each graph.
Training: the loss is compiled; its backward is compiled by AOTAutograd when `torch.autograd.grad`
runs. Op-level calls (`ops.rms_norm(...)` outside `compile`) run the eager kernels of torch_eager:
inductor only ever sees whole functions.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import types
from collections.abc import Callable
from typing import Any, ClassVar

from accel.backend import Capabilities
from accel.backends.graph_export import traceable_asarray
from accel.backends.torch_eager import TorchBackend, _torch_npu, torch
from accel.models._layers import KVCache

_COMPILES = itertools.count()


def _mark_dynamic(args: tuple, kwargs: dict) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and not a.is_floating_point() and a.dim() == 2 and a.shape[1] > 1:
            torch._dynamo.maybe_mark_dynamic(a, 1)  # (batch, seq) ids or labels
        elif isinstance(a, KVCache):
            # after a prefill the cached k/v can be views into a fused projection: made contiguous, the
            # first decode step has the strides of every later one and needs no graph of its own
            a.layers = [None if kv is None else (kv[0].contiguous(), kv[1].contiguous()) for kv in a.layers]
            for kv in a.layers:
                for t in kv or ():
                    torch._dynamo.maybe_mark_dynamic(t, 1)  # (b, t, g, d): t grows by one per step


class TorchCompileBackend(TorchBackend):
    name: ClassVar[str] = "torch-compile"

    @classmethod
    def probe(cls, device: str) -> str | None:
        reason = TorchBackend.probe.__func__(cls, device)  # type: ignore[attr-defined]
        if reason is not None:
            return reason
        kind = device.partition(":")[0]
        if kind == "npu":
            return None if _torchair()[0] is not None else _torchair()[1]
        if kind == "cpu":
            cxx = os.environ.get("CXX", "g++")
            if shutil.which(cxx) is None:
                return f"inductor compiles C++ kernels on cpu and finds no compiler {cxx!r} on PATH; install g++"
        return None

    asarray = traceable_asarray

    def capabilities(self) -> Capabilities:
        caps = super().capabilities()
        versions = dict(caps.versions)
        if self.kind == "npu":
            versions["torchair"] = getattr(_torchair()[0], "__version__", "?")
        return Capabilities(caps.dtypes, training=True, collectives=caps.collectives, compiled=True,
                            fused_ops=caps.fused_ops, versions=versions)

    def _torch_compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        # dynamo keeps its compiled variants on the function's code object, and every forward that
        # accel.runtime.forward_fn makes shares one: a copy of the code per compile() keeps one
        # model's variants from using up another's recompile limit. Its automatic-dynamic record is
        # keyed by (file, line, name): a name of its own keeps one model's head count or width from
        # turning dynamic because another model in the process had a different one
        code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{next(_COMPILES)}")
        fn = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        if self.kind == "npu":
            torchair = _torchair()[0]
            return torch.compile(fn, backend=torchair.get_npu_backend(compiler_config=torchair.CompilerConfig()))
        return torch.compile(fn, backend="inductor")

    def compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        compiled = self._torch_compile(fn)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            _mark_dynamic(args, kwargs)
            # past its recompile limit dynamo would run the rest eagerly without a word: an error here.
            # One compiled forward serves a model at every dtype, with and without cache or taps
            with torch.no_grad(), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=32):
                return compiled(*args, **kwargs)

        return call

    def value_and_grad(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """fn(params: dict, *args) -> scalar, compiled; g(params, *args) -> (value, grads dict)."""
        compiled = self._torch_compile(fn)

        def value_and_grad(params: dict[str, torch.Tensor], *args: Any) -> tuple[Any, dict[str, Any]]:
            leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            _mark_dynamic(args, {})
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                value = compiled(leaves, *args)
            grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
            out = {k: (g if g is not None else torch.zeros_like(v)) for (k, v), g in zip(leaves.items(), grads)}
            return value.detach(), out

        return value_and_grad


@functools.lru_cache(maxsize=1)
def _torchair() -> tuple[Any, str | None]:
    module, reason = _torch_npu()  # torchair needs torch_npu imported first
    if module is None:
        return None, reason
    try:
        import torchair
    except ImportError as e:
        return None, (f"torchair cannot be imported ({e}); it is torch.compile's only backend on Ascend: "
                      "pip install torchair (the release matching torch_npu)")
    return torchair, None
