"""Accuracy metrics of a target's output against a reference, as Ascend's msprobe and CANN's precision
standards report them: cosine similarity, max absolute and relative error, share of elements within
0.1% / 0.5% relative error, RMSE, error balance, and ULP distance for low-precision outputs."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from accel.dtypes import to_numpy_dtype

# Relative errors are taken over "normal" reference values only: msprobe's accuracy checker leaves out
# small values (|ref| <= 2^-10 for float16/bfloat16, 2^-20 for float32), where a relative error means
# nothing; float64 and dtype-less comparisons use 1e-7.
SMALL = {"float16": 2.0**-10, "bfloat16": 2.0**-10, "float32": 2.0**-20, "float64": 1e-7}


def compare(actual: Any, expected: Any, dtype: str | None = None) -> dict[str, float]:
    """Metrics of `actual` against `expected` (any shapes of equal size; compared in float64).
    `dtype`, when low precision, adds `max_ulp`: the error in units in the last place of that dtype."""
    a = np.asarray(actual, dtype=np.float64).ravel()
    e = np.asarray(expected, dtype=np.float64).ravel()
    if a.shape != e.shape:
        raise ValueError(f"cannot compare {a.size} elements with {e.size}")
    out: dict[str, float] = {"elements": float(a.size)}
    finite_a, finite_e = np.isfinite(a), np.isfinite(e)
    both_nonfinite = ~finite_a & ~finite_e
    same = both_nonfinite & ((np.isnan(a) & np.isnan(e)) | (a == e))
    out["nonfinite_mismatch"] = float(np.count_nonzero((finite_a != finite_e) | (both_nonfinite & ~same)))
    both = finite_a & finite_e
    a, e = a[both], e[both]
    if a.size == 0:
        return out | {"cosine": 1.0, "max_abs": 0.0, "max_rel": 0.0, "mean_rel": 0.0, "within_0.1%": 1.0,
                      "within_0.5%": 1.0, "rmse": 0.0, "error_balance": 0.0, "ref_max_abs": 0.0, "ref_rms": 0.0}
    diff = a - e
    abs_err = np.abs(diff)
    normal = np.abs(e) > SMALL.get(dtype or "float64", 1e-7)
    rel = abs_err[normal] / np.abs(e[normal])
    if rel.size == 0:
        rel = np.zeros(1)
    na, ne = np.linalg.norm(a), np.linalg.norm(e)
    if na == 0 and ne == 0:
        cosine = 1.0
    elif na == 0 or ne == 0:
        cosine = 0.0
    else:
        cosine = float(np.dot(a, e) / (na * ne))
    pos, neg = np.count_nonzero(diff > 0), np.count_nonzero(diff < 0)
    out |= {
        "cosine": cosine,
        "max_abs": float(abs_err.max()),
        "max_rel": float(rel.max()),
        "mean_rel": float(rel.mean()),
        "within_0.1%": float(np.mean(rel <= 1e-3)),
        "within_0.5%": float(np.mean(rel <= 5e-3)),
        "rmse": float(np.sqrt(np.mean(diff * diff))),
        # error balance: +1 all errors high, -1 all low, 0 balanced (a biased kernel drifts in training)
        "error_balance": float((pos - neg) / max(pos + neg, 1)),
        "ref_max_abs": float(np.abs(e).max()),
        "ref_rms": float(np.sqrt(np.mean(e * e))),
    }
    if dtype in ("float16", "bfloat16"):
        out["max_ulp"] = float(np.max(abs_err / ulp(e, dtype)))
    return out


def ulp(x: np.ndarray, dtype: str) -> np.ndarray:
    """Spacing of `dtype` at |x| (its value of one unit in the last place), as float64."""
    info = ml_dtypes.finfo(to_numpy_dtype(dtype))
    mant = int(info.nmant)
    tiny = float(info.smallest_subnormal)
    mag = np.maximum(np.abs(x), float(info.smallest_normal))
    return np.maximum(2.0 ** (np.floor(np.log2(mag)) - mant), tiny)


def exact(actual: Any, expected: Any) -> bool:
    a, e = np.asarray(actual), np.asarray(expected)
    return a.shape == e.shape and bool(np.array_equal(a, e, equal_nan=a.dtype.kind == "f"))
