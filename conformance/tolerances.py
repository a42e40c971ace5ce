"""Judging metrics against conformance/tolerances.yaml.

Two rules. At float64/float32 a check has absolute bounds: cosine >= `cosine` and
max_abs <= atol + rtol * ref_max_abs. At float16/bfloat16 the rounding of the dtype dominates, so a
target is judged by its error against the float64 reference relative to the reference device's own
error at that dtype (torch:cpu here, or the device that wrote a golden record), as msprobe's benchmark
method does: RMSE and mean relative error at most 2x, max relative error at most 10x the reference
device's; a target within CANN's absolute standard (mean relative error < T, max < 10 T, RMSE < T x the
reference's RMS) passes regardless; and the cosine must stay >= 0.99.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from accel.errors import ConformanceError

LOW_PRECISION = ("float16", "bfloat16")


@lru_cache(maxsize=1)
def table() -> dict[str, dict[str, dict[str, float]]]:
    import yaml

    return yaml.safe_load((Path(__file__).parent / "tolerances.yaml").read_text())


def bounds(check: str, dtype: str) -> dict[str, float]:
    try:
        return table()[check][dtype]
    except KeyError:
        raise ConformanceError(f"conformance/tolerances.yaml has no entry for {check}/{dtype}") from None


def judge(check: str, dtype: str, m: dict[str, float], ref: dict[str, float] | None = None) -> str | None:
    """None when metrics `m` (target vs the float64 reference) pass `check` at `dtype`, else what fails.
    `ref`: the reference device's metrics on the same case, for the low-precision rule; without it (the
    target is the reference device) the absolute atol/rtol bounds of the dtype apply."""
    tol = bounds(check, dtype)
    if m.get("nonfinite_mismatch", 0):
        return f"{int(m['nonfinite_mismatch'])} non-finite value(s) where the reference is finite"
    if "T" in tol and ref is not None:
        T = tol["T"]
        for key, ratio, floor in (("rmse", tol["rmse_ratio"], T * m["ref_rms"]),
                                  ("mean_rel", tol["mean_rel_ratio"], T),
                                  ("max_rel", tol["max_rel_ratio"], tol["max_rel_ratio"] * T)):
            limit = max(ratio * ref[key], floor)
            if m[key] > limit:
                return (f"{key.replace('_', ' ')} {m[key]:.3g} > {ratio:g}x the reference device's "
                        f"{ref[key]:.3g} and > {floor:.3g}")
    else:  # float32/float64, or the reference device itself at low precision
        limit = tol["atol"] + tol["rtol"] * m["ref_max_abs"]
        if m["max_abs"] > limit:
            return f"max abs error {m['max_abs']:.3g} > {limit:.3g}"
    if m["cosine"] < tol["cosine"]:
        return f"cosine {m['cosine']:.9f} < {tol['cosine']}"
    return None


def needs_reference_device(check: str, dtype: str) -> bool:
    return "T" in bounds(check, dtype)


def relative_loss_error(losses: Any, ref_losses: Any) -> float:
    """Mean over steps of |loss - ref| / |ref|: the loss-curve criterion used for training on Ascend."""
    pairs = list(zip(losses, ref_losses, strict=True))
    return sum(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs) / max(len(pairs), 1)
