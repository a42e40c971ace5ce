"""Judging a target's output, by msprobe's precision standards as msprobe applies them and by accel's own.

msprobe (mindstudio-probe 26.2.0; api_accuracy_checker/precision_standard/standard_register.py
StandardRegistry._get_standard_category) sends every float16/bfloat16/float32 output to its benchmark
standard: the target's error against a high-precision bench divided by a reference device's error on
the same inputs, each floored at a minimum error of the dtype (compare/algorithm.py calc_ratio), must
stay within limits per API level. Integer and bool outputs get binary consistency (no element may
differ). float64 outputs it does not judge. Its ULP standard is for float8 outputs and its absolute-
threshold standard for float8 inputs only: accel's targets produce neither, so neither judges a row,
but both are here by name. The limits are msprobe's, in conformance/tolerances.yaml under `msprobe`.
These are the standards of msprobe's API accuracy checker: they judge one API's (or module's) output on
given inputs, so they judge op rows and a module re-run on a dump's own inputs; a whole model's logits,
which msprobe compares (`msprobe compare`) and reports without a standard, accel's standard judges.

accel's own standard (`accel`), stricter, judges every row beside msprobe's: at float64/float32 absolute
bounds (cosine >= `cosine`, max_abs <= atol + rtol * ref_max_abs); at float16/bfloat16 RMSE and mean
relative error at most 2x, max relative error at most 10x the reference device's, where an error within
CANN's absolute standard (mean relative error < T, max < 10 T, RMSE < T x the reference's RMS) passes
regardless; and its cosine at full precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from accel.errors import ConformanceError

LOW_PRECISION = ("float16", "bfloat16")
BENCHMARK_DTYPES = ("float16", "bfloat16", "float32")  # what msprobe's benchmark standard judges


@lru_cache(maxsize=1)
def table() -> dict[str, Any]:
    import yaml

    return yaml.safe_load((Path(__file__).parent / "tolerances.yaml").read_text())


def bounds(check: str, dtype: str) -> dict[str, float]:
    try:
        return table()[check][dtype]
    except KeyError:
        raise ConformanceError(f"conformance/tolerances.yaml has no entry for {check}/{dtype}") from None


@dataclass
class Verdict:
    """Each standard that judged an output, with None where it passes or what fails."""

    by: dict[str, str | None] = field(default_factory=dict)

    @property
    def problem(self) -> str | None:
        failing = [f"{name}: {p}" for name, p in self.by.items() if p]
        return "; ".join(failing) or None

    def summary(self) -> dict[str, str]:
        return {name: p or "pass" for name, p in self.by.items()}


def msprobe_standard(dtype: str) -> str | None:
    """The standard msprobe judges an output of `dtype` by; None for float64, which it does not judge."""
    if dtype in BENCHMARK_DTYPES:
        return "benchmark"
    return None if dtype == "float64" else "binary_consistency"


def api_level(op: str | None) -> str:
    """standard_config.py StandardConfig.get_api_level: L2 and L1 APIs are held tighter than L0."""
    levels = table()["msprobe"]["benchmark"]
    return "L2" if op in levels["L2_apis"] else "L1" if op in levels["L1_apis"] else "L0"


def _ratio(target: float, device: float, floor: float) -> tuple[float, bool]:
    """(ratio, inf/nan-consistent) as BenchmarkPrecisionCompare._calc_ratio and calc_ratio take it."""
    if any(math.isnan(v) or math.isinf(v) for v in (target, device)):
        same = (math.isnan(target) and math.isnan(device)) or (math.isinf(target) and target == device)
        return math.nan, same
    return abs(target) / max(abs(device), floor), True


def benchmark(m: dict[str, float], device: dict[str, float], dtype: str, op: str | None = None) -> str | None:
    """precision_standard/benchmark_compare.py BenchmarkPrecisionCompare._get_status: the small-value error
    ratio, RMSE, max and mean relative error of the target over the reference device's, floored at the
    dtype's minimum error, each within its limit (error balance is reported, not judged)."""
    spec = table()["msprobe"]["benchmark"]
    limits, floor = spec["ratio_limits"][api_level(op)], spec["minimum_error"][dtype]
    for key, limit in limits.items():
        ratio, consistent = _ratio(m[key], device[key], floor)
        if not consistent:
            return f"{key} {m[key]} where the reference device has {device[key]}"
        if ratio > limit:  # a nan ratio (both inf/nan alike) passes
            return (f"{key} {m[key]:.3g} is {ratio:.3g}x the reference device's {device[key]:.3g} "
                    f"(floor {floor:.3g}; limit {limit:g}x)")
    return None


def ulp(m: dict[str, float], device: dict[str, float], dtype: str) -> str | None:
    """precision_standard/ulp_compare.py UlpPrecisionCompare._get_status: float32 passes on a mean ULP error
    below 64, or a share above 32 ULP below 5%, or that share no worse than the reference device's;
    float16/bfloat16 on a share above 1 ULP below 0.1%, or no worse than the reference device's."""
    spec = table()["msprobe"]["ulp"]["float32" if dtype == "float32" else "half"]
    floor = table()["msprobe"]["benchmark"]["minimum_error"][dtype]
    share, device_share = m["ulp_error_proportion"], device["ulp_error_proportion"]
    _, mean_consistent = _ratio(m["mean_ulp_error"], device["mean_ulp_error"], floor)
    ratio, share_consistent = _ratio(share, device_share, floor)
    if not (mean_consistent and share_consistent):
        return "ULP errors inf/nan where the reference device's are not"
    if dtype == "float32" and m["mean_ulp_error"] < spec["mean_ulp_error"]:
        return None
    if share < spec["ulp_error_proportion"] or ratio < spec["proportion_ratio"]:
        return None
    return f"{share:.3g} of elements beyond the ULP threshold, {ratio:.3g}x the reference device's share"


def absolute_threshold(m: dict[str, float]) -> str | None:
    """api_precision_compare.py get_absolute_threshold_result: no inf/nan mismatch, no normal value beyond
    the relative tolerance, no small value beyond the absolute tolerance."""
    failing = [k for k in ("inf_nan_error_ratio", "rel_err_ratio", "abs_err_ratio") if m[k] != 0]
    return ", ".join(f"{k} {m[k]:.3g} > 0" for k in failing) or None


def binary_consistency(m: dict[str, float]) -> str | None:
    """api_precision_compare.py record_binary_consistency_result: every element equal."""
    return f"{m['error_rate']:.3g} of elements differ" if m["error_rate"] != 0 else None


def accel(check: str, dtype: str, m: dict[str, float], ref: dict[str, float] | None = None) -> str | None:
    """accel's own standard (see the module docstring). `ref`: the reference device's metrics on the same
    case, for the low-precision rule; without it (the target is the reference device) the absolute
    atol/rtol bounds of the dtype apply."""
    tol = bounds(check, dtype)
    if m.get("nonfinite_mismatch", 0):
        return f"{int(m['nonfinite_mismatch'])} non-finite value(s) where the reference is finite"
    if "T" in tol and ref is not None:
        T = tol["T"]
        for key, ratio, floor in (("accel_rmse", tol["rmse_ratio"], T * m["ref_rms"]),
                                  ("mean_rel", tol["mean_rel_ratio"], T),
                                  ("max_rel", tol["max_rel_ratio"], tol["max_rel_ratio"] * T)):
            limit = max(ratio * ref[key], floor)
            if m[key] > limit:
                return (f"{key.removeprefix('accel_').replace('_', ' ')} {m[key]:.3g} > {ratio:g}x the reference "
                        f"device's {ref[key]:.3g} and > {floor:.3g}")
    else:  # float32/float64, or the reference device itself at low precision
        limit = tol["atol"] + tol["rtol"] * m["ref_max_abs"]
        if m["max_abs"] > limit:
            return f"max abs error {m['max_abs']:.3g} > {limit:.3g}"
    if m["accel_cosine"] < tol["cosine"]:
        return f"cosine {m['accel_cosine']:.9f} < {tol['cosine']}"
    return None


def judge(check: str, dtype: str, m: dict[str, float], ref: dict[str, float] | None = None,
          op: str | None = None) -> Verdict:
    """msprobe's standard for `dtype` (on the checks msprobe's standards are for, where a reference device's
    metrics `ref` are there to judge against) and accel's, on metrics `m` of the target against the float64
    reference."""
    verdict = Verdict()
    standard = msprobe_standard(dtype) if check in table()["msprobe"]["judges"] else None
    if standard == "benchmark" and ref is not None and "rmse" in ref:
        verdict.by["msprobe benchmark"] = benchmark(m, ref, dtype, op)
    elif standard == "binary_consistency" and "error_rate" in m:
        verdict.by["msprobe binary consistency"] = binary_consistency(m)
    verdict.by["accel"] = accel(check, dtype, m, ref if needs_reference_device(check, dtype) else None)
    return verdict


def needs_reference_device(check: str, dtype: str) -> bool:
    """Whether accel's standard at `dtype` judges against the reference device's error."""
    return "T" in bounds(check, dtype)


def wants_reference_device(check: str, dtype: str) -> bool:
    """Whether any standard at `dtype` judges against the reference device's error (msprobe's benchmark
    standard does at every dtype it judges)."""
    return needs_reference_device(check, dtype) or (
        check in table()["msprobe"]["judges"] and msprobe_standard(dtype) == "benchmark")


def relative_loss_error(losses: Any, ref_losses: Any) -> float:
    """Mean over steps of |loss - ref| / |ref|: the loss-curve criterion used for training on Ascend."""
    pairs = list(zip(losses, ref_losses, strict=True))
    return sum(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs) / max(len(pairs), 1)
