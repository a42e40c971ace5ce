"""`tvm:llvm`, `tvm:cuda[:i]`: the torch forward captured with `torch.export`, imported into TVM Relax
(`from_exported_program`), compiled with `tvm.compile` for the target and run by the Relax virtual
machine. Inference only.

The weights stay inputs of the compiled module (keep_params_as_input), so one compiled library serves
every checkpoint of a configuration and its cache key does not cover weight values; they reach the VM
through DLPack without a copy. What the graph computes from the weights alone (every linear's
transpose) is lifted into a function the VM runs once per set of weights (LiftTransformParams), not
once per token. Prefill and decode step are two libraries with symbolic batch and sequence/past
lengths, exported as shared objects (`export_library`) under $ACCEL_CACHE_DIR/tvm. tvm.compile's
default pipeline builds them without tuning: dlight's default schedules on cuda, plain loops on llvm,
so tvm:llvm is slow (a few tokens/s for a 100M model, see docs/performance.md) until its kernels are
tuned with meta_schedule.

Op-level calls run each op as its own one-op TVM module (see GraphBackend), so op-level conformance
on this target measures TVM's generated code.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, ClassVar

from accel.backend import Capabilities
from accel.backends.graph_export import GraphBackend, Lowering, torch
from accel.errors import BackendUnavailable

try:
    import tvm
    from tvm import relax
except ImportError as e:
    raise BackendUnavailable(f"tvm cannot be imported ({e}); pip install 'accel-port[tvm]'") from None

DTYPES = {"llvm": ("float32",), "cuda": ("float32", "float16")}


class TvmLowering(Lowering):
    name: ClassVar[str] = "tvm"
    what: ClassVar[str] = "TVM (Relax import, tvm.compile)"
    suffix: ClassVar[str] = ".so"
    weights_in_graph: ClassVar[bool] = False

    def __init__(self, kind: str, device_id: int):
        self.kind, self.device_id = kind, device_id

    def key(self) -> str:
        return f"tvm {tvm.__version__} target {self._target()}"

    def _target(self) -> Any:
        # llvm for the CPU this library will run on (its vector extensions), cuda for the device's
        # architecture; both name the hardware, so the cache key does too
        if self.kind == "llvm":
            return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
        return tvm.target.Target(tvm.target.Target.from_device(tvm.cuda(self.device_id)), host={"kind": "llvm"})

    def build(self, ep: Any, path: Path) -> dict[str, Any]:
        from tvm.relax.frontend.torch import from_exported_program

        mod = from_exported_program(ep, keep_params_as_input=True)
        mod, _ = relax.frontend.detach_params(mod)
        # what depends on the weights alone (the transposes of every linear) moves to a function of its
        # own that runs once per set of weights, not once per token
        mod = relax.transform.LiftTransformParams()(mod)
        # tvm.compile's default pipeline for the target: on cuda it schedules the kernels with dlight's
        # default rules; on llvm it applies no schedule (TVM's CPU kernels are untuned loops)
        tvm.compile(mod, target=self._target()).export_library(str(path))
        return {}

    def load(self, path: Path, meta: dict[str, Any]) -> Any:
        device = tvm.cpu() if self.kind == "llvm" else tvm.cuda(self.device_id)
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), device)
        main, transform = vm["main"], vm["main_transform_params"]
        transformed: dict[tuple[int, ...], tuple[list[torch.Tensor], Any]] = {}  # keeps the weights (ids) alive

        def to_tvm(t: torch.Tensor) -> Any:
            if self.kind != "llvm":
                return tvm.runtime.tensor(t.detach().cpu().numpy(), device)
            t = t.detach().contiguous()
            if t.data_ptr() % 64:  # TVM takes 64-byte aligned buffers only; torch's own allocations are
                t = t.clone()
            return tvm.runtime.from_dlpack(t)  # shares the memory

        def run(inputs: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
            key = tuple(id(p) for p in params)
            if key not in transformed:
                transformed.clear()  # one set of weights at a time
                transformed[key] = (params, list(transform([to_tvm(p) for p in params])))
            out = main(*[to_tvm(t) for t in inputs], *transformed[key][1])
            outs = list(out) if not isinstance(out, tvm.runtime.Tensor) else [out]
            # copied out of the VM's buffers, which it may reuse on the next call
            return [torch.from_dlpack(o).clone() if self.kind == "llvm" else torch.from_numpy(o.numpy())
                    for o in outs]

        return run


class TvmBackend(GraphBackend):
    name: ClassVar[str] = "tvm"
    device_kinds: ClassVar[tuple[str, ...]] = ("llvm", "cuda")

    def __init__(self, device: str, policy: Any = None):
        kind, _, index = device.partition(":")
        self.kind = kind
        self.lowering = TvmLowering(kind, int(index) if index else 0)
        super().__init__(device, policy)

    @classmethod
    def probe(cls, device: str) -> str | None:
        kind, _, index = device.partition(":")
        if kind not in DTYPES:
            return f"tvm has no target {kind!r}"
        if kind == "llvm":
            return None if not index and _enabled("llvm") else (
                "tvm:llvm takes no device index" if index else "this tvm build has no LLVM backend")
        if not _enabled("cuda"):
            return f"this tvm {tvm.__version__} build has no CUDA support; build TVM with USE_CUDA=ON"
        if not tvm.cuda(int(index) if index else 0).exist:
            return "no CUDA device or driver found (tvm.cuda().exist is False)"
        return None

    def capabilities(self) -> Capabilities:
        return Capabilities(DTYPES[self.kind], training=False, compiled=True,
                            versions={"tvm": tvm.__version__, "torch": torch.__version__})


@functools.lru_cache(maxsize=4)
def _enabled(target: str) -> bool:
    return bool(tvm.runtime.enabled(target))
