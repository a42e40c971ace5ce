"""Running one case on one target and judging it.

Case kinds: op-level (one op against its NumPy float64 oracle), inference (prefill logits against the
numpy:cpu reference model) and generation (greedy tokens with the KV cache against full recomputation
on the reference). Training, checkpoint and collective cases live in their own modules and register in
CASE_KINDS the same way.

Expected values come from the float64 oracle computed here, or from a golden record written on another
machine (`Context.golden`); outputs can be recorded to write one (`Context.recorder`). A failing model
case is localised: its taps are compared layer by layer and the first tap out of tolerance is named
with the op that produced it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from accel.conformance.metrics import compare, exact
from accel.conformance.op_cases import CASES as OP_CASES
from accel.conformance.op_cases import OpCase
from accel.conformance.taps import (
    dump_taps,
    first_local_layer,
    forward_with_taps,
    hf_module,
    isolate_layers,
    localise,
    placed,
    reference_backend,
    reference_run,
)
from accel.conformance.tolerances import LOW_PRECISION, judge, wants_reference_device
from accel.dtypes import to_numpy_dtype
from accel.errors import AccelError, ConformanceError
from accel.ops import reference

STATUSES = ("pass", "fail", "known-failure", "skipped", "crashed", "timeout")
REFERENCE_DEVICE = "torch:cpu"  # judges low precision: a target may be at most `ratio` times worse
GENERATED = 8  # new tokens of a generation case


@dataclass
class Row:
    target: str
    case: str  # ops | inference | generation | training | checkpoints | collectives
    model: str  # the model preset, or op[shape] for op-level cases
    dtype: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    first_divergence: dict[str, Any] | None = None
    detail: str = ""
    series: dict[str, list[float]] = field(default_factory=dict)  # per-layer errors, per-step losses
    seconds: float = 0.0  # wall time of the case in its worker
    standards: dict[str, str] = field(default_factory=dict)  # each standard that judged it: "pass" or what fails

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @property
    def case_id(self) -> str:
        return f"{self.case}/{self.model}/{self.dtype}"


@dataclass
class Context:
    """Where expected values come from, and where outputs go, for the cases of one run."""

    golden: Any = None  # a golden.GoldenRecord: expected values and the recording device's errors
    recorder: Any = None  # a golden.Recorder: inputs/outputs to write as a golden record
    nproc: int = 2  # ranks of the collective cases
    dump: str | None = None  # a directory for msprobe dumps of the inference cases' taps
    _reference_device: Any = None

    def reference_device(self) -> Any:
        if self._reference_device is None:
            from accel.targets import open_target

            self._reference_device = open_target(REFERENCE_DEVICE, policy={})
        return self._reference_device


def seed_of(*parts: str) -> int:
    return zlib.crc32("/".join(parts).encode())


def _skip(backend: Any, case: str, name: str, dtype: str) -> Row | None:
    if dtype not in backend.capabilities().dtypes:
        return Row(backend.target, case, name, dtype, "skipped", detail=f"{backend.target} does not support {dtype}")
    return None


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


def _arrays(args: list[Any], kwargs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The array inputs of a call by position ("arg0", "arg1.2" for lists, "kw.mask")."""
    out = {}
    for key, value in [*((f"arg{i}", a) for i, a in enumerate(args)), *((f"kw.{k}", v) for k, v in kwargs.items())]:
        if isinstance(value, np.ndarray):
            out[key] = value
        elif isinstance(value, list) and value and isinstance(value[0], np.ndarray):
            out |= {f"{key}.{j}": a for j, a in enumerate(value)}
    return out


def _replace_arrays(args: list[Any], kwargs: dict[str, Any], stored: dict[str, np.ndarray]) -> None:
    """Puts stored arrays back at the positions `_arrays` named them by."""
    for key, a in stored.items():
        parts = key.split(".")
        container: Any
        if parts[0] == "kw":
            container, slot, rest = kwargs, parts[1], parts[2:]
        else:
            container, slot, rest = args, int(parts[0][3:]), parts[1:]
        if rest:
            container[slot][int(rest[0])] = a
        else:
            container[slot] = a


def op_inputs(case: OpCase, dtype: str) -> tuple[list[Any], dict[str, Any]]:
    args, kwargs = case.make(np.random.default_rng(seed_of(case.op, case.shape)))
    return [_round(a, dtype) for a in args], {k: _round(v, dtype) for k, v in kwargs.items()}


def _op_output(backend: Any, case: OpCase, args: list[Any], kwargs: dict[str, Any], dtype: str) -> np.ndarray:
    dev_args = [_to_device(backend, a, dtype) for a in args]
    dev_kwargs = {k: _to_device(backend, v, dtype) for k, v in kwargs.items()}
    return _flat(backend, getattr(backend.ops, case.op)(*dev_args, **dev_kwargs))


def run_op_case(backend: Any, case: OpCase, dtype: str, ctx: Context | None = None) -> Row:
    ctx = ctx or Context()
    name = f"{case.op}[{case.shape}]"
    if (skipped := _skip(backend, "ops", name, dtype)) is not None:
        return skipped
    case_id = f"ops/{name}/{dtype}"
    args, kwargs = op_inputs(case, dtype)
    ref_metrics = None
    if ctx.golden is not None:
        _replace_arrays(args, kwargs, ctx.golden.inputs(case_id))
        expected = ctx.golden.expected(case_id)
        ref_metrics = ctx.golden.metrics(case_id)
    else:
        out = reference(case.op)(*args, **kwargs)
        expected = np.concatenate([np.ravel(e) for e in out]) if isinstance(out, list | tuple) else np.asarray(out)
    actual = _op_output(backend, case, args, kwargs, dtype)
    m = compare(actual, expected, dtype)
    if ctx.recorder is not None:
        ctx.recorder.add(case_id, _arrays(args, kwargs), expected, actual, m)
    if case.exact:
        want = np.asarray(expected) if case.op == "cast" else np.asarray(expected).astype(actual.dtype)
        ok = exact(actual.ravel(), want.ravel())
        return Row(backend.target, "ops", name, dtype, "pass" if ok else "fail", m,
                   detail="" if ok else "accel bit-exact: not bit-exact",
                   standards={"accel bit-exact": "pass" if ok else "not bit-exact"})
    if ref_metrics is None and wants_reference_device("ops", dtype) and backend.target != REFERENCE_DEVICE:
        device = ctx.reference_device()
        ref_metrics = compare(_op_output(device, case, args, kwargs, dtype), expected, dtype)
    verdict = judge("ops", dtype, m, ref_metrics, op=case.op)
    return Row(backend.target, "ops", name, dtype, "fail" if verdict.problem else "pass", m,
               detail=verdict.problem or "", standards=verdict.summary())


# --- model cases ----------------------------------------------------------------------------------


# The checkpoint directories of this run, by the name its rows and golden records give them (the
# directory's name, the same on every machine); a model name not here is a preset. The runner hands the
# table to each worker.
CHECKPOINTS: dict[str, str] = {}


@lru_cache(maxsize=16)
def model_inputs(name: str) -> tuple[Any, dict[str, np.ndarray], np.ndarray]:
    """The model's weights (a preset's seeded float32 ones, or a checkpoint directory's as stored) and a
    batch of 2 x 12 token ids."""
    from accel.models import from_preset, from_pretrained

    model, params = from_pretrained(CHECKPOINTS[name]) if name in CHECKPOINTS else from_preset(name, seed=0)
    length = 12
    if name in CHECKPOINTS and getattr(model, "use_dynamic_ntk", False):
        # Qwen v1 past its training length: the cached generation keeps the prefill's NTK base, which
        # full recomputation does not, as in the original; stay within it (8 new tokens follow).
        length = max(1, min(length, model.seq_length - GENERATED))
    ids = np.random.default_rng(seed_of(name, "ids")).integers(0, model.vocab_size, (2, length))
    return model, params, ids


# Each checkpoint directory's prompts as token ids, encoded by the runner through the directory's own
# tokenizer; a directory not here runs on seeded random ids, as a preset does.
PROMPTS: dict[str, list[list[int]]] = {}


def _golden_model_inputs(ctx: Context, name: str) -> tuple[Any, dict[str, np.ndarray], list[np.ndarray]]:
    """The model, its weights and its inputs: [the batch of seeded ids], or each of a directory's prompts
    (1, S); from the golden record when comparing against one. A checkpoint's weights are never copied
    into a record (only their digests, checked before the run): they come from its directory."""
    model, params, ids = model_inputs(name)
    if ctx.golden is None:
        return model, params, [np.asarray([p], np.int64) for p in PROMPTS[name]] if name in PROMPTS else [ids]
    stored = ctx.golden.inputs(f"models/{name}")
    if name not in CHECKPOINTS:
        params = {k: stored[f"param.{k}"] for k in params}
    if "input_ids" in stored:
        return model, params, [stored["input_ids"]]
    return model, params, [stored[f"input_ids.{i}"] for i in range(sum(k.startswith("input_ids.") for k in stored))]


def _joined(arrays: list[np.ndarray]) -> np.ndarray:
    """One array of the outputs of several inputs (as it is, for one)."""
    return arrays[0] if len(arrays) == 1 else np.concatenate([a.ravel() for a in arrays])


def run_inference_case(backend: Any, preset: str, dtype: str, ctx: Context | None = None) -> Row:
    """Prefill logits of each input against the reference's; a failure is localised on the first input
    whose own logits are out of tolerance (or, failing that, the one with the largest error)."""
    ctx = ctx or Context()
    if (skipped := _skip(backend, "inference", preset, dtype)) is not None:
        return skipped
    model, params, inputs = _golden_model_inputs(ctx, preset)
    case_id = f"inference/{preset}/{dtype}"
    device = (ctx.reference_device() if ctx.golden is None and wants_reference_device("inference", dtype)
              and backend.target != REFERENCE_DEVICE else None)
    refs = [reference_run(model, params, x, preset) for x in inputs]
    runs = [forward_with_taps(backend, model, params, x, dtype) for x in inputs]
    devs = [forward_with_taps(device, model, params, x, dtype) for x in inputs] if device is not None else None
    logits = _joined([r[0] for r in runs])
    expected = ctx.golden.expected(case_id) if ctx.golden is not None else _joined([r[0] for r in refs])
    m = compare(logits, expected, dtype) | {"prompts": float(len(inputs))}
    ref_m = None
    if ctx.golden is not None:
        ref_m = ctx.golden.metrics(case_id)
        m |= {f"vs_golden_{k}": v for k, v in compare(logits, ctx.golden.actual(case_id), dtype).items()
              if k in ("accel_cosine", "max_abs")}
    elif devs is not None:
        ref_m = compare(_joined([d[0] for d in devs]), expected, dtype)
    if ctx.recorder is not None:
        ctx.recorder.add_model(preset, params, inputs)
        ctx.recorder.add(case_id, {}, expected, logits, compare(logits, expected, dtype))
    verdict = judge("inference", dtype, m, ref_m)
    problem = verdict.problem
    if ctx.dump is not None:
        dump_taps(Path(ctx.dump), backend.target, model, preset, dtype, runs[0][1])
    located = [localise(run[1], ref[1], ref[2], dtype, devs[k][1] if devs is not None else None)
               for k, (run, ref) in enumerate(zip(runs, refs))]
    per_layer = np.max([layers for _, layers in located], axis=0).tolist() if located[0][1] else []
    row = Row(backend.target, "inference", preset, dtype, "fail" if problem else "pass", m, detail=problem or "",
              series={"layer_max_abs": per_layer}, standards=verdict.summary())
    if problem:
        own = [compare(run[0], ref[0], dtype) for run, ref in zip(runs, refs)]
        k = next((k for k, mk in enumerate(own) if judge("inference", dtype, mk, None).problem),
                 int(np.argmax([mk["max_abs"] for mk in own])))
        row.first_divergence = located[k][0]
        if row.first_divergence is not None:
            row.first_divergence["module"] = hf_module(model, list(refs[k][1]), row.first_divergence["tap"])
        # The first tap out of tolerance may only be where error made earlier grows past it: each layer
        # on the reference's input names the layer that makes the error.
        local = isolate_layers(backend, model, params, inputs[k], dtype, refs[k][1])
        device_local = (isolate_layers(device, model, params, inputs[k], dtype, refs[k][1])
                        if device is not None else None)
        row.series["layer_local_max_abs"] = [m["max_abs"] for m in local]
        culprit = first_local_layer(local, dtype, device_local)
        if row.first_divergence is None and culprit is not None:
            row.first_divergence = {"tap": f"layers.{culprit}.out", "op": "layer", "layer": culprit,
                                    "detail": "out of tolerance on its own input"}
        if row.first_divergence is not None:
            row.first_divergence["first_local_layer"] = culprit
            if len(inputs) > 1:
                row.first_divergence["prompt"] = k + 1
        row.detail += (f"; layer {culprit} is the first out of tolerance on its own input" if culprit is not None
                       else "; every layer is within tolerance on its own input")
        if len(inputs) > 1:
            row.detail += f" (prompt {k + 1} of {len(inputs)})"
    return row


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(reference || target) of the next-token distributions, per position."""
    p, q = _softmax(ref_logits), _softmax(logits)
    return np.sum(p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300))), axis=-1)


def classify_flips(chosen: np.ndarray, ref_steps: np.ndarray, noise: np.ndarray) -> list[dict[str, Any]]:
    """Each position where the target's top-1 differs from the reference's, with the reference's
    top-1/top-2 margin there. A near-tie: the margin is below twice the reference device's own error at
    that position (its max abs logit error against float64 at this dtype; each of the two logits may move
    by that much, so their order is noise). Any other flip is a real divergence."""
    flips = []
    for i in np.flatnonzero(chosen != np.argmax(ref_steps, axis=-1)):
        top2 = np.sort(ref_steps[i])[-2:]
        margin = float(top2[1] - top2[0])
        flips.append({"position": int(i), "chosen": int(chosen[i]), "reference": int(np.argmax(ref_steps[i])),
                      "margin": margin, "noise": float(noise[i]), "near_tie": margin < 2 * float(noise[i])})
    return flips


def _teacher_forced(backend: Any, model: Any, params: dict[str, np.ndarray], prompt: np.ndarray,
                    tokens: np.ndarray, dtype: str) -> np.ndarray:
    """The target's (steps, vocab) logits along the reference's tokens, with the KV cache."""
    from accel.runtime import generate

    steps: list[np.ndarray] = []
    generate(model, backend, placed(backend, params, dtype), prompt, len(tokens), use_cache=True,
             step_logits=steps, forced=tokens[None, :])
    return np.concatenate(steps)


def run_generation_case(backend: Any, preset: str, dtype: str, ctx: Context | None = None,
                        new_tokens: int = GENERATED) -> Row:
    """Greedy decoding with the KV cache on the target, teacher-forced along the reference's tokens
    (greedy by full recomputation in float64), so one different choice does not cascade: per position,
    whether the target's top-1 is the reference's, the logits it chose from against the reference's
    (a cache bug that leaves the tokens of a tiny random model unchanged still moves its logits) and the
    KL divergence. A different top-1 at a near-tie (see `classify_flips`) is reported and passes; one
    with a wide margin fails, named with its position, both tokens and the margin. A failure is
    localised through the taps of the first decode step that departs."""
    from accel.runtime import generate

    ctx = ctx or Context()
    if (skipped := _skip(backend, "generation", preset, dtype)) is not None:
        return skipped
    if dtype in LOW_PRECISION and preset not in CHECKPOINTS:
        # A preset's generation is judged at float32 (the default matrix stays its size); a checkpoint
        # directory's at the dtype it is stored in, where its near-ties are told from real flips by the
        # reference device's own noise at that dtype.
        return Row(backend.target, "generation", preset, dtype, "skipped", detail="generation is judged at float32")
    model, params, inputs = _golden_model_inputs(ctx, preset)
    case_id = f"generation/{preset}/{dtype}"
    prompts = [x[:1] for x in inputs]
    n = new_tokens
    recorded = ctx.golden.inputs(case_id) if ctx.golden is not None else {}
    expected_parts, ref_parts, got_parts, device_parts = [], [], [], []
    for k, prompt in enumerate(prompts):
        if ctx.golden is not None:
            expected_k = ctx.golden.expected(case_id).astype(np.int64)[k * n:(k + 1) * n]
            ref_k = recorded["step_logits"][k * n:(k + 1) * n]
            device_k = recorded["device_step_logits"][k * n:(k + 1) * n] if "device_step_logits" in recorded else None
        else:
            ref, steps = reference_backend(), []
            expected_k = generate(model, ref, placed(ref, params, "float64"), prompt, n, use_cache=False,
                                  step_logits=steps)[0]
            ref_k, device_k = np.concatenate(steps), None  # (new_tokens, vocab)
        got_k = _teacher_forced(backend, model, params, prompt, expected_k, dtype)
        if device_k is None:
            device_k = (got_k if backend.target == REFERENCE_DEVICE else
                        _teacher_forced(ctx.reference_device(), model, params, prompt, expected_k, dtype))
        expected_parts.append(expected_k)
        ref_parts.append(ref_k)
        got_parts.append(got_k)
        device_parts.append(device_k)
    expected, ref_steps = np.concatenate(expected_parts), np.concatenate(ref_parts)
    got_steps, device_steps = np.concatenate(got_parts), np.concatenate(device_parts)
    noise = np.abs(device_steps - ref_steps).max(axis=-1)
    chosen = np.argmax(got_steps, axis=-1)
    if ctx.recorder is not None:
        ctx.recorder.add_model(preset, params, inputs)
        ctx.recorder.add(case_id, {"step_logits": ref_steps, "device_step_logits": got_steps}, expected, chosen, {})
    flips = classify_flips(chosen, ref_steps, noise)
    wide = [f for f in flips if not f["near_tie"]]
    kl = kl_divergence(ref_steps, got_steps)
    by_ratio = wants_reference_device("inference", dtype) and backend.target != REFERENCE_DEVICE

    def step_problem(i: int) -> str | None:  # at low precision, against the reference device's own error
        ref_m = compare(device_steps[i], ref_steps[i], dtype) if by_ratio else None
        return judge("inference", dtype, compare(got_steps[i], ref_steps[i], dtype), ref_m).problem

    bad_step = next((i for i in range(len(expected)) if step_problem(i)), None)
    m = compare(got_steps, ref_steps, dtype) | {
        "token_agreement": float(np.mean(chosen == expected)), "new_tokens": float(len(expected)),
        "kl_max": float(kl.max()), "near_ties": float(len(flips) - len(wide)), "prompts": float(len(prompts))}
    row = Row(backend.target, "generation", preset, dtype, "fail" if wide or bad_step is not None else "pass", m,
              series={"kl": kl.tolist(), "top1_agrees": (chosen == expected).astype(float).tolist(),
                      "step_max_abs": np.abs(got_steps - ref_steps).max(axis=-1).tolist()})
    token = _token_text(preset)

    def at(position: int) -> str:  # a position along the concatenated steps, as the user reads it
        return f"position {position}" if len(prompts) == 1 else f"prompt {position // n + 1} position {position % n}"

    notes = [f"near-tie at {at(f['position'])}: {token(f['chosen'])} for {token(f['reference'])} "
             f"(margin {f['margin']:.2e} < 2 x device noise {f['noise']:.2e})" for f in flips if f["near_tie"]]
    if wide:
        f = wide[0]
        notes.insert(0, f"{at(f['position'])}: {token(f['chosen'])} instead of {token(f['reference'])}, "
                        f"reference margin {f['margin']:.3g} (device noise {f['noise']:.2e})")
    elif bad_step is not None:
        notes.insert(0, f"logits of step {bad_step % n}{'' if len(prompts) == 1 else f' of prompt {bad_step // n + 1}'}"
                        f" out of tolerance: {step_problem(bad_step)}")
    row.detail = "; ".join(notes)
    if row.status == "fail":
        where = wide[0]["position"] if wide else int(bad_step or 0)
        k, step = divmod(where, n)
        row.first_divergence = _localise_decode(backend, model, params, prompts[k], expected_parts[k], step, dtype)
        if row.first_divergence is not None and len(prompts) > 1:
            row.first_divergence["prompt"] = k + 1
    return row


def _token_text(name: str) -> Callable[[int], str]:
    """How a flipped token is named in a verdict: decoded through the checkpoint's own tokenizer where it
    has one, else by id."""
    decode = None
    if name in CHECKPOINTS:
        try:
            from accel.data.tokenizer import load_tokenizer  # type: ignore[attr-defined]

            decode = load_tokenizer(CHECKPOINTS[name]).decode
        except (ImportError, AccelError):  # no tokenizer beside the weights: ids still say which tokens
            decode = None

    def text(token: int) -> str:
        return f"token {token} {decode([token])!r}" if decode is not None else f"token {token}"

    return text


def _localise_decode(backend: Any, model: Any, params: dict[str, np.ndarray], prompt: np.ndarray,
                     expected: np.ndarray, step: int, dtype: str) -> dict[str, Any] | None:
    """Replays the reference tokens up to `step` through the KV cache on both sides and compares the
    taps of the decode step that first produced a different token."""
    from accel.models._layers import Taps

    def decode_taps(b: Any, dt: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        p = placed(b, params, dt)
        cache = model.new_cache()
        run = b.compile(lambda x, c, t: model.forward(b.ops, p, x, cache=c, taps=t))
        run(b.asarray(prompt, "int64"), cache, None)
        for tok in expected[: max(step - 1, 0)]:
            run(b.asarray(np.array([[tok]], np.int64), "int64"), cache, None)
        taps = Taps()
        last = prompt[:, -1:] if step == 0 else np.array([[expected[step - 1]]], np.int64)
        if step == 0:  # the prefill itself produced the first token: replay it with taps
            cache = model.new_cache()
            run(b.asarray(prompt, "int64"), cache, taps)
        else:
            run(b.asarray(last, "int64"), cache, taps)
        return {k: np.asarray(b.to_numpy(v), dtype=np.float64) for k, v in taps.items()}, dict(taps.ops)

    ref_taps, ops_of = decode_taps(reference_backend(), "float64")
    taps, _ = decode_taps(backend, dtype)
    first, _ = localise(taps, ref_taps, ops_of, dtype)
    if first is not None:
        first["step"] = step
        first["module"] = hf_module(model, list(ref_taps), first["tap"])
    return first


CaseRunner = Callable[[Any, Any, str, Context], Row]

CASE_KINDS: dict[str, CaseRunner] = {
    "ops": lambda backend, item, dtype, ctx: run_op_case(backend, item, dtype, ctx),
    "inference": lambda backend, item, dtype, ctx: run_inference_case(backend, item, dtype, ctx),
    "generation": lambda backend, item, dtype, ctx: run_generation_case(backend, item, dtype, ctx),
}
# Case kinds that live in modules of their own, each exporting CASE_KINDS (and PLAN, see runner.py).
CASE_MODULES = ("accel.conformance.training", "accel.conformance.checkpoints", "accel.conformance.collectives")


def case_modules() -> list[Any]:
    import importlib

    found = []
    for name in CASE_MODULES:
        try:
            found.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
    return found


def case_runners() -> dict[str, CaseRunner]:
    runners = dict(CASE_KINDS)
    for module in case_modules():
        runners |= module.CASE_KINDS
    return runners


def op_case(name: str) -> OpCase:
    for c in OP_CASES:
        if f"{c.op}[{c.shape}]" == name:
            return c
    raise ConformanceError(f"no op case named {name}")
