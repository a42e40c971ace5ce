"""Tensor-by-tensor equality of two checkpoints, in any formats, streamed a block at a time.

When the model family is known (--model, or a config.json) and the two checkpoints name their tensors
for different sides of its key map, both are compared under the Hugging Face names (MindFormers' split
wq/wk/wv read back as the fused tensor), so a conversion's output can be checked against its source.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from accel.checkpoint.base import CHUNK, Reader
from accel.checkpoint.convert import find_config, load_config
from accel.checkpoint.formats import open_reader, parse_spec
from accel.checkpoint.keymap import KeyMap, MappedView, Planned, resolve_family


@dataclass
class Comparison:
    names: list[str]  # every tensor name of either side
    differences: dict[str, str]  # name -> what differs
    nbytes: int
    mapped: bool  # compared under HF names through the key map

    @property
    def equal(self) -> bool:
        return not self.differences


def _block(r: Any, name: str, begin: int, end: int) -> bytes:
    return b"".join(r.chunks(name, begin, end))


def _values(a: bytes, b: bytes, dtype: np.dtype) -> tuple[int, float | None]:
    """(elements that differ, max abs difference for floats)."""
    x, y = np.frombuffer(a, dtype), np.frombuffer(b, dtype)
    bad = x.view(np.uint8).reshape(len(x), -1) != y.view(np.uint8).reshape(len(y), -1)
    mask = bad.any(axis=1)
    if dtype.kind in "fV" or dtype.name == "bfloat16":
        d = np.abs(x[mask].astype(np.float64) - y[mask].astype(np.float64))
        return int(mask.sum()), float(np.nanmax(d)) if d.size and not np.isnan(d).all() else None
    return int(mask.sum()), None


def _tensor(ra: Any, rb: Any, name: str) -> tuple[str | None, int]:
    ia, ib = ra.info(name), rb.info(name)
    if ia.dtype != ib.dtype:
        return f"dtype {ia.dtype.name} vs {ib.dtype.name}", 0
    if ia.shape != ib.shape:
        return f"shape {list(ia.shape)} vs {list(ib.shape)}", 0
    differ, worst = 0, None
    for pos in range(0, ia.nbytes, CHUNK):
        end = min(ia.nbytes, pos + CHUNK)
        a, b = _block(ra, name, pos, end), _block(rb, name, pos, end)
        if a != b:
            n, m = _values(a, b, ia.dtype)
            differ += n
            worst = m if worst is None else max(worst, m or 0.0)
    if differ:
        numel = ia.nbytes // max(ia.dtype.itemsize, 1)
        return f"{differ} of {numel} values differ" + (f" (max abs diff {worst:.6g})" if worst is not None else ""), \
            ia.nbytes
    return None, ia.nbytes


def _as_hf(reader: Reader, km: KeyMap, default: str, config: Any) -> tuple[Any, bool]:
    side = km.side_of(reader.keys(), default)
    if side == "hf":
        return reader, False
    planned: list[Planned] = km.plan(reader, side, "hf", config, allow_unmapped=True)
    return MappedView(reader, planned), True


def compare(a: str, b: str, model: str | None = None, config: str | Path | None = None) -> Comparison:
    fa, pa = parse_spec(a)
    fb, pb = parse_spec(b)
    ra, rb = open_reader(fa, pa), open_reader(fb, pb)
    config_path = find_config(pa, config) or find_config(pb, None)
    cfg = load_config(config_path) if config_path else None
    family = resolve_family(model) if model else (
        resolve_family(str(cfg["model_type"])) if cfg and cfg.get("model_type") else None)
    mapped = False
    va: Any = ra
    vb: Any = rb
    if family is not None:
        km = KeyMap(family)
        if km.side_of(ra.keys(), fa.names or "hf") != km.side_of(rb.keys(), fb.names or "hf"):
            (va, ma), (vb, mb) = _as_hf(ra, km, fa.names or "hf", cfg), _as_hf(rb, km, fb.names or "hf", cfg)
            mapped = ma or mb
    ka, kb = va.keys(), vb.keys()
    names = ka + [n for n in kb if n not in set(ka)]
    differences: dict[str, str] = {}
    nbytes = 0
    in_a, in_b = set(ka), set(kb)
    for name in names:
        if name not in in_b:
            differences[name] = f"only in {pa}"
        elif name not in in_a:
            differences[name] = f"only in {pb}"
        else:
            what, n = _tensor(va, vb, name)
            nbytes += n
            if what:
                differences[name] = what
    return Comparison(names, differences, nbytes, mapped)


@dataclass
class LogitsComparison:
    tokens: int
    target: str
    dtype: str
    metrics: dict[str, float]
    problem: str | None  # accel's inference standard at `dtype`, b's logits against a's

    @property
    def agree(self) -> bool:
        return self.problem is None


def compare_logits(a: str, b: str, model: str | None = None, config: str | Path | None = None,
                   ids: np.ndarray | None = None, target: str = "torch:cpu",
                   dtype: str = "float32") -> LogitsComparison:
    """One forward of the model on each checkpoint (any formats and key maps, read under the HF names),
    on the same token ids: `b`'s logits against `a`'s, judged by accel's inference standard at `dtype`
    (a lossless conversion gives the same logits bit for bit; a permuted q/k does not come close)."""
    from accel.checkpoint.convert import open_named
    from accel.conformance.metrics import compare as metrics
    from accel.conformance.tolerances import accel as accel_standard
    from accel.errors import CheckpointError, UsageError
    from accel.models import model_from_config
    from accel.runtime import place
    from accel.targets import open_target

    (_, pa), (_, pb) = parse_spec(a), parse_spec(b)
    config_path = find_config(pa, config) or find_config(pb, None)
    if config_path is None:
        raise UsageError("--logits needs the model's config.json (beside a checkpoint, or --config CONFIG.json)")
    m = model_from_config(load_config(config_path), config_path, config_path.parent.name)
    backend = open_target(target, policy={})
    backend.check_dtype(dtype)
    spec_of = m.param_spec()
    if ids is None:
        ids = np.random.default_rng(0).integers(0, m.vocab_size, (1, 16))
    logits = []
    for spec in (a, b):
        view = open_named(spec, "hf", model=model or m.model_type, config=config_path)
        missing = [n for n in spec_of if n not in set(view.keys())]
        if missing:
            raise CheckpointError(f"{spec}: tensor {missing[0]} the model needs is missing"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        params = place(backend, {n: view.get(n) for n in spec_of}, dtype, consume=True)
        out = m.forward(backend.ops, params, backend.asarray(ids, "int64"))
        logits.append(np.asarray(backend.to_numpy(out), dtype=np.float64))
        del params
    got = metrics(logits[1], logits[0], dtype)
    return LogitsComparison(int(ids.shape[-1]), target, dtype, got, accel_standard("inference", dtype, got))
