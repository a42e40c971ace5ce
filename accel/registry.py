"""Backend registry: the in-tree table plus the `accel.backends` entry-point group, loaded lazily.

An entry point's value is "package.module:BackendClass"; its name is the backend name used in target
strings. A vendor ships a backend as its own distribution with such an entry point and nothing here
changes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from accel.errors import BackendUnavailable, UnknownTarget


@dataclass(frozen=True)
class BackendEntry:
    name: str
    ref: str  # "module:Class"
    device_kinds: tuple[str, ...]  # known without importing the framework, for `accel targets`
    install_hint: str


BUILTIN: tuple[BackendEntry, ...] = (
    BackendEntry("numpy", "accel.backends.numpy_ref:NumpyBackend", ("cpu",), "numpy ships with accel-port"),
    BackendEntry("torch", "accel.backends.torch_eager:TorchBackend", ("cpu", "cuda", "npu"), "pip install torch"),
    BackendEntry("torch-compile", "accel.backends.torch_compile:TorchCompileBackend", ("cpu", "cuda", "npu"),
                 "pip install torch"),
    BackendEntry("mindspore", "accel.backends.mindspore:MindSporeBackend", ("cpu", "gpu", "ascend"),
                 "pip install 'accel-port[mindspore]'"),
    BackendEntry("xla", "accel.backends.xla:XlaBackend", ("cpu", "gpu", "tpu"), "pip install 'accel-port[xla]'"),
    BackendEntry("onnxruntime", "accel.backends.onnxruntime:OnnxRuntimeBackend", ("cpu", "cuda", "cann"),
                 "pip install 'accel-port[onnx]'"),
    BackendEntry("tvm", "accel.backends.tvm:TvmBackend", ("llvm", "cuda"), "pip install 'accel-port[tvm]'"),
)


def entries() -> dict[str, BackendEntry]:
    table = {e.name: e for e in BUILTIN}
    for ep in entry_points(group="accel.backends"):
        if ep.name not in table:
            table[ep.name] = BackendEntry(ep.name, ep.value, (), f"installed by the package providing {ep.value}")
    return table


def load(name: str) -> Any:
    """The backend class for `name`. Raises UnknownTarget for an unknown name and BackendUnavailable
    when its framework cannot be imported."""
    table = entries()
    if name not in table:
        raise UnknownTarget(f"no backend named {name!r}; known backends: {', '.join(table)}")
    entry = table[name]
    module_name, _, attr = entry.ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except BackendUnavailable:
        raise
    except ImportError as e:
        raise BackendUnavailable(f"backend {name} cannot be imported ({e}); {entry.install_hint}") from None
    return getattr(module, attr)
