"""Running a model on a target: weights onto the device, a prefill forward, greedy generation with the
KV cache (and without it, by full recomputation, as its check)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, MutableMapping
from typing import Any

import numpy as np

from accel.errors import UsageError


class LazyPlacement(Mapping[str, Any]):
    """`place` deferred to each read: a weight goes onto the backend (cast) when the forward reads it and
    is not kept, so what stays resident is the source (a checkpoint's mapped file) and the tensors of
    the op being computed. For the float64 reference, whose whole copy of a bfloat16 checkpoint would
    be 4x its bytes; each forward pays the casts again. With `as_stored`, a float tensor of more than
    that many elements is handed over as it is stored: for the reference, whose ops cast their inputs
    themselves, its embedding only the rows it picks and its linear a block of rows at a time."""

    def __init__(self, backend: Any, params: Mapping[str, np.ndarray], dtype: str, as_stored: int | None = None):
        self._backend, self._params, self._dtype, self._as_stored = backend, params, dtype, as_stored

    def __getitem__(self, name: str) -> Any:
        v = self._params[name]
        floating = np.asarray(v).dtype.kind in "fV"
        if floating and self._as_stored is not None and np.asarray(v).size > self._as_stored:
            return v
        return self._backend.asarray(v, self._dtype if floating else None)

    def __iter__(self) -> Any:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)


def place(backend: Any, params: Mapping[str, np.ndarray], dtype: str, consume: bool = False) -> dict[str, Any]:
    """Weights onto the backend's device, float tensors cast to `dtype` (other tensors keep theirs).
    With `consume`, `params` (a dict the caller gives up) is emptied as it goes: each source tensor is
    dropped once placed, so a cast holds one source tensor at a time, never the source and the result
    whole. A backend may alias a tensor that needs no cast (a checkpoint's mapping stays the weights).
    For a forward only, `place_lazily` places each tensor when it is read instead."""
    backend.check_dtype(dtype)
    if consume and not isinstance(params, MutableMapping):
        raise TypeError("place(consume=True) needs a mutable mapping of params")
    out = {}
    for k in list(params):
        v = params.pop(k) if isinstance(params, MutableMapping) and consume else params[k]
        out[k] = backend.asarray(v, dtype if np.asarray(v).dtype.kind in "fV" else None)
    return out


def place_lazily(backend: Any, params: Mapping[str, np.ndarray], dtype: str,
                 as_stored: int | None = None) -> LazyPlacement:
    """`place` for a forward, each tensor placed when it is read (see LazyPlacement)."""
    backend.check_dtype(dtype)
    return LazyPlacement(backend, params, dtype, as_stored)


def check_ids(model: Any, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise UsageError("input ids must be a non-empty sequence of token ids")
    bad = ids[(ids < 0) | (ids >= model.vocab_size)]
    if bad.size:
        raise UsageError(f"token id {int(bad[0])} is outside the vocabulary (0..{model.vocab_size - 1})")
    return ids


def forward_fn(model: Any, backend: Any) -> Any:
    """The model's forward bound to the backend's ops, through the backend's compile step; one per
    (backend, model), kept on the backend for as long as it lives, so that calling infer again with
    other weights of the same shapes reuses what the compiler made."""
    known: dict[int, tuple[Any, Any]] = vars(backend).setdefault("_accel_forwards", {})
    if id(model) in known:
        return known[id(model)][1]

    def forward(params: Mapping[str, Any], input_ids: Any, cache: Any = None, taps: Any = None) -> Any:
        return model.forward(backend.ops, params, input_ids, cache=cache, taps=taps)

    compiled = backend.compile(forward)
    known[id(model)] = (model, compiled)  # the model is held, so its id cannot be reused
    return compiled


def infer(model: Any, backend: Any, params: Mapping[str, Any], ids: np.ndarray) -> np.ndarray:
    """Prefill logits (b, s, vocab) as float32 NumPy."""
    ids = check_ids(model, ids)
    logits = forward_fn(model, backend)(params, backend.asarray(ids, "int64"))
    return np.asarray(backend.to_numpy(logits), dtype=np.float32)


def generate(model: Any, backend: Any, params: Mapping[str, Any], ids: np.ndarray, max_new_tokens: int,
             use_cache: bool = True, step_logits: list[np.ndarray] | None = None,
             forced: np.ndarray | None = None, stop: Collection[int] = ()) -> np.ndarray:
    """Greedy decoding: (b, max_new_tokens) new token ids. With the KV cache, a prefill then one token
    per step; without, the whole sequence is recomputed each step (the check of the cache).
    `step_logits`, when given, receives the (b, vocab) logits each token was chosen from. `forced`
    (b, max_new_tokens), when given, is fed back instead of the tokens chosen (teacher forcing: the
    logits along another run's tokens, so that one different choice does not change every later step).
    `stop`: token ids that end the generation once every row has chosen one (it is kept, as the last)."""
    ids = check_ids(model, ids)
    forward = forward_fn(model, backend)
    out = []

    def choose(logits: Any) -> np.ndarray:
        last = np.asarray(backend.to_numpy(logits), dtype=np.float64)[:, -1]  # (b, vocab)
        if step_logits is not None:
            step_logits.append(last)
        return np.argmax(last, axis=-1)

    if use_cache:
        cache = model.new_cache()
        logits = forward(params, backend.asarray(ids, "int64"), cache)
        for step in range(max_new_tokens):
            nxt = choose(logits)  # (b,)
            out.append(nxt)
            if stop and all(int(t) in stop for t in nxt):
                break
            fed = nxt if forced is None else np.asarray(forced)[:, step]
            if step + 1 < max_new_tokens:
                logits = forward(params, backend.asarray(fed[:, None].astype(np.int64), "int64"), cache)
    else:
        seq = ids
        for step in range(max_new_tokens):
            nxt = choose(forward(params, backend.asarray(seq, "int64")))
            out.append(nxt)
            if stop and all(int(t) in stop for t in nxt):
                break
            fed = nxt if forced is None else np.asarray(forced)[:, step]
            seq = np.concatenate([seq, fed[:, None].astype(np.int64)], axis=1)
    return np.stack(out, axis=1) if out else np.zeros((ids.shape[0], 0), np.int64)
