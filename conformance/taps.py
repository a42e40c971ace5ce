"""Where a model's run departs from the float64 reference: its taps (named intermediate outputs) on a
backend, the first tap out of tolerance, each layer re-run on the reference's own input to it, and the
taps written as an msprobe dump under the Hugging Face module names."""

from __future__ import annotations

import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from accel.conformance.metrics import compare
from accel.conformance.tolerances import bounds, judge, needs_reference_device
from accel.errors import AccelError


@lru_cache(maxsize=1)
def reference_backend() -> Any:
    from accel.targets import open_target

    return open_target("numpy:cpu", policy={})


def placed(backend: Any, params: dict[str, Any], dtype: str) -> Any:
    """The weights on a backend for a forward; on the float64 reference each tensor is cast as it is
    read, and a large one by the op itself, a block at a time (runtime.LazyPlacement): its whole copy of
    a bfloat16 checkpoint would be 4x the weights."""
    from accel.runtime import place, place_lazily

    if backend.target == "numpy:cpu":
        return place_lazily(backend, params, dtype, as_stored=1 << 22)
    return place(backend, params, dtype)


def forward_with_taps(backend: Any, model: Any, params: dict[str, Any], ids: np.ndarray,
                       dtype: str) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, str]]:
    from accel.models._layers import Taps

    tapped: dict[int, tuple[Any, Taps, Any]] = vars(backend).setdefault("_accel_tapped_forwards", {})
    if id(model) not in tapped:  # one compiled forward per target and model: its graphs serve every case
        taps = Taps()
        tapped[id(model)] = (model, taps, backend.compile(lambda p, x: model.forward(backend.ops, p, x, taps=taps)))
    _, taps, run = tapped[id(model)]
    taps.clear()
    taps.ops.clear()
    logits = run(placed(backend, params, dtype), backend.asarray(ids, "int64"))
    as_np = {k: np.asarray(backend.to_numpy(v), dtype=np.float64) for k, v in taps.items()}
    return np.asarray(backend.to_numpy(logits), dtype=np.float64), as_np, dict(taps.ops)


_REFERENCE_RUNS: dict[tuple[str, int], tuple[np.ndarray, dict[str, np.ndarray], dict[str, str]]] = {}


def reference_run(model: Any, params: dict[str, np.ndarray], ids: np.ndarray, key: str):
    """float64 logits and taps of the numpy:cpu reference (cached per preset and input)."""
    cache_key = (key, zlib.crc32(ids.tobytes()))
    if cache_key not in _REFERENCE_RUNS:
        _REFERENCE_RUNS[cache_key] = forward_with_taps(reference_backend(), model, params, ids, "float64")
    return _REFERENCE_RUNS[cache_key]


def localise(taps: dict[str, np.ndarray], ref_taps: dict[str, np.ndarray], ops_of: dict[str, str], dtype: str,
             device_taps: dict[str, np.ndarray] | None = None) -> tuple[dict[str, Any] | None, list[float]]:
    """(the first tap, in forward order, out of tolerance against the reference; max abs error per
    layer). `device_taps`: the reference device's taps, for the low-precision ratio rule."""
    first = None
    per_layer: dict[int, float] = {}
    for name, expected in ref_taps.items():
        if name not in taps:
            first = first or {"tap": name, "op": ops_of.get(name, "?"), "layer": None, "detail": "tap missing"}
            continue
        m = compare(taps[name], expected, dtype)
        if name.startswith("layers."):
            layer = int(name.split(".")[1])
            per_layer[layer] = max(per_layer.get(layer, 0.0), m["max_abs"])
        ref_m = compare(device_taps[name], expected, dtype) if device_taps is not None else None
        problem = judge("taps", dtype, m, ref_m, op=ops_of.get(name)).problem
        if problem and first is None:
            layer = int(name.split(".")[1]) if name.startswith("layers.") else None
            first = {"tap": name, "op": ops_of.get(name, "?"), "layer": layer, "detail": problem,
                     "cosine": m["accel_cosine"], "max_abs": m["max_abs"]}
    return first, [per_layer[i] for i in sorted(per_layer)]


def hf_module(model: Any, order: list[str], tap: str) -> str | None:
    """The Hugging Face module (its msprobe dump name) that a divergence first seen at `tap` is in."""
    from accel.msprobe_dump import module_for_tap, module_map

    try:
        m = module_for_tap(module_map(model.model_type, model.num_layers), order, tap)
    except AccelError:  # a family without msprobe names
        return None
    return f"Module.{m.module}.{m.classes[0]}.forward.0" if m is not None else None


def module_calls(model: Any, dtype: str, taps: dict[str, np.ndarray]) -> list[Any]:
    """`taps` as the Hugging Face model's module calls (accel/msprobe_names.yaml), in `dtype`, for an msprobe
    dump: each mapped module with its output and, where tapped, its input."""
    from accel.dtypes import to_numpy_dtype
    from accel.msprobe_dump import ModuleCall, from_tap_layout, module_map

    def as_dumped(name: str, layout: str | None) -> np.ndarray:
        return from_tap_layout(np.asarray(taps[name]).astype(to_numpy_dtype(dtype)), layout)

    return [ModuleCall(m.module, m.classes[0], [as_dumped(m.tap_in, m.in_layout)] if m.tap_in in taps else [],
                       [as_dumped(m.tap_out, m.out_layout)])
            for m in module_map(model.model_type, model.num_layers) if m.tap_out in taps]


def dump_taps(directory: Path, target: str, model: Any, preset: str, dtype: str, taps: dict[str, np.ndarray]) -> None:
    """`taps` (of one prompt) as an msprobe dump: DIRECTORY/<backend>_<device>/<model>/<dtype>/step0/rank0."""
    from accel.msprobe_dump import write_dump

    folder = directory / target.replace(":", "_") / Path(preset).name / dtype
    folder.parent.mkdir(parents=True, exist_ok=True)
    write_dump(folder, module_calls(model, dtype, taps))


def eager_taps(backend: Any, model: Any, on_device: Any, ids: Any, inject: dict[str, Any] | None = None,
               until: str | None = None) -> Any:
    """The Taps of an eager forward of weights and ids already on `backend`, with `inject`'s values taken
    in place of what it computes at those taps, stopped after tap `until`."""
    from accel.models._layers import TapReached, Taps

    taps = Taps(inject, until=until)
    try:
        model.forward(backend.ops, on_device, ids, taps=taps)
    except TapReached:
        pass
    return taps


def isolate_layers(backend: Any, model: Any, params: dict[str, Any], ids: np.ndarray, dtype: str,
                   ref_taps: dict[str, np.ndarray]) -> list[dict[str, float]]:
    """Each layer run on the reference's own input to it (the previous layer's output, or the embedding):
    the error that layer makes by itself, whatever flows in from before. The metrics are of what the
    layer adds to the residual stream (its output less its input) against the reference's, with
    `out_scale`, the largest magnitude of its output: checkpoints carry massive activations in a few
    channels of the residual stream, beside which a layer's error vanishes in metrics of its output
    alone. Eager, on the backend's ops (a compiler would need a graph per layer)."""
    on_device = placed(backend, params, dtype)
    x = backend.asarray(ids, "int64")
    out = []
    for i in range(model.num_layers):
        source, name = "embed" if i == 0 else f"layers.{i - 1}.out", f"layers.{i}.out"
        fed = backend.asarray(ref_taps[source], dtype)
        taps = eager_taps(backend, model, on_device, x, {source: fed}, until=name)
        got = np.asarray(backend.to_numpy(taps[name]), dtype=np.float64)
        given = np.asarray(backend.to_numpy(fed), dtype=np.float64)  # the input as the layer saw it, rounded
        m = compare(got - given, ref_taps[name] - ref_taps[source], dtype)
        out.append(m | {"out_scale": float(np.abs(ref_taps[name]).max())})
    return out


UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def local_problem(m: dict[str, float], dtype: str, device: dict[str, float] | None = None) -> str | None:
    """Whether a layer's own error (see `isolate_layers`) is out of tolerance: the taps' bound on what
    it adds, plus two roundings at its output's scale (the residual adds round there, however small
    the layer's share); at low precision against the reference device's own error, which carries the
    same roundings."""
    if device is not None and needs_reference_device("taps", dtype):
        return judge("taps", dtype, m, device).problem
    tol = bounds("taps", dtype)
    limit = tol["atol"] + tol["rtol"] * m["ref_max_abs"] + 2 * UNIT_ROUNDOFF[dtype] * m["out_scale"]
    return f"max abs error {m['max_abs']:.3g} > {limit:.3g}" if m["max_abs"] > limit else None


def first_local_layer(local: list[dict[str, float]], dtype: str,
                      device_local: list[dict[str, float]] | None = None) -> int | None:
    """The first layer whose own error (see `isolate_layers`) is out of tolerance."""
    for i, m in enumerate(local):
        if local_problem(m, dtype, device_local[i] if device_local is not None else None):
            return i
    return None
