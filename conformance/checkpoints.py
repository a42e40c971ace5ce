"""Checkpoint cases: a tiny model's weights written as an HF safetensors checkpoint, converted to another
format (MindSpore .ckpt and safetensors under MindFormers' names, torch-bin, npz) and back. The round
trip must be bit-exact, and the model loaded from the converted file must give on the target exactly
the logits the original weights give (item "<preset>:<format>")."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from accel.conformance.cases import Context, Row, model_inputs
from accel.conformance.metrics import compare, exact
from accel.conformance.taps import forward_with_taps
from accel.dtypes import to_numpy_dtype

FORMATS = {"mindspore-ckpt": "model.ckpt", "mindspore-safetensors": "model.safetensors", "torch-bin": "model.bin",
           "npz": "model.npz"}


def plan(case: str, models: list[str], dtypes: list[str]) -> list[tuple[str, str, str]]:
    return [(case, f"{m}:{fmt}", d) for d in dtypes if d in ("float32", "bfloat16") for m in models for fmt in FORMATS]


def _read(view: Any) -> dict[str, np.ndarray]:
    out = {}
    for name in view.keys():
        info = view.info(name)
        out[name] = np.frombuffer(b"".join(view.chunks(name)), dtype=info.dtype).reshape(info.shape)
    return out


def run_checkpoint_case(backend: Any, item: str, dtype: str, ctx: Context) -> Row:
    from accel.checkpoint import safetensors
    from accel.checkpoint.convert import convert, open_named

    preset, _, fmt = item.partition(":")
    if dtype not in backend.capabilities().dtypes:
        return Row(backend.target, "checkpoints", item, dtype, "skipped", detail=f"{backend.target} lacks {dtype}")
    model, params, ids = model_inputs(preset)
    stored = {k: np.asarray(v).astype(to_numpy_dtype(dtype)) for k, v in params.items()}
    with tempfile.TemporaryDirectory(prefix="accel-ckpt-") as tmp:
        source, converted, back = Path(tmp) / "hf", Path(tmp) / FORMATS[fmt], Path(tmp) / "back"
        source.mkdir()
        safetensors.write(source / "model.safetensors", stored)
        names = "mindformers" if fmt.startswith("mindspore") else None
        convert(f"safetensors:{source}", f"{fmt}:{converted}", model=preset, keymap=names)
        convert(f"{fmt}:{converted}", f"safetensors:{back}", model=preset, keymap="hf" if names else None)
        returned = _read(open_named(f"safetensors:{back}", "hf", model=preset))
        loaded = _read(open_named(f"{fmt}:{converted}", "hf", model=preset))
    problems = []
    if set(returned) != set(stored):
        problems.append(f"round trip changed the tensor names: {sorted(set(returned) ^ set(stored))[:3]}")
    else:
        differ = [k for k in stored if returned[k].dtype != stored[k].dtype or not exact(returned[k], stored[k])]
        if differ:
            problems.append(f"round trip is not bit-exact: {differ[0]}" + (f" and {len(differ) - 1} more"
                                                                          if len(differ) > 1 else ""))
    # through the inference case's compiled forward: the same graph, so no compile of its own
    ours = forward_with_taps(backend, model, stored, ids, dtype)[0]
    theirs = forward_with_taps(backend, model, loaded, ids, dtype)[0]
    m = compare(theirs, ours, dtype) | {"tensors": float(len(stored)),
                                        "bytes": float(sum(a.nbytes for a in stored.values()))}
    if not exact(theirs, ours):
        problems.append(f"logits from the {fmt} file differ from the original's (max abs {m['max_abs']:.3g})")
    return Row(backend.target, "checkpoints", item, dtype, "fail" if problems else "pass", m,
               detail="; ".join(problems))


CASE_KINDS = {"checkpoints": run_checkpoint_case}
