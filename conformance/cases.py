"""Running one case on one target and judging it: op-level cases against the NumPy float64 oracle,
model inference (prefill logits) and generation (greedy tokens with the KV cache) against numpy:cpu.
A failing model case is localised: its taps are compared layer by layer with the reference's and the
first tap (and the op that produced it) past tolerance is named."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from accel.conformance.metrics import compare, exact
from accel.conformance.op_cases import OpCase

from accel.dtypes import to_numpy_dtype
from accel.errors import ConformanceError
from accel.ops import reference

STATUSES = ("pass", "fail", "known-failure", "skipped", "crashed", "timeout")


@dataclass
class Row:
    target: str
    case: str  # ops | inference | generation | ...
    model: str  # the model preset, or op[shape] for op-level cases
    dtype: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    first_divergence: dict[str, Any] | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@lru_cache(maxsize=1)
def tolerances() -> dict[str, dict[str, dict[str, float]]]:
    import yaml

    return yaml.safe_load((Path(__file__).parent / "tolerances.yaml").read_text())


def judge(check: str, dtype: str, m: dict[str, float]) -> str | None:
    """None when the metrics are within the tolerances of `check` at `dtype`, else what is out."""
    try:
        tol = tolerances()[check][dtype]
    except KeyError:
        raise ConformanceError(f"tolerances.yaml has no entry for {check}/{dtype}") from None
    if m.get("nonfinite_mismatch", 0):
        return f"{int(m['nonfinite_mismatch'])} non-finite value(s) where the reference is finite"
    bound = tol["atol"] + tol["rtol"] * m["ref_max_abs"]
    if m["max_abs"] > bound:
        return f"max abs error {m['max_abs']:.3g} > {bound:.3g}"
    if m["cosine"] < tol["cosine"]:
        return f"cosine {m['cosine']:.9f} < {tol['cosine']}"
    return None


def _seed(*parts: str) -> int:
    return zlib.crc32("/".join(parts).encode())


# --- op-level -------------------------------------------------------------------------------------


def _round(x: Any, dtype: str) -> Any:
    if isinstance(x, np.ndarray) and x.dtype.kind == "f":
        return x.astype(to_numpy_dtype(dtype))
    if isinstance(x, list) and x and isinstance(x[0], np.ndarray):
        return [_round(a, dtype) for a in x]
    return x


def _to_device(backend: Any, x: Any, dtype: str) -> Any:
    if isinstance(x, np.ndarray):
        return backend.asarray(x, dtype if x.dtype.kind in "fV" else None)
    if isinstance(x, list) and x and isinstance(x[0], np.ndarray):
        return [_to_device(backend, a, dtype) for a in x]
    return x


def _flat(backend: Any, out: Any) -> np.ndarray:
    if isinstance(out, list | tuple):
        return np.concatenate([np.asarray(backend.to_numpy(o), dtype=np.float64).ravel() for o in out])
    return np.asarray(backend.to_numpy(out))


def run_op_case(backend: Any, case: OpCase, dtype: str) -> Row:
    name = f"{case.op}[{case.shape}]"
    if dtype not in backend.capabilities().dtypes:
        return Row(backend.target, "ops", name, dtype, "skipped", detail=f"{dtype} not supported")
    args, kwargs = case.make(np.random.default_rng(_seed(case.op, case.shape)))
    args, kwargs = [_round(a, dtype) for a in args], {k: _round(v, dtype) for k, v in kwargs.items()}
    expected = reference(case.op)(*args, **kwargs)
    expected = np.concatenate([np.ravel(e) for e in expected]) if isinstance(expected, list | tuple) else expected
    dev_args = [_to_device(backend, a, dtype) for a in args]
    dev_kwargs = {k: _to_device(backend, v, dtype) for k, v in kwargs.items()}
    actual = _flat(backend, getattr(backend.ops, case.op)(*dev_args, **dev_kwargs))
    if case.exact:
        want = np.asarray(expected).astype(actual.dtype) if case.op != "cast" else np.asarray(expected)
        ok = exact(actual.ravel(), want.ravel())
        return Row(backend.target, "ops", name, dtype, "pass" if ok else "fail", compare(actual, expected),
                   detail="" if ok else "not bit-exact")
    m = compare(actual, expected, dtype)
    problem = judge("ops", dtype, m)
    return Row(backend.target, "ops", name, dtype, "fail" if problem else "pass", m, detail=problem or "")


# --- model cases ----------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _model(preset: str) -> tuple[Any, dict[str, np.ndarray], np.ndarray]:
    from accel.models import from_preset

    model, params = from_preset(preset, seed=0)
    ids = np.random.default_rng(_seed(preset, "ids")).integers(0, model.vocab_size, (2, 12))
    return model, params, ids


@lru_cache(maxsize=1)
def _reference_backend() -> Any:
    from accel.backends.numpy_ref import NumpyBackend

    return NumpyBackend("cpu")


@lru_cache(maxsize=8)
def _reference_run(preset: str) -> tuple[np.ndarray, dict[str, Any], dict[str, str]]:
    from accel.models._layers import Taps

    from accel.runtime import place

    model, params, ids = _model(preset)
    ref = _reference_backend()
    taps = Taps()
    logits = model.forward(ref.ops, place(ref, params, "float64"), ref.asarray(ids), taps=taps)
    return np.asarray(logits), dict(taps), dict(taps.ops)


def localise(backend: Any, preset: str, dtype: str, params: dict[str, Any]) -> dict[str, Any] | None:
    """The first tap (in forward order) whose output is out of tolerance against the reference."""
    from accel.models._layers import Taps

    model, _, ids = _model(preset)
    _, ref_taps, ref_ops = _reference_run(preset)
    taps = Taps()
    backend.compile(lambda: model.forward(backend.ops, params, backend.asarray(ids, "int64"), taps=taps))()
    for name, expected in ref_taps.items():
        if name not in taps:
            return {"tap": name, "op": ref_ops[name], "detail": "tap missing on the target"}
        m = compare(np.asarray(backend.to_numpy(taps[name]), dtype=np.float64), expected, dtype)
        problem = judge("inference", dtype, m)
        if problem:
            layer = name.split(".")[1] if name.startswith("layers.") else None
            return {"tap": name, "op": ref_ops[name], "layer": layer, "detail": problem,
                    "cosine": m["cosine"], "max_abs": m["max_abs"]}
    return None


def run_inference_case(backend: Any, preset: str, dtype: str) -> Row:
    from accel.runtime import infer, place

    if dtype not in backend.capabilities().dtypes:
        return Row(backend.target, "inference", preset, dtype, "skipped", detail=f"{dtype} not supported")
    model, params, ids = _model(preset)
    expected, _, _ = _reference_run(preset)
    device_params = place(backend, params, dtype)
    actual = infer(model, backend, device_params, ids)
    m = compare(actual, expected, dtype)
    problem = judge("inference", dtype, m)
    if problem is None:
        return Row(backend.target, "inference", preset, dtype, "pass", m)
    return Row(backend.target, "inference", preset, dtype, "fail", m,
               first_divergence=localise(backend, preset, dtype, device_params), detail=problem)


def run_generation_case(backend: Any, preset: str, dtype: str, new_tokens: int = 8) -> Row:
    """Greedy tokens with the KV cache on the target against full recomputation on the reference."""
    from accel.runtime import generate, place

    if dtype not in backend.capabilities().dtypes:
        return Row(backend.target, "generation", preset, dtype, "skipped", detail=f"{dtype} not supported")
    model, params, ids = _model(preset)
    expected = _reference_tokens(preset, new_tokens)
    actual = generate(model, backend, place(backend, params, dtype), ids[:1], new_tokens, use_cache=True)[0]
    agree = float(np.mean(actual == expected))
    first_diff = int(np.argmax(actual != expected)) if agree < 1 else None
    return Row(backend.target, "generation", preset, dtype, "pass" if agree == 1 else "fail",
               {"token_agreement": agree, "new_tokens": float(new_tokens)},
               detail="" if agree == 1 else
               f"tokens differ from step {first_diff}: {actual.tolist()} vs {expected.tolist()}")


@lru_cache(maxsize=8)
def _reference_tokens(preset: str, new_tokens: int) -> np.ndarray:
    from accel.runtime import generate, place

    model, params, ids = _model(preset)
    ref = _reference_backend()
    return generate(model, ref, place(ref, params, "float64"), ids[:1], new_tokens, use_cache=False)[0]
