"""dtype names shared by every backend. Backends speak these strings; NumPy holds bfloat16 through
ml_dtypes, which is also how checkpoints carry it."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from accel.errors import UnsupportedDtype

FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
INT_DTYPES = ("int64", "int32", "int8", "uint8", "bool")

_NUMPY: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _NUMPY.items()}


def to_numpy_dtype(name: str) -> np.dtype:
    try:
        return _NUMPY[name]
    except KeyError:
        raise UnsupportedDtype(f"unknown dtype {name!r}; use one of {', '.join(_NUMPY)}") from None


def name_of(dtype: np.dtype | type) -> str:
    try:
        return _NAMES[np.dtype(dtype)]
    except KeyError:
        raise UnsupportedDtype(f"numpy dtype {np.dtype(dtype)} has no accel name") from None


def is_float(name: str) -> bool:
    return name in FLOAT_DTYPES


def check_float(name: str) -> str:
    if name not in FLOAT_DTYPES:
        raise UnsupportedDtype(f"--dtype {name!r} is not a float dtype; use one of {', '.join(FLOAT_DTYPES)}")
    return name
