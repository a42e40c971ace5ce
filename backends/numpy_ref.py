"""`numpy:cpu`: the float64 reference. Its ops are the oracles documented in `accel.ops`; forward only."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from accel import ops as reference_ops
from accel.backend import BackendBase, Capabilities
from accel.dtypes import to_numpy_dtype
from accel.routing import Impl


class NumpyBackend(BackendBase):
    name: ClassVar[str] = "numpy"
    device_kinds: ClassVar[tuple[str, ...]] = ("cpu",)

    @classmethod
    def probe(cls, device: str) -> str | None:
        return None if device == "cpu" else "numpy runs on the host only: use numpy:cpu"

    def implementations(self) -> dict[str, list[Impl]]:
        return {name: [Impl("reference", spec.reference)] for name, spec in reference_ops.OPS.items()}

    def capabilities(self) -> Capabilities:
        return Capabilities(dtypes=("float64",), training=False, versions={"numpy": np.__version__})

    def asarray(self, a: Any, dtype: str | None = None) -> np.ndarray:
        # The reference computes every float in float64, whatever float dtype is asked for; the
        # dtype a run may use is checked once, by check_dtype, where the run starts.
        a = np.asarray(a)
        if a.dtype.kind in "fV":
            return a.astype(np.float64)
        return a if dtype is None else a.astype(to_numpy_dtype(dtype))

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)
