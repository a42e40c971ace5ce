"""Training over the op set: the same loss, optimiser and loop on every backend that can train (one
whose `value_and_grad` works: torch, mindspore; XLA and torch.compile through the same calls).

The pieces, each usable alone:

- `lm_loss(model, ops, params, input_ids, labels)`: mean next-token cross-entropy. `logits[:, t]`
  predicts `labels[:, t]`: the batch feeder has already shifted the labels (`accel.data.mindrecord`
  rows hold seq_length + 1 tokens; inputs are `ids[:, :-1]`, labels `labels[:, 1:]`). Labels equal to
  -100 (prompt tokens, padding) count for nothing.
- `AdamW` (hyperparameters), `adamw_init(ops, params)`, `adamw_update(ops, opt, params, grads, state)`:
  AdamW (Loshchilov & Hutter) as `torch.optim.AdamW` computes it: decoupled weight decay
  p <- p (1 - lr wd), then m <- b1 m + (1 - b1) g, v <- b2 v + (1 - b2) g^2,
  p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps). Weight decay applies to matrices
  (ndim >= 2) only, not to biases and norm weights, as MindFormers and the HF Trainer group them.
  float16/bfloat16 weights are updated through float32 master copies kept in the state, with float32
  moments (mixed precision as MindFormers and torch AMP train). A pure function: the state is tensors
  (the bias corrections 1 - b^t included, so a compiled update does not retrace per step).
- `grad_norm(ops, grads)`: the global L2 norm of the gradients, as a 0-d tensor.
- `make_train_step(model, backend, opt, lora=None)`: step(trainable, frozen, state, input_ids, labels)
  -> (loss, grad_norm, trainable, state), the loss differentiated with `backend.value_and_grad` (a backend
  that compiles gradients does it there) and the update through `backend.compile`.
- `train(model, backend, params, batches, steps, lr, ...)`: the loop, yielding a `StepResult` per step;
  full fine-tuning, or LoRA (`accel.lora`) when `lora` is given, where only the adapters train.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from accel import lora as lora_mod
from accel.errors import UsageError

IGNORE_INDEX = -100
LOW_PRECISION = ("float16", "bfloat16")


def lm_loss(model: Any, ops: Any, params: Mapping[str, Any], input_ids: Any, labels: Any) -> Any:
    """Mean cross-entropy of logits[:, t] against labels[:, t] over the labels that are not -100 (the
    forward in training mode: Qwen v1 then stretches nothing past its seq_length, as the original)."""
    logits = model.forward(ops, params, input_ids, training=True)  # (b, s, vocab)
    b, s, vocab = logits.shape
    return ops.cross_entropy(ops.reshape(logits, (b * s, vocab)), ops.reshape(labels, (b * s,)), IGNORE_INDEX)


# --- AdamW --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdamW:
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0


def dtype_name(x: Any) -> str:
    """The accel dtype name of a backend tensor: torch.bfloat16, MindSpore's BFloat16 and NumPy/JAX's
    bfloat16 all read "bfloat16"."""
    return str(x.dtype).lower().rsplit(".", 1)[-1]


def adamw_init(ops: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """The state of AdamW over `params`: zero moments; float32 master copies of low-precision weights
    (the update runs on those: in float16, g^2 underflows and eps = 1e-8 rounds to 0, so
    m / (sqrt(v) + eps) would divide by zero)."""
    master = {k: ops.cast(p, "float32") for k, p in params.items() if dtype_name(p) in LOW_PRECISION}
    full = {k: master.get(k, p) for k, p in params.items()}
    # The bias corrections 1 - b1^t and 1 - b2^t, in float32 at least (in bfloat16, 0.999 rounds to 1)
    wide = "float64" if any(dtype_name(p) == "float64" for p in params.values()) else "float32"
    return {"m": {k: ops.mul(p, 0.0) for k, p in full.items()}, "v": {k: ops.mul(p, 0.0) for k, p in full.items()},
            "master": master,
            "c1": ops.asarray(np.zeros((), np.float64), wide), "c2": ops.asarray(np.zeros((), np.float64), wide)}


def adamw_update(ops: Any, opt: AdamW, params: Mapping[str, Any], grads: Mapping[str, Any],
                 state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    b1, b2 = opt.betas
    # 1 - b^t carried as itself: c_t = (1 - b) + b c_(t-1), both terms positive, so each step rounds it by
    # about one unit. Kept as b^t instead, 1 - b^t cancels: float32(0.999)^t leaves 1 - b2^t 1.3e-5 short
    # (and every update that much too large), where torch.optim.AdamW computes it in Python floats.
    c1 = ops.add(ops.mul(state["c1"], b1), 1.0 - b1)  # 1 - b1^t
    c2 = ops.add(ops.mul(state["c2"], b2), 1.0 - b2)
    corrections: dict[str, tuple[Any, Any]] = {}  # the op set's operands share one dtype: c1, c2 per dtype
    new_params, m_out, v_out, master_out = {}, {}, {}, {}
    for k, p in params.items():
        g = grads[k]
        if k in state["master"]:  # a low-precision weight: update its float32 master copy
            p, g = state["master"][k], ops.cast(g, "float32")
        name = dtype_name(p)
        if name not in corrections:
            corrections[name] = (c1, c2) if name == dtype_name(c1) else (ops.cast(c1, name), ops.cast(c2, name))
        pc1, pc2 = corrections[name]
        if opt.weight_decay and len(p.shape) >= 2:
            p = ops.mul(p, 1.0 - opt.lr * opt.weight_decay)
        m = ops.add(ops.mul(state["m"][k], b1), ops.mul(g, 1.0 - b1))
        v = ops.add(ops.mul(state["v"][k], b2), ops.mul(ops.mul(g, g), 1.0 - b2))
        denom = ops.add(ops.sqrt(ops.div(v, pc2)), opt.eps)
        p = ops.sub(p, ops.mul(ops.div(ops.div(m, pc1), denom), opt.lr))
        m_out[k], v_out[k] = m, v
        if k in state["master"]:
            master_out[k] = p
            p = ops.cast(p, dtype_name(params[k]))
        new_params[k] = p
    return new_params, {"m": m_out, "v": v_out, "master": master_out, "c1": c1, "c2": c2}


def grad_norm(ops: Any, grads: Mapping[str, Any]) -> Any:
    total = None
    for g in grads.values():
        g = ops.cast(g, "float32") if dtype_name(g) in LOW_PRECISION else g  # float16 g^2 underflows
        sq = ops.sum(ops.mul(g, g))
        total = sq if total is None else ops.add(total, sq)
    if total is None:
        raise UsageError("no gradients: nothing is trainable")
    return ops.sqrt(total)


# --- the step and the loop ----------------------------------------------------------------------------


def make_train_step(model: Any, backend: Any, opt: AdamW, lora: lora_mod.LoraConfig | None = None) -> Callable:
    """step(trainable, frozen, state, input_ids, labels) -> (loss, grad_norm, trainable, state).

    `trainable` is what the optimiser updates (every weight for full fine-tuning; the adapters for LoRA),
    `frozen` the rest (buffers; every base weight for LoRA). `state` starts as adamw_init(ops, trainable)."""
    ops = backend.ops

    def loss_fn(trainable: Mapping[str, Any], frozen: Mapping[str, Any], input_ids: Any, labels: Any) -> Any:
        params = {**frozen, **trainable} if lora is None else lora_mod.apply(ops, frozen, trainable, lora)
        return lm_loss(model, ops, params, input_ids, labels)

    def update(params: Mapping[str, Any], grads: Mapping[str, Any], state: Mapping[str, Any]) -> Any:
        return adamw_update(ops, opt, params, grads, state)

    value_and_grad = backend.value_and_grad(loss_fn)
    compiled_update = backend.compile(update)

    def step(trainable: Mapping[str, Any], frozen: Mapping[str, Any], state: Mapping[str, Any], input_ids: Any,
             labels: Any) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
        loss, grads = value_and_grad(trainable, frozen, input_ids, labels)
        norm = grad_norm(ops, grads)
        new_trainable, new_state = compiled_update(trainable, grads, state)
        return loss, norm, new_trainable, new_state

    return step


@dataclass(frozen=True)
class StepResult:
    step: int  # 1-based
    loss: float
    grad_norm: float
    tokens: int  # target tokens (labels != -100) in the batch
    seconds: float
    trainable: dict[str, Any]  # the trained tensors after this step, on the device


def split_trainable(model: Any, params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(weights, buffers): buffers (computed tables some checkpoints carry) never train."""
    spec = model.param_spec()
    trainable = {k: v for k, v in params.items() if spec[k].init != "buffer"}
    return trainable, {k: v for k, v in params.items() if k not in trainable}


def check_batch(model: Any, input_ids: np.ndarray, labels: np.ndarray) -> None:
    if input_ids.shape != labels.shape or input_ids.ndim != 2:
        raise UsageError(f"a batch needs input_ids and labels of one (batch, seq) shape, got "
                         f"{input_ids.shape} and {labels.shape}")
    for what, a in (("input id", input_ids), ("label", labels[labels != IGNORE_INDEX])):
        bad = a[(a < 0) | (a >= model.vocab_size)]
        if bad.size:
            raise UsageError(f"{what} {int(bad[0])} is outside the vocabulary of {model.name} "
                             f"(0..{model.vocab_size - 1}); was the data tokenised for another model?")


MAX_STEPS = 10**9


def check_hyperparameters(steps: int, lr: float, weight_decay: float = 0.0, batch_size: int = 1) -> None:
    """UsageError naming the first of these that no run can use (nan, inf, a negative decay, ...)."""
    if not 1 <= steps <= MAX_STEPS:
        raise UsageError(f"steps must be from 1 to {MAX_STEPS}, not {steps}")
    if not 0 < lr < float("inf"):
        raise UsageError(f"the learning rate must be a finite positive number, not {lr}")
    if not 0 <= weight_decay < float("inf"):
        raise UsageError(f"the weight decay must be a finite number of 0 or more, not {weight_decay}")
    if not 1 <= batch_size <= MAX_STEPS:
        raise UsageError(f"the batch size must be from 1 to {MAX_STEPS}, not {batch_size}")


def train(model: Any, backend: Any, params: Mapping[str, np.ndarray], batches: Iterable[Mapping[str, np.ndarray]],
          steps: int, lr: float, *, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
          eps: float = 1e-8, lora: lora_mod.LoraConfig | None = None, adapters: Mapping[str, np.ndarray] | None = None,
          dtype: str = "float32", seed: int = 0) -> Iterator[StepResult]:
    """Up to `steps` AdamW steps over `batches` (dicts of NumPy `input_ids` and shifted `labels`, (b, s)),
    from host weights `params`. With `lora`, the base weights stay frozen and adapters (`adapters`, or
    fresh ones from `seed`) train. Yields one StepResult per step; stops early when batches run out."""
    from accel.runtime import place

    check_hyperparameters(steps, lr, weight_decay)
    if not backend.capabilities().training:
        raise UsageError(f"{backend.target} cannot train")
    device_params = place(backend, params, dtype)
    if lora is None:
        trainable, frozen = split_trainable(model, device_params)
    else:
        host_adapters = adapters if adapters is not None else lora_mod.init_adapters(params, lora, seed)
        trainable, frozen = place(backend, host_adapters, dtype), device_params
    ops = backend.ops
    step_fn = make_train_step(model, backend, AdamW(lr, betas, eps, weight_decay), lora)
    state = adamw_init(ops, trainable)
    for i, batch in enumerate(batches):
        if i == steps:
            break
        ids, labels = np.asarray(batch["input_ids"], np.int64), np.asarray(batch["labels"], np.int64)
        check_batch(model, ids, labels)
        if not np.any(labels != IGNORE_INDEX):  # loss 0 and gradient 0: the step would only decay the weights
            raise UsageError(f"batch {i + 1} has no target token (every label is {IGNORE_INDEX}); the data's "
                             "prompts fill the sequence: convert it again with a larger --seq-length")
        start = time.perf_counter()
        loss, norm, trainable, state = step_fn(trainable, frozen, state, ops.asarray(ids, "int64"),
                                               ops.asarray(labels, "int64"))
        loss_value = float(np.asarray(ops.to_numpy(loss), np.float64))  # waits for the step to finish
        norm_value = float(np.asarray(ops.to_numpy(norm), np.float64))
        yield StepResult(i + 1, loss_value, norm_value, int((labels != IGNORE_INDEX).sum()),
                         time.perf_counter() - start, trainable)


def to_host(backend: Any, tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(backend.to_numpy(v)) for k, v in tensors.items()}
