"""Training cases: N AdamW steps of a tiny model on fixed batches, full fine-tuning (item "<preset>") and
LoRA (item "<preset>+lora"), on any target that can train. The reference is the same loop on torch:cpu
in float64: per-step loss, gradient norm and final trained weights are compared against it."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from accel.conformance.cases import Context, Row, model_inputs, seed_of
from accel.conformance.metrics import compare
from accel.conformance.tolerances import bounds, judge

STEPS = 6
LR = 1e-3
LORA = {"rank": 4, "alpha": 8.0}


def plan(case: str, models: list[str], dtypes: list[str]) -> list[tuple[str, str, str]]:
    """Each training mode once per model, spread over the dtypes asked for: full fine-tuning at the
    highest precision (float32: the strict check of the loop's logic), LoRA at the lowest (bfloat16,
    the dtype it runs in); with one dtype asked for, both at that one. On a compiling target every case
    is a compile of forward and backward, and a mode's code is the same at either dtype."""
    trained = [d for d in ("float32", "bfloat16") if d in dtypes]
    if not trained:
        return []
    return [(case, m, trained[0]) for m in models] + [(case, f"{m}+lora", trained[-1]) for m in models]


def batches(preset: str, vocab: int) -> list[dict[str, np.ndarray]]:
    """STEPS batches of 2 x 16 tokens; the first 5 labels of each row masked as a prompt would be."""
    rng = np.random.default_rng(seed_of(preset, "train"))
    out = []
    for _ in range(STEPS):
        tokens = rng.integers(0, vocab, (2, 17))
        labels = tokens[:, 1:].copy()
        labels[:, :5] = -100
        out.append({"input_ids": tokens[:, :-1], "labels": labels})
    return out


def _run(backend: Any, preset: str, lora: bool, dtype: str) -> tuple[list[float], list[float], dict[str, np.ndarray]]:
    from accel.lora import LoraConfig
    from accel.train import to_host, train

    model, params, _ = model_inputs(preset)
    config = LoraConfig(**LORA) if lora else None
    results = list(train(model, backend, params, batches(preset, model.vocab_size), STEPS, LR, lora=config,
                         dtype=dtype, seed=seed_of(preset, "lora")))
    final = to_host(backend, results[-1].trainable)
    return [r.loss for r in results], [r.grad_norm for r in results], final


@lru_cache(maxsize=16)
def _reference(preset: str, lora: bool) -> tuple[list[float], list[float], dict[str, np.ndarray]]:
    from accel.targets import open_target

    return _run(open_target("torch:cpu", policy={}), preset, lora, "float64")


def _rel(a: list[float], b: list[float]) -> list[float]:
    return [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True)]


def run_training_case(backend: Any, item: str, dtype: str, ctx: Context) -> Row:
    preset, _, variant = item.partition("+")
    lora = variant == "lora"
    if not backend.capabilities().training:
        return Row(backend.target, "training", item, dtype, "skipped", detail=f"{backend.target} cannot train")
    if dtype not in backend.capabilities().dtypes:
        return Row(backend.target, "training", item, dtype, "skipped", detail=f"{backend.target} lacks {dtype}")
    if ctx.golden is not None:
        ref_losses = ctx.golden.inputs(f"training/{item}/{dtype}")["reference_loss"].tolist()
        ref_norms = ctx.golden.inputs(f"training/{item}/{dtype}")["reference_grad_norm"].tolist()
        ref_final = {k[len("final."):]: v for k, v in ctx.golden.inputs(f"training/{item}/{dtype}").items()
                     if k.startswith("final.")}
    else:
        ref_losses, ref_norms, ref_final = _reference(preset, lora)
    losses, norms, final = _run(backend, preset, lora, dtype)
    loss_rel, norm_rel = _rel(losses, ref_losses), _rel(norms, ref_norms)
    names = sorted(ref_final)
    flat = np.concatenate([np.asarray(final[k], np.float64).ravel() for k in names])
    ref_flat = np.concatenate([np.asarray(ref_final[k], np.float64).ravel() for k in names])
    w = compare(flat, ref_flat, dtype)
    m = {"max_loss_rel": max(loss_rel), "mean_loss_rel": float(np.mean(loss_rel)), "first_loss_rel": loss_rel[0],
         "max_grad_norm_rel": max(norm_rel), "mean_grad_norm_rel": float(np.mean(norm_rel)),
         **{k: w[k] for k in ("accel_cosine", "max_abs", "max_rel", "accel_rmse", "ref_max_abs", "ref_rms",
                              "mean_rel")}}
    if ctx.recorder is not None:
        inputs = {"reference_loss": np.asarray(ref_losses), "reference_grad_norm": np.asarray(ref_norms),
                  **{f"final.{k}": v for k, v in ref_final.items()}}
        ctx.recorder.add(f"training/{item}/{dtype}", inputs, ref_flat, flat, m)
    tol = bounds("training", dtype)
    problems = [f"{key.replace('_', ' ')} {m[key]:.3g} > {tol[key]:g}" for key in
                ("max_loss_rel", "first_loss_rel", "mean_loss_rel", "max_grad_norm_rel", "mean_grad_norm_rel")
                if key in tol and m[key] > tol[key]]
    weights = judge("weights", dtype, w).problem if "weights" in _checks() else None
    if weights:
        problems.append(f"final weights: {weights}")
    return Row(backend.target, "training", item, dtype, "fail" if problems else "pass", m, detail="; ".join(problems),
               series={"loss": losses, "reference_loss": ref_losses, "grad_norm": norms})


def _checks() -> set[str]:
    from accel.conformance.tolerances import table

    return set(table())


CASE_KINDS = {"training": run_training_case}
