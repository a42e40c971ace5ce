"""Accuracy metrics of a target's output against a reference.

Two families, named apart:
- msprobe's (Ascend's `mindstudio-probe` 26.2.0), under its names and definitions, edge cases included:
  what `msprobe compare` reports per dumped tensor (`dump_metrics`) and what its API accuracy checker
  computes for its precision standards (`benchmark_metrics`, `ulp_metrics`, `absolute_threshold_metrics`,
  `binary_error_rate`). Tests hold them equal to msprobe's own functions.
- accel's own (`accel_metrics`), in float64 over the elements finite in both: `accel_cosine` at full
  precision (msprobe rounds it to 6 decimals above 0.9999), `max_abs`, `max_rel`/`mean_rel` over normal
  reference values only, `accel_rmse` over every finite element, the reference's scale (`ref_max_abs`,
  `ref_rms`) and `nonfinite_mismatch`. No name is shared with a metric msprobe defines otherwise.
  conformance/tolerances.py's `accel` standard judges these.

Arrays are taken as msprobe holds them: the target's output in its own dtype (bfloat16 as float32,
which is how msprobe reads a bfloat16 tensor into NumPy), and the reference in the "bench" dtype
msprobe's checker computes it in (float32 for float16/bfloat16 outputs, float64 for float32;
api_accuracy_checker/acc_check/acc_check_utils.py PRECISION_MAPPING), cast from accel's float64.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from accel.dtypes import to_numpy_dtype

FLOATING = ("float16", "bfloat16", "float32", "float64")
# the dtype msprobe's checker computes its benchmark ("bench") output in, per output dtype
BENCH_DTYPE = {"float16": np.float32, "bfloat16": np.float32, "float32": np.float64, "float64": np.float64}


def _msprobe_array(x: Any) -> np.ndarray:
    """An output as msprobe reads it into NumPy: bfloat16 (and other ml_dtypes) as float32."""
    a = np.asarray(x)
    if a.dtype.kind == "V" or a.dtype in (np.dtype(ml_dtypes.bfloat16),):
        a = a.astype(np.float32)
    return a


def _fmt(value: float) -> float:
    """msprobe/core/common/utils.py format_value: 12 decimals."""
    return float(f"{value:.12f}")


# ---- `msprobe compare`: core/compare/algorithm/builtin_algorithm/alg_*.py after npy_compare.ValidateTensor

def dump_metrics(actual: Any, expected: Any) -> dict[str, float | None]:
    """What `msprobe compare` reports for one tensor pair, None where it reports no number: an empty or
    shape-mismatched pair; inf/nan at different positions (at the same positions they count as 0); a
    scalar or single element for cosine, euclidean distance and the error ratios."""
    n, b = np.squeeze(_msprobe_array(actual)), np.squeeze(_msprobe_array(expected))  # pt_compare read_pt_data
    none = dict.fromkeys(("cosine", "euclidean_distance", "max_abs_err", "max_relative_err",
                          "one_thousandth_err_ratio", "five_thousandths_err_ratio"))
    if n.size == 0 or n.shape != b.shape:
        return none
    if n.shape:  # ValidateTensor._check_nan_inf (not reached for 0-d tensors: _check_scalar stops the chain)
        n, b = n.copy(), b.copy()
        n_inf, b_inf, n_nan, b_nan = np.isinf(n), np.isinf(b), np.isnan(n), np.isnan(b)
        if n_inf.any() or n_nan.any() or b_inf.any() or b_nan.any():
            if not (np.array_equal(n_inf, b_inf) and np.array_equal(n_nan, b_nan)):
                return none
            n[n_inf | n_nan] = 0
            b[b_inf | b_nan] = 0
    flat_n, flat_b = n.reshape(-1).astype(float), b.reshape(-1).astype(float)  # compare/utils.py flatten_numpy
    with np.errstate(all="ignore"):  # a 0-d inf/nan pair is not cleaned (above): it gives no number below
        max_abs = float(np.max(np.abs(flat_n - flat_b)))
        rel = _relative_err(n, b)
    max_rel = float(np.max(rel))
    return {
        "cosine": _cosine(flat_n, flat_b) if n.size > 1 else None,
        "euclidean_distance": float(np.linalg.norm(flat_n - flat_b, ord=2)) if n.ndim else None,
        "max_abs_err": None if np.isnan(max_abs) else _fmt(max_abs),
        "max_relative_err": None if np.isnan(max_rel) else _fmt(max_rel),
        "one_thousandth_err_ratio": _fmt(np.sum(rel < 0.001) / rel.size) if n.ndim else None,
        "five_thousandths_err_ratio": _fmt(np.sum(rel < 0.005) / rel.size) if n.ndim else None,
    }


def _cosine(n: np.ndarray, b: np.ndarray) -> float | None:
    """alg_cosine_similarity.compare: 1 when both are all zero, none when one is; 6 decimals above 0.9999."""
    eps = np.finfo(float).eps
    with np.errstate(divide="ignore", invalid="ignore"):
        na, nb = np.linalg.norm(n), np.linalg.norm(b)
        if na <= eps and nb <= eps:
            return 1.0
        if na <= eps or nb <= eps:
            return None
        cos = np.dot(n, b) / (na * nb)
    if np.isnan(cos):
        return None
    cos = _fmt(cos)
    return round(cos, 6) if cos > 0.9999 else cos


def _relative_err(n: np.ndarray, b: np.ndarray) -> np.ndarray:
    """compare/utils.py get_relative_err: |n - b| / |b| in at least float32, eps added to both where b is 0."""
    result_type = np.result_type(n, b, np.float32)
    n, b = n.astype(result_type), b.astype(result_type)
    zero = b == 0
    eps = np.finfo(result_type).eps
    n[zero] += eps
    b[zero] += eps
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.abs((n - b) / b)


# ---- msprobe's API accuracy checker: api_accuracy_checker/compare/algorithm.py, precision_standard/*.py

# precision_standard/standard_config.py StandardConfig: _small_value, _benchmark_small_value_atol,
# _threshold_small_value_atol, _rtol
SMALL_VALUE = {"float16": 2.0**-10, "bfloat16": 2.0**-10, "float32": 2.0**-20}
BENCHMARK_SMALL_VALUE_ATOL = {"float16": 1e-16, "bfloat16": 1e-16, "float32": 2.0**-30}
THRESHOLD_SMALL_VALUE_ATOL = {"float16": 2.0**-16, "bfloat16": 1e-16, "float32": 2.0**-30}
RTOL = {"float16": 2.0**-10, "bfloat16": 2.0**-8, "float32": 2.0**-20}
BFLOAT16_EPS = 2.0**-8  # core/common/const.py CompareConst.BFLOAT16_EPS
BFLOAT16_MAX = 3.3895313892515355e38


def checker_arrays(actual: Any, expected: Any, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(device, bench) as the checker's Comparator._compare_torch_tensor holds them: the output in its
    dtype (bfloat16 in float32), the reference in the bench dtype."""
    with np.errstate(over="ignore"):  # past the dtype's range is inf, as on the device
        device = _msprobe_array(np.asarray(actual).astype(to_numpy_dtype(dtype)))
    bench = np.asarray(expected).astype(BENCH_DTYPE[dtype])
    if device.shape != bench.shape:
        raise ValueError(f"cannot compare shape {device.shape} with {bench.shape}")
    return device, bench


def _masks(device: np.ndarray, bench: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """BaseCompare's shared statistics (algorithm.py get_abs_bench_with_eps, get_finite_and_infinite_mask,
    get_abs_err)."""
    abs_bench = np.abs(bench)
    eps = BFLOAT16_EPS if dtype == "bfloat16" else np.finfo(bench.dtype).eps
    with np.errstate(all="ignore"):
        both_finite = np.isfinite(device) & np.isfinite(bench.astype(device.dtype))
        abs_err = np.abs(device - bench)
    return {"abs_bench": abs_bench, "abs_bench_eps": abs_bench + eps, "finite": both_finite,
            "inf_nan": ~both_finite, "abs_err": abs_err}


def benchmark_metrics(actual: Any, expected: Any, dtype: str) -> dict[str, float]:
    """precision_standard/benchmark_compare.py BenchmarkCompare._compute_metrics: small-value error ratio,
    RMSE, error balance, max and mean relative error (the relative errors leave out small and non-finite
    values; RMSE leaves them out but rescales; error balance counts over all elements)."""
    device, bench = checker_arrays(actual, expected, dtype)
    s = _masks(device, bench, dtype)
    small = (s["abs_bench"] <= SMALL_VALUE[dtype]) & s["finite"]
    greater = s["abs_err"] > BENCHMARK_SMALL_VALUE_ATOL[dtype]
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(small | s["inf_nan"], -1, s["abs_err"] / s["abs_bench_eps"])  # get_rel_err
    masked = small | s["inf_nan"]  # get_rmse, called with the small values masked too
    mse = np.mean(np.square(np.where(masked, 0, s["abs_err"])))
    mse = mse * (s["abs_err"].size / (s["abs_err"].size - np.sum(masked) + 0.0001) + 0.0001)
    with np.errstate(all="ignore"):
        diff = device - bench.astype(device.dtype)  # get_error_balance: the bench cast to the device dtype
    kept = rel[rel >= 0]
    return {
        "small_value_err_ratio": float(np.sum(small & greater) / np.sum(small)) if small.any() else 0.0,
        "rmse": float(np.sqrt(mse)),
        "error_balance": float(abs(np.sum(diff > 0) - np.sum(diff < 0)) / bench.size) if bench.size else 0.0,
        "max_rel_error": float(np.max(rel)) if np.max(rel) >= 0 else 0.0,
        "mean_rel_error": float(np.mean(kept)) if kept.size else 0.0,
    }


# compare/compare_utils.py ULP_PARAMETERS: the least exponent and mantissa bits of each dtype
ULP_PARAMETERS = {"float16": (-14, 10), "bfloat16": (-126, 7), "float32": (-126, 23)}


def ulp_metrics(actual: Any, expected: Any, dtype: str) -> dict[str, float]:
    """precision_standard/ulp_compare.py UlpCompare: the error in units in the last place of the bench
    value's exponent (the spacing at 1.0 where the bench value is 0, algorithm.py get_ulp_err), its max,
    mean and the share of elements above 32 ULP (float32) or 1 ULP (float16/bfloat16)."""
    device, bench = checker_arrays(actual, expected, dtype)
    min_eb, mantissa = ULP_PARAMETERS[dtype]
    abs_bench = np.abs(bench)
    with np.errstate(divide="ignore"):
        eb = np.maximum(np.where(abs_bench == 0, 0, np.floor(np.log2(abs_bench))), min_eb)
    wide = np.float64 if dtype == "float32" else np.float32
    with np.errstate(over="ignore", invalid="ignore"):
        ulp_err = np.abs((device.astype(wide) - bench).astype(wide) * np.exp2(-eb + mantissa).astype(wide))
    threshold = 32 if dtype == "float32" else 1  # CompareConst.ULP_FLOAT32_THRESHOLD / ULP_FLOAT16_THRESHOLD
    return {"max_ulp_error": float(np.max(ulp_err)), "mean_ulp_error": float(np.mean(ulp_err)),
            "ulp_error_proportion": float(np.sum(ulp_err > threshold) / bench.size)}


def absolute_threshold_metrics(actual: Any, expected: Any, dtype: str) -> dict[str, float]:
    """precision_standard/absolute_threshold.py AbsolutethdCompare: shares of inf/nan that disagree (after
    clipping both to the dtype's range), of normal values beyond the relative tolerance, of small values
    beyond the absolute tolerance."""
    device, bench = checker_arrays(actual, expected, dtype)
    s = _masks(device, bench, dtype)
    rtol = RTOL[dtype]
    with np.errstate(all="ignore"):
        rel = s["abs_err"] / s["abs_bench_eps"]
        top = BFLOAT16_MAX if dtype == "bfloat16" else float(np.finfo(device.dtype).max)
        golden = np.clip(bench.astype(device.dtype), -top, top)  # algorithm.py check_inf_nan_value
        clipped_rel = np.abs(np.clip(device, -top, top) - golden) / s["abs_bench_eps"]
    passing = (clipped_rel <= rtol) | (np.isnan(device) & np.isnan(golden))
    inf_nan_err = ~passing & s["inf_nan"]
    small = (s["abs_bench"] <= SMALL_VALUE[dtype]) & s["finite"]
    normal = s["finite"] & ~small
    return {
        "inf_nan_error_ratio": float(inf_nan_err.sum() / s["inf_nan"].sum()) if s["inf_nan"].any() else 0.0,
        "rel_err_ratio": float(np.sum((rel > rtol) & normal) / normal.sum()) if normal.any() else 0.0,
        "abs_err_ratio": float(np.sum((s["abs_err"] > THRESHOLD_SMALL_VALUE_ATOL[dtype]) & small) / small.sum())
        if small.any() else 0.0,
    }


def binary_error_rate(actual: Any, expected: Any) -> float:
    """algorithm.py compare_bool_tensor: the share of elements that differ (integer and bool outputs)."""
    a, e = np.asarray(actual), np.asarray(expected)
    if a.shape != e.shape:
        raise ValueError(f"cannot compare shape {a.shape} with {e.shape}")
    return float(np.sum(a != e) / e.size) if e.size else 0.0


def checker_metrics(actual: Any, expected: Any, dtype: str) -> dict[str, float]:
    """The metrics msprobe's standard for an output of `dtype` judges it by: the benchmark metrics for
    float16/bfloat16/float32, the error rate for integer and bool outputs, none for float64 (which
    msprobe's checker does not judge: compare_utils.py API_PRECISION_COMPARE_UNSUPPORT_LIST). The ULP
    and absolute-threshold metrics, whose standards judge float8 only, are computed where asked for."""
    if dtype not in FLOATING:
        return {"error_rate": binary_error_rate(actual, expected)}
    return {} if dtype == "float64" else benchmark_metrics(actual, expected, dtype)


# ---- accel's own

SMALL = {"float16": 2.0**-10, "bfloat16": 2.0**-10, "float32": 2.0**-20, "float64": 1e-7}


def accel_metrics(actual: Any, expected: Any, dtype: str | None = None) -> dict[str, float]:
    """accel's metrics, in float64 over the elements finite in both (any shapes of equal size): cosine at
    full precision, max abs error, relative errors over normal reference values only (|ref| > SMALL of
    the dtype), RMSE, the reference's largest magnitude and RMS (the scale of absolute bounds), and the
    count of positions where exactly one side is finite or the non-finite values differ."""
    a = np.asarray(actual, dtype=np.float64).ravel()
    e = np.asarray(expected, dtype=np.float64).ravel()
    if a.shape != e.shape:
        raise ValueError(f"cannot compare {a.size} elements with {e.size}")
    finite_a, finite_e = np.isfinite(a), np.isfinite(e)
    both_nonfinite = ~finite_a & ~finite_e
    same = both_nonfinite & ((np.isnan(a) & np.isnan(e)) | (a == e))
    out = {"elements": float(a.size),
           "nonfinite_mismatch": float(np.count_nonzero((finite_a != finite_e) | (both_nonfinite & ~same)))}
    both = finite_a & finite_e
    a, e = a[both], e[both]
    if a.size == 0:
        return out | {"accel_cosine": 1.0, "max_abs": 0.0, "max_rel": 0.0, "mean_rel": 0.0,
                      "accel_rmse": 0.0, "ref_max_abs": 0.0, "ref_rms": 0.0}
    abs_err = np.abs(a - e)
    normal = np.abs(e) > SMALL.get(dtype or "float64", 1e-7)
    rel = abs_err[normal] / np.abs(e[normal]) if normal.any() else np.zeros(1)
    na, ne = np.linalg.norm(a), np.linalg.norm(e)
    cosine = 1.0 if na == 0 and ne == 0 else 0.0 if na == 0 or ne == 0 else float(np.dot(a, e) / (na * ne))
    return out | {
        "accel_cosine": cosine,
        "max_abs": float(abs_err.max()),
        "max_rel": float(rel.max()),
        "mean_rel": float(rel.mean()),
        "accel_rmse": float(np.sqrt(np.mean(abs_err * abs_err))),
        "ref_max_abs": float(np.abs(e).max()),
        "ref_rms": float(np.sqrt(np.mean(e * e))),
    }


def compare(actual: Any, expected: Any, dtype: str | None = None) -> dict[str, float]:
    """Every metric of `actual` (an output computed in `dtype`) against `expected` (the float64 reference):
    msprobe's compare metrics and its checker's metrics for that dtype, then accel's own. Metrics msprobe
    leaves undefined for this pair are absent."""
    dtype = dtype or "float64"
    ours = accel_metrics(actual, expected, dtype)
    a = np.asarray(actual)
    if a.dtype == np.float64 and dtype in FLOATING and dtype != "float64":  # an output widened to float64
        a = a.astype(to_numpy_dtype(dtype))
    e = np.asarray(expected, dtype=np.float64).reshape(a.shape)
    theirs = dump_metrics(a, e.astype(BENCH_DTYPE.get(dtype, np.float64))) | checker_metrics(a, e, dtype)
    return {k: float(v) for k, v in theirs.items() if v is not None} | ours


def ulp(x: np.ndarray, dtype: str) -> np.ndarray:
    """Spacing of `dtype` at |x| (its value of one unit in the last place), as float64."""
    info = ml_dtypes.finfo(to_numpy_dtype(dtype))
    mag = np.maximum(np.abs(x), float(info.smallest_normal))
    return np.maximum(2.0 ** (np.floor(np.log2(mag)) - int(info.nmant)), float(info.smallest_subnormal))


def exact(actual: Any, expected: Any) -> bool:
    a, e = np.asarray(actual), np.asarray(expected)
    return a.shape == e.shape and bool(np.array_equal(a, e, equal_nan=a.dtype.kind == "f"))
