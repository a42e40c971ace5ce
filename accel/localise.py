"""Where a device's run of a model departs from accel's float64 reference, read from an msprobe dump.

An msprobe PyTorch dump of the Hugging Face model, taken on the target device, holds each module's
inputs and outputs (accel/msprobe_dump.py reads it; accel/msprobe_names.yaml says which accel tap each
module's input and output is). The dump's own token ids are replayed through accel's reference, and
for each module two errors are measured:
- propagated: the module's dumped output against the reference's, all error before it included;
- layer-isolated: the reference re-run on the module's dumped input (Taps.inject), so that the error is
  the module's own. Judged by msprobe's benchmark standard, as msprobe's API checker judges an API
  re-run on its dumped inputs: its error over the reference device's (torch:cpu at the dump's dtype, on
  the same input), floored at the dtype's minimum error.
The first module whose isolated error fails is the divergence. Decoder layers (and the modules before
and after them) are isolated first; then the modules inside the first failing one.

A statistics-only dump holds no tensors: the token ids come from --input-ids, and each module's output
statistics are compared with the reference's as msprobe compare judges statistics
(core/compare/indicator_analysis/algorithm.py RelativeErrChecker): a module whose input's norm is
within 10% of the reference's and whose output's is off by more than 50% is the divergence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from accel.errors import AccelError
from accel.msprobe_dump import Dump, Entry, MappedModule, call_site, module_map, read_dump, to_tap_layout

REFERENCE_DEVICE = "torch:cpu"
BOUNDARY = ("embed", "final_norm", "logits")  # with layers.{i}.out: the taps between coarse units


class LocaliseError(AccelError):
    pass


@dataclass
class ModuleResult:
    entry: str  # the dump's name: Module.model.layers.1.mlp.Qwen2MLP.forward.0
    module: str
    cls: str
    tap: str  # the accel tap its output is
    op: str  # the accel op that computes that tap
    layer: int | None
    propagated: dict[str, float] = field(default_factory=dict)
    isolated: dict[str, float] = field(default_factory=dict)
    isolated_problem: str | None = None  # msprobe's benchmark standard on the isolated error
    propagated_problem: str | None = None  # accel's taps standard on the propagated error
    called_at: str | None = None  # where the model's code called it (stack.json)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Localisation:
    dump: str
    dtype: str
    tokens: int
    statistics_only: bool
    modules: list[ModuleResult]
    first: ModuleResult | None  # the first module out of tolerance on its own input (or by statistics)

    def as_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.__dict__.items() if k not in ("modules", "first")},
                "first": self.first.as_dict() if self.first else None,
                "modules": [m.as_dict() for m in self.modules]}


def _layer(tap: str) -> int | None:
    return int(tap.split(".")[1]) if tap.startswith("layers.") else None


def _mapped(dump: Dump, model: Any) -> list[tuple[MappedModule, Entry]]:
    """The dump's first forward call of each mapped module, in dump order."""
    by_path = {m.module: m for m in module_map(model.model_type, model.num_layers)}
    found = [(by_path[e.module], e) for e in dump.entries
             if e.direction == "forward" and e.call == 0 and e.module in by_path and e.cls in by_path[e.module].classes]
    if not found:
        raise LocaliseError(f"{dump.path / 'dump.json'} has no module of a {model.model_type} model "
                            f"({model.num_layers} layers): dump the same model with level L0 or mix")
    return found


def _input_ids(found: list[tuple[MappedModule, Entry]], input_ids: np.ndarray | None) -> np.ndarray:
    if input_ids is not None:
        return input_ids
    embed = next((e for m, e in found if m.tap_out == "embed"), None)
    record = embed.inputs()[0] if embed is not None and embed.inputs() else None
    if record is None or record.path is None:
        raise LocaliseError("the dump holds no token ids (a statistics dump, or no embedding module): "
                            "give the prompt's ids with --input-ids")
    ids = record.load(keep_dtype=True)
    return ids.reshape(1, -1) if ids.ndim == 1 else ids


def _dtype(found: list[tuple[MappedModule, Entry]]) -> str:
    for _, e in found:
        for t in e.outputs():
            if t.dtype in ("float32", "float16", "bfloat16", "float64"):
                return t.dtype
    raise LocaliseError("the dump's modules have no floating-point output to compare")


class _Runner:
    """Eager forwards of one backend at one dtype, optionally on an injected input, to one tap."""

    def __init__(self, backend: Any, model: Any, params: dict[str, Any], ids: np.ndarray, dtype: str):
        from accel.conformance.taps import placed

        self.backend, self.model, self.dtype = backend, model, dtype
        self.params = placed(backend, params, dtype)
        self.ids = backend.asarray(ids, "int64")

    def taps(self, inject: dict[str, np.ndarray] | None = None, until: str | None = None) -> dict[str, np.ndarray]:
        from accel.conformance.taps import eager_taps

        fed = {k: self.backend.asarray(v, self.dtype) for k, v in (inject or {}).items()}
        taps = eager_taps(self.backend, self.model, self.params, self.ids, fed, until)
        self.ops = dict(taps.ops)
        return {k: np.asarray(self.backend.to_numpy(v), dtype=np.float64) for k, v in taps.items()}


def localise(dump_path: str | Path, model: Any, params: dict[str, Any], step: int | None = None,
             rank: int | str | None = None, input_ids: np.ndarray | None = None,
             progress: Callable[[str], None] | None = None, every: bool = False,
             write_reference: str | Path | None = None) -> Localisation:
    """`every`: re-run every module on its own input, not only the coarse units and the modules inside
    the first failing one (a forward per module: slow on a large model). `write_reference`: a new
    directory for accel's float64 reference on the dump's own inputs, in the dump's dtype, as an msprobe
    dump under the same module names: the golden side of `msprobe compare` for the device's dump."""
    from accel.conformance.metrics import compare
    from accel.conformance.taps import reference_backend
    from accel.conformance.tolerances import accel as accel_standard
    from accel.conformance.tolerances import benchmark, needs_reference_device
    from accel.targets import open_target

    dump = read_dump(dump_path, step=step, rank=rank)
    found = _mapped(dump, model)
    statistics_only = dump.task != "tensor" or all(t.path is None for _, e in found for t in e.outputs())
    ids = _input_ids(found, input_ids)
    dtype = _dtype(found)
    say = progress or (lambda _: None)
    say(f"reference forward (float64) on {ids.shape[-1]} tokens; {len(found)} modules in the dump")
    reference = _Runner(reference_backend(), model, params, ids, "float64")
    ref = reference.taps()
    ops_of = reference.ops
    if write_reference is not None:
        from accel.conformance.taps import module_calls
        from accel.msprobe_dump import write_dump

        write_dump(write_reference, module_calls(model, dtype, ref))
        say(f"accel's reference written to {Path(write_reference) / 'step0' / 'rank0'}")
    device = None if statistics_only else _Runner(open_target(REFERENCE_DEVICE, policy={}), model, params, ids, dtype)
    dev = device.taps() if device is not None and needs_reference_device("taps", dtype) else None
    results = []
    for m, e in found:
        if m.tap_out is None or m.tap_out not in ref:
            continue
        r = ModuleResult(e.name, e.module or "", e.cls or "", m.tap_out, ops_of.get(m.tap_out, "?"), _layer(m.tap_out))
        out = e.outputs()[0]
        if statistics_only:
            r.propagated = _stat_errors(out, ref[m.tap_out])
        else:
            got = to_tap_layout(out.load(), m.out_layout, ref[m.tap_out].shape)
            r.propagated = compare(got, ref[m.tap_out], dtype)
            theirs = compare(dev[m.tap_out], ref[m.tap_out], dtype) if dev is not None else None
            r.propagated_problem = accel_standard("taps", dtype, r.propagated, theirs)
        results.append(r)
    if statistics_only:
        by_stats = _first_by_statistics(found, results, ref)
        if by_stats is not None:
            by_stats.called_at = call_site(dump, by_stats.entry)
        return Localisation(str(dump.path), dtype, int(ids.shape[-1]), True, results, by_stats)

    assert device is not None
    by_entry = {r.entry: r for r in results}

    def isolate(m: MappedModule, e: Entry) -> ModuleResult | None:
        r, source = by_entry.get(e.name), m.tap_in
        if r is None or source is None or source not in ref or not e.inputs():
            return None
        fed = to_tap_layout(e.inputs()[0].load(), m.in_layout, ref[source].shape)
        got = to_tap_layout(e.outputs()[0].load(), m.out_layout, ref[r.tap].shape)
        want = reference.taps({source: fed}, until=r.tap)[r.tap]
        theirs = device.taps({source: fed}, until=r.tap)[r.tap]
        r.isolated = compare(got, want, dtype)
        r.isolated_problem = benchmark(r.isolated, compare(theirs, want, dtype), dtype, op=r.op)
        return r

    coarse = [(m, e) for m, e in found if m.tap_out in BOUNDARY or (m.tap_out or "").endswith(".out")]
    first: ModuleResult | None = None
    for k, (m, e) in enumerate(coarse):
        say(f"isolating {e.name} ({k + 1}/{len(coarse)})")
        unit = isolate(m, e)
        if unit is None or unit.isolated_problem is None:
            continue
        inner = [(mi, ei) for mi, ei in found if (ei.module or "").startswith(f"{e.module}.")]
        for mi, ei in inner:
            say(f"isolating {ei.name} inside it")
            ri = isolate(mi, ei)
            if ri is not None and ri.isolated_problem is not None:
                first = ri
                break
        first = first or unit
        break
    if first is not None:
        first.called_at = call_site(dump, first.entry)
    if every:
        for k, (m, e) in enumerate(found):
            if not by_entry.get(e.name, ModuleResult("", "", "", "", "", None)).isolated:
                say(f"isolating {e.name} ({k + 1}/{len(found)})")
                isolate(m, e)
    return Localisation(str(dump.path), dtype, int(ids.shape[-1]), False, results, first)


def _stat_errors(record: Any, ref: np.ndarray) -> dict[str, float]:
    """The dump's statistics of a tensor against the reference's: max, min, mean and norm, each as
    msprobe compare's statistics columns give them (difference, and relative to the reference)."""
    ours = {"max": float(ref.max()), "min": float(ref.min()), "mean": float(ref.mean()),
            "norm": float(np.linalg.norm(ref.ravel()))}
    out: dict[str, float] = {}
    for key, want in ours.items():
        got = getattr(record, key)
        if got is None:
            continue
        out[f"{key}_diff"] = float(got) - want
        out[f"{key}_relative_err"] = abs(float(got) - want) / abs(want) if want else float(got != want)
    return out


def _first_by_statistics(found: list[tuple[MappedModule, Entry]], results: list[ModuleResult],
                         ref: dict[str, np.ndarray]) -> ModuleResult | None:
    """RelativeErrChecker: input norm within 10% of the reference's, output norm off by more than 50%."""
    by_entry = {r.entry: r for r in results}
    for m, e in found:
        r = by_entry.get(e.name)
        if r is None or "norm_relative_err" not in r.propagated or m.tap_in is None or m.tap_in not in ref:
            continue
        fed = _stat_errors(e.inputs()[0], ref[m.tap_in]) if e.inputs() else {}
        if fed.get("norm_relative_err", 1.0) < 0.1 and r.propagated["norm_relative_err"] > 0.5:
            r.isolated_problem = (f"output norm {r.propagated['norm_relative_err']:.1%} off the reference's, input "
                                  f"norm within {fed['norm_relative_err']:.1%}")
            return r
    return None
