"""`onnxruntime:cpu`, `onnxruntime:cuda`, `onnxruntime:cann`: the torch forward exported to ONNX
(`torch.export` then `torch.onnx.export(..., dynamo=True)`) and run by ONNX Runtime with the device's
execution provider. Inference only.

A generation uses two graphs: the prefill (no cache in, the cache out) and the decode step (the cache
in and out), both with dynamic batch and sequence/past lengths; the weights are initializers of the
ONNX file, so its cache key covers their digest. Files live under $ACCEL_CACHE_DIR/onnx (default
~/.cache/accel-port). Arrays are torch CPU tensors; ORT copies them to the device per call.

Op-level calls run each op as its own one-op ONNX graph through ORT (see GraphBackend), so op-level
conformance on this target measures ORT's kernels, at the price of an export per op signature the
first time.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, ClassVar

from accel.backend import Capabilities
from accel.backends.graph_export import GraphBackend, Lowering, torch
from accel.errors import BackendUnavailable

try:
    import onnx
    import onnxruntime as ort
except ImportError as e:
    raise BackendUnavailable(f"onnxruntime cannot be imported ({e}); pip install 'accel-port[onnx]'") from None

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "cann": "CANNExecutionProvider"}
# ORT's CPU provider lacks float16/bfloat16 kernels for most of the ops a model uses
DTYPES = {"cpu": ("float32",), "cuda": ("float32", "float16"), "cann": ("float32", "float16")}


class OnnxLowering(Lowering):
    name: ClassVar[str] = "onnx"
    what: ClassVar[str] = "ONNX export (torch.onnx.export) for onnxruntime"
    suffix: ClassVar[str] = ".onnx"
    weights_in_graph: ClassVar[bool] = True

    def __init__(self, provider: str, device_id: int):
        self.provider, self.device_id = provider, device_id

    def key(self) -> str:
        # the provider is not in the key: one ONNX file serves every execution provider
        import onnxscript

        return f"onnx {onnx.__version__} onnxscript {onnxscript.__version__}"

    def build(self, ep: Any, path: Path) -> dict[str, Any]:
        # NumPy code the models run under dynamo (Qwen v1's logn scale: `positions > seq_length`)
        # becomes aten.greater & co, aliases the exporter's type-promotion pass has no rule for: a
        # float64-vs-int64 comparison would reach ORT unpromoted and fail to load. Renamed to gt & co.
        a = torch.ops.aten
        renames = {getattr(alias, o): getattr(op, o) for alias, op in ((a.greater, a.gt), (a.greater_equal, a.ge),
                   (a.less, a.lt), (a.less_equal, a.le), (a.not_equal, a.ne)) for o in ("Tensor", "Scalar")}
        for node in ep.graph.nodes:  # same schema, so a rename in place (a decomposition run re-traces)
            if node.op == "call_function" and node.target in renames:
                node.target = renames[node.target]
        ep.graph_module.recompile()
        program = torch.onnx.export(ep, dynamo=True, verbose=False)
        # past 2 GB protobuf cannot hold the initializers: they go to a side file
        large = sum(p.numel() * p.element_size() for p in ep.state_dict.values()) > 1 << 30
        program.save(str(path), external_data=large)
        return {}

    def load(self, path: Path, meta: dict[str, Any]) -> Any:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        provider: Any = self.provider
        if self.provider != "CPUExecutionProvider":
            provider = (self.provider, {"device_id": self.device_id})
        session = ort.InferenceSession(str(path), options, providers=[provider])
        names = [i.name for i in session.get_inputs()]

        def run(inputs: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
            outs = session.run(None, {n: t.detach().contiguous().numpy() for n, t in zip(names, inputs)})
            return [torch.from_numpy(o) for o in outs]

        return run


class OnnxRuntimeBackend(GraphBackend):
    name: ClassVar[str] = "onnxruntime"
    device_kinds: ClassVar[tuple[str, ...]] = ("cpu", "cuda", "cann")

    def __init__(self, device: str, policy: Any = None):
        kind, _, index = device.partition(":")
        self.kind = kind
        self.lowering = OnnxLowering(PROVIDERS[kind], int(index) if index else 0)
        super().__init__(device, policy)

    @classmethod
    def probe(cls, device: str) -> str | None:
        kind, _, index = device.partition(":")
        if kind not in PROVIDERS:
            return f"onnxruntime has no device kind {kind!r}"
        if kind == "cpu" and index:
            return "onnxruntime:cpu takes no device index"
        available = _providers()
        if PROVIDERS[kind] not in available:
            package = {"cuda": "onnxruntime-gpu", "cann": "onnxruntime-cann"}.get(kind, "onnxruntime")
            return (f"this onnxruntime {ort.__version__} build has no {PROVIDERS[kind]} (it has "
                    f"{', '.join(available)}); install {package}")
        return None

    def capabilities(self) -> Capabilities:
        return Capabilities(DTYPES[self.kind], training=False, compiled=True,
                            versions={"onnxruntime": ort.__version__, "onnx": onnx.__version__,
                                      "torch": torch.__version__, "provider": PROVIDERS[self.kind]})


@functools.lru_cache(maxsize=1)
def _providers() -> tuple[str, ...]:
    return tuple(ort.get_available_providers())
