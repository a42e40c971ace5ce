"""conformance/metrics.py's msprobe metrics and conformance/tolerances.py's msprobe standards against the
real mindstudio-probe package: its compare algorithms, its checker's precision-standard classes and its
api_precision_compare verdicts, on tensor pairs covering the edge cases at float32/float16/bfloat16."""

from __future__ import annotations

import math

import numpy as np
import pytest

from accel.conformance import tolerances
from accel.conformance.metrics import (
    BENCH_DTYPE,
    absolute_threshold_metrics,
    benchmark_metrics,
    binary_error_rate,
    dump_metrics,
    ulp_metrics,
)
from accel.dtypes import to_numpy_dtype

torch = pytest.importorskip("torch")
pytest.importorskip("msprobe")

from msprobe.core.common.const import CompareConst  # noqa: E402
from msprobe.core.compare.npy_compare import CompareResult, ValidateTensor, compare_ops_apply  # noqa: E402
from msprobe.pytorch.api_accuracy_checker.compare import algorithm as msalg  # noqa: E402
from msprobe.pytorch.api_accuracy_checker.compare.compare_column import CompareColumn  # noqa: E402
from msprobe.pytorch.api_accuracy_checker.compare.compare_input import (  # noqa: E402
    CompareInput,
    PrecisionCompareInput,
)
from msprobe.pytorch.api_accuracy_checker.compare.compare_utils import ApiPrecisionCompareColumn as Col  # noqa: E402
from msprobe.pytorch.api_accuracy_checker.precision_standard.absolute_threshold import (  # noqa: E402
    AbsolutethdCompare,
)
from msprobe.pytorch.api_accuracy_checker.precision_standard.benchmark_compare import (  # noqa: E402
    BenchmarkCompare,
    BenchmarkPrecisionCompare,
)
from msprobe.pytorch.api_accuracy_checker.precision_standard.ulp_compare import (  # noqa: E402
    UlpCompare,
    UlpPrecisionCompare,
)

DTYPES = ("float32", "float16", "bfloat16")
TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(target output before rounding to its dtype, float64 reference), named by the edge case."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=256)
    tiny = rng.normal(scale=2.0**-12, size=256)
    with_inf = x.copy()
    with_inf[[3, 50]] = [np.inf, -np.inf]
    with_nan = x.copy()
    with_nan[[7, 9]] = np.nan
    nan_moved = with_nan.copy()
    nan_moved[[7, 11]] = [1.0, np.nan]
    mixed = x * 10.0 ** rng.integers(-8, 4, size=256)
    zero_ref = x.copy()
    zero_ref[::5] = 0.0
    outlier = x.copy()
    outlier[100] += 5.0
    return {
        "noise": (x * (1 + 1e-3 * rng.normal(size=256)), x),
        "exact": (x, x),
        "both zero": (np.zeros(64), np.zeros(64)),
        "target zero": (np.zeros(64), x[:64]),
        "reference zero": (x[:64], np.zeros(64)),
        "near zero": (tiny * (1 + 0.01 * rng.normal(size=256)), tiny),
        "near zero offset": (tiny + 2.0**-14, tiny),
        "inf alike": (with_inf, with_inf),
        "nan alike": (with_nan * 1.001, with_nan),
        "nan moved": (nan_moved, with_nan),
        "inf vs finite": (with_inf, x),
        "constant": (np.full(32, 3.0), np.full(32, 3.0)),
        "constant off": (np.full(32, 3.01), np.full(32, 3.0)),
        "one element": (np.array([1.5]), np.array([1.25])),
        "scalar": (np.array(2.5), np.array(2.0)),
        "one outlier": (outlier, x),
        "sign flip": (-x, x),
        "mixed magnitudes": (mixed * (1 + 1e-4 * rng.normal(size=256)), mixed),
        "zeros in reference": (zero_ref + 1e-3 * rng.normal(size=256), zero_ref),
        "biased low": (x - np.abs(x) * 2e-3, x),
        "overflow": (np.array([7.0e4, 1.0, -7.0e4, 2.0]), np.array([6.0e4, 1.0, -6.0e4, 2.0])),
        "matrix": ((x * 1.01).reshape(16, 16), x.reshape(16, 16)),
    }


PAIRS = _pairs()
CHECKER_PAIRS = [c for c, (_, e) in PAIRS.items() if np.ndim(e)]  # msprobe's checker takes no 0-d tensor


def _device(actual: np.ndarray, dtype: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(actual).astype(to_numpy_dtype(dtype))


def _torch_pair(actual: np.ndarray, expected: np.ndarray, dtype: str):
    """(device, bench) tensors as msprobe's checker makes them: the output in its dtype, the bench one
    precision up (acc_check_utils.py PRECISION_MAPPING)."""
    bench = torch.from_numpy(np.asarray(expected).astype(BENCH_DTYPE[dtype]))
    device = torch.from_numpy(np.asarray(_device(actual, dtype), dtype=np.float32)).to(TORCH_DTYPE[dtype])
    return device, bench


def _checker_numpy(device, bench):
    """Comparator._compare_torch_tensor: bfloat16 outputs (and their bench) go to NumPy as float32."""
    if device.dtype == torch.bfloat16:
        device, bench = device.to(torch.float32), bench.to(torch.float32)
    return device.numpy(), bench.numpy()


def _number(v) -> float | None:
    if isinstance(v, str):
        return None
    return float(v)


def _same(ours: float | None, theirs: float | None, what: str) -> None:
    if theirs is None or (isinstance(theirs, float) and math.isnan(theirs)):
        assert ours is None or math.isnan(ours), f"{what}: msprobe leaves it undefined, ours {ours}"
        return
    assert ours is not None, f"{what}: msprobe {theirs}, ours undefined"
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-300), f"{what}: ours {ours}, msprobe {theirs}"


def _msprobe_dump_metrics(n: np.ndarray, b: np.ndarray) -> list[float | None]:
    """msprobe compare on one tensor pair read from .pt files: pt_compare read_pt_data squeezes, then
    multiprocessing_compute validates and applies the built-in algorithms."""
    result = ValidateTensor().check_tensor(CompareResult(np.squeeze(n).copy(), np.squeeze(b).copy()))
    values, _ = compare_ops_apply(result.n_value, result.b_value, result.error_flag, result.err_msg,
                                  column_names=CompareConst.BUILTIN_COMPARE_COLUMNS)
    return [_number(v) for v in values]


DUMP_KEYS = ("cosine", "euclidean_distance", "max_abs_err", "max_relative_err", "one_thousandth_err_ratio",
             "five_thousandths_err_ratio")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(PAIRS))
def test_dump_metrics_equal_msprobe_compare(case, dtype):
    actual, expected = PAIRS[case]
    device, bench = _checker_numpy(*_torch_pair(actual, expected, dtype))
    # two dumps of one dtype, as msprobe compare meets them (an NPU dump and a GPU one)
    bench_same = _device(expected, dtype).astype(device.dtype)
    for n, b in ((device, bench_same), (device, bench)):
        theirs = _msprobe_dump_metrics(n, b)
        ours = dump_metrics(n, b)
        for key, value in zip(DUMP_KEYS, theirs):
            _same(ours[key], value, f"{case}/{dtype}/{key}")


def _column(cls, device, bench, dtype: str) -> CompareColumn:
    column = CompareColumn()
    d, b = _checker_numpy(device, bench)
    cls(CompareInput(b, d, column, TORCH_DTYPE[dtype])).compare()
    return column


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CHECKER_PAIRS)
def test_checker_metrics_equal_msprobe_standards(case, dtype):
    actual, expected = PAIRS[case]
    device, bench = _torch_pair(actual, expected, dtype)
    with np.errstate(all="ignore"):
        bm = _column(BenchmarkCompare, device, bench, dtype)
        um = _column(UlpCompare, device, bench, dtype)
        am = _column(AbsolutethdCompare, device, bench, dtype)
    ours = (benchmark_metrics(actual, expected, dtype) | ulp_metrics(actual, expected, dtype)
            | absolute_threshold_metrics(actual, expected, dtype))
    pairs = {"small_value_err_ratio": bm.small_value_err_ratio, "rmse": bm.rmse, "error_balance": bm.eb,
             "max_rel_error": bm.max_rel_error, "mean_rel_error": bm.mean_rel_error,
             "max_ulp_error": um.max_ulp_error, "mean_ulp_error": um.mean_ulp_error,
             "ulp_error_proportion": um.ulp_error_proportion, "inf_nan_error_ratio": am.inf_nan_error_ratio,
             "rel_err_ratio": am.rel_err_ratio, "abs_err_ratio": am.abs_err_ratio}
    for key, theirs in pairs.items():
        _same(ours[key], _number(theirs), f"{case}/{dtype}/{key}")
    from msprobe.pytorch.api_accuracy_checker.compare.api_precision_compare import get_absolute_threshold_result

    row = {Col.INF_NAN_ERROR_RATIO: repr(am.inf_nan_error_ratio), Col.REL_ERR_RATIO: repr(am.rel_err_ratio),
           Col.ABS_ERR_RATIO: repr(am.abs_err_ratio)}
    verdict = get_absolute_threshold_result(row)["absolute_threshold_result"]
    assert (tolerances.absolute_threshold(ours) is None) == (verdict == CompareConst.PASS), (case, dtype)


def _row(m: dict[str, float], dtype: str) -> dict[str, str]:
    """A row of the checker's detail CSV as api_precision_compare reads it (values as strings)."""
    cells = {Col.SMALL_VALUE_ERROR_RATE: m["small_value_err_ratio"], Col.RMSE: m["rmse"],
             Col.MAX_REL_ERR: m["max_rel_error"], Col.MEAN_REL_ERR: m["mean_rel_error"], Col.EB: m["error_balance"],
             Col.MEAN_ULP_ERR: m["mean_ulp_error"], Col.ULP_ERR_PROPORTION: m["ulp_error_proportion"]}
    return {k: repr(float(v)) for k, v in cells.items()} | {Col.DEVICE_DTYPE: f"torch.{dtype}"}


def _reference_device(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """A reference device's output: the reference nudged by a fixed relative error, or exact where the
    target is (so both the 'as good' and 'worse' branches of every standard occur)."""
    return np.asarray(expected) * (1 + 2e-3 * np.cos(np.arange(np.asarray(expected).size))).reshape(
        np.shape(expected))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CHECKER_PAIRS)
def test_standard_verdicts_equal_msprobe(case, dtype):
    actual, expected = PAIRS[case]
    reference = _reference_device(actual, expected)
    verdicts = []
    for target, device_out in ((actual, reference), (reference, actual), (actual, actual)):
        with np.errstate(all="ignore"):
            m = benchmark_metrics(target, expected, dtype) | ulp_metrics(target, expected, dtype)
            d = benchmark_metrics(device_out, expected, dtype) | ulp_metrics(device_out, expected, dtype)
        for ours, cls in ((tolerances.benchmark(m, d, dtype), BenchmarkPrecisionCompare),
                          (tolerances.ulp(m, d, dtype), UlpPrecisionCompare)):
            inputs = PrecisionCompareInput(_row(m, dtype), _row(d, dtype), f"torch.{dtype}", _OutputColumn())
            theirs = cls(inputs).compare()
            verdicts.append(theirs)
            assert (ours is None) == (theirs == CompareConst.PASS), (case, dtype, cls.__name__, ours, theirs)
    assert verdicts  # every pair judged by both standards, three ways round


class _OutputColumn:
    """api_precision_compare's output column: the standards write their statuses into it."""

    compare_message = ""

    def update(self, metrics):
        for k, v in metrics.items():
            setattr(self, k, v)


def test_benchmark_levels_follow_msprobe_api_lists():
    rng = np.random.default_rng(3)
    x = rng.normal(size=512)
    m = benchmark_metrics(x * (1 + 6e-3 * rng.normal(size=512)), x, "float32")
    d = benchmark_metrics(x * (1 + 4e-3 * rng.normal(size=512)), x, "float32")
    for api in ("linear", "embedding", "matmul"):
        row = PrecisionCompareInput(_row(m | ulp_metrics(x, x, "float32"), "float32"),
                                    _row(d | ulp_metrics(x, x, "float32"), "float32"), "torch.float32",
                                    _OutputColumn(), api_name=api)
        theirs = BenchmarkPrecisionCompare(row).compare()
        assert (tolerances.benchmark(m, d, "float32", api) is None) == (theirs == CompareConst.PASS), api
    assert tolerances.api_level("matmul") == "L2" and tolerances.api_level("linear") == "L0"


@pytest.mark.parametrize("case", ["exact", "constant off", "one element"])
def test_binary_consistency_equals_msprobe(case):
    actual, expected = PAIRS[case]
    a, e = np.round(np.asarray(actual) * 4).astype(np.int64), np.round(np.asarray(expected) * 4).astype(np.int64)
    theirs, status, _ = msalg.compare_bool_tensor(e, a)
    assert binary_error_rate(a, e) == pytest.approx(theirs)
    ours = tolerances.binary_consistency({"error_rate": binary_error_rate(a, e)})
    assert (ours is None) == (status == CompareConst.PASS)


def test_msprobe_standard_by_dtype_as_its_registry():
    from msprobe.pytorch.api_accuracy_checker.precision_standard.standard_register import StandardRegistry

    registry = StandardRegistry()
    for dtype in ("float16", "bfloat16", "float32"):
        assert registry._get_standard_category("linear", TORCH_DTYPE[dtype], torch.float32) == CompareConst.BENCHMARK
        assert tolerances.msprobe_standard(dtype) == "benchmark"
    assert registry._get_standard_category("argmax", torch.int64, torch.float32) == CompareConst.BINARY_CONSISTENCY
    assert tolerances.msprobe_standard("int64") == "binary_consistency"
    assert tolerances.msprobe_standard("float64") is None  # msprobe's checker does not judge float64
