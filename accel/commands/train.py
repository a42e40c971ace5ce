"""`accel train`: full or LoRA fine-tuning on any target that can train, from MindRecord data."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from accel.commands._common import add_model, add_target
from accel.errors import AccelError, UsageError

BAR = 20


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="fine-tune (full or LoRA) on MindRecord data",
        description="Fine-tune a model with AdamW on MindRecord data written by `accel mindrecord`, printing "
                    "the loss of every step; full fine-tuning, or LoRA with --lora-rank.")
    add_model(p)
    add_target(p)
    p.add_argument("--data", required=True, metavar="FILE",
                   help="MindRecord file from `accel mindrecord` (its first shard, or the name given to --out)")
    p.add_argument("--steps", type=int, required=True, metavar="N", help="optimiser steps")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay (default 0)")
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="rows per step (default 1)")
    p.add_argument("--shuffle", action="store_true", help="shuffle rows each epoch (seeded by --seed)")
    p.add_argument("--lora-rank", type=int, metavar="R", help="train LoRA adapters of rank R instead of every weight")
    p.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA alpha (default: 2 x rank)")
    p.add_argument("--lora-targets", metavar="NAMES",
                   help="comma-separated module names to adapt (default: the attention input projections, "
                        "q_proj,v_proj,query_key_value,W_pack,c_attn); globs match whole module paths")
    p.add_argument("--save", metavar="DIR",
                   help="write the result to DIR (must not exist or be empty): full fine-tuning writes "
                        "model.safetensors + config.json, LoRA writes the adapters only (PEFT layout)")
    p.add_argument("--json", action="store_true", help="print one JSON object per step, then a summary")
    p.set_defaults(run=run)


def _lora_config(args: argparse.Namespace) -> Any:
    from accel.lora import DEFAULT_TARGETS, LoraConfig

    if args.lora_rank is None:
        if args.lora_alpha is not None or args.lora_targets:
            raise UsageError("--lora-alpha and --lora-targets need --lora-rank")
        return None
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()) if args.lora_targets \
        else DEFAULT_TARGETS
    alpha = args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_rank
    return LoraConfig(args.lora_rank, alpha, targets)


def _check_save(save: str | None, model_spec: str, lora: Any) -> Path | None:
    """The --save directory, refused before training when it cannot be written."""
    if save is None:
        return None
    path = Path(save)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"--save {path} exists and is not an empty directory; choose a new one")
    if not path.parent.is_dir():
        raise UsageError(f"--save: directory {path.parent} does not exist")
    if lora is None and not (Path(model_spec) / "config.json").is_file():
        raise UsageError(f"--save of a full fine-tune copies the model's config.json, and {model_spec} is a preset; "
                         "train from an HF checkpoint directory, or save LoRA adapters (--lora-rank)")
    return path


def _save(path: Path, write: Any) -> None:
    """write(tmp_dir), then tmp_dir renamed to `path`: no half-written checkpoint."""
    from accel.staging import discard_staged, stage_dir

    try:
        tmp = stage_dir(path)
        write(tmp)
        if path.exists():
            path.rmdir()  # checked empty before training
        os.replace(tmp, path)
    except OSError as e:
        raise AccelError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        discard_staged(path)


def _line(step: int, steps: int, loss: float, norm: float, seconds: float) -> str:
    done = round(BAR * step / steps)
    return (f"step {step:>{len(str(steps))}}/{steps}  [{'#' * done}{'.' * (BAR - done)}]  loss {loss:.6f}  "
            f"grad-norm {norm:.4g}  {seconds:.2f} s")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from accel import lora as lora_mod
    from accel.checkpoint import safetensors
    from accel.data import mindrecord
    from accel.models import load
    from accel.targets import open_target
    from accel.train import check_batch, check_hyperparameters, to_host, train

    check_hyperparameters(args.steps, args.lr, args.weight_decay, args.batch_size)
    if str(args.data).endswith((".jsonl", ".json")):
        raise UsageError(f"--data takes MindRecord; convert {args.data} first with `accel mindrecord`")
    lora = _lora_config(args)
    save = _check_save(args.save, args.model, lora)
    backend = open_target(args.target)
    if not backend.capabilities().training:
        raise UsageError(f"{backend.target} cannot train; pick a target whose `accel targets` row says train: yes")
    dtype = args.dtype or backend.capabilities().dtypes[0]
    backend.check_dtype(dtype)
    model, params = load(args.model, seed=args.seed)
    rows = mindrecord.read_rows(args.data)
    check_batch(model, rows["input_ids"], rows["labels"])  # every row now, not at the step that meets it
    data = mindrecord.batches(rows, args.batch_size, shuffle=args.shuffle, seed=args.seed)
    adapters = lora_mod.init_adapters(params, lora, args.seed) if lora is not None else None
    if not args.json:
        print(f"training {model.name} on {backend.target} ({dtype}): {args.steps} steps, batch {args.batch_size}, "
              f"lr {args.lr:g}, " + (f"LoRA rank {lora.rank} alpha {lora.alpha:g} on {len(adapters or {}) // 2} "
                                     f"weights" if lora else "full fine-tuning"), flush=True)
    last = None
    total_seconds, total_tokens = 0.0, 0
    for result in train(model, backend, params, data, args.steps, args.lr, weight_decay=args.weight_decay,
                        lora=lora, adapters=adapters, dtype=dtype, seed=args.seed):
        if not math.isfinite(result.loss):
            raise AccelError(f"the loss became {result.loss} at step {result.step}; lower --lr")
        total_seconds += result.seconds
        total_tokens += result.tokens
        if args.json:
            print(json.dumps({"step": result.step, "loss": result.loss, "grad_norm": result.grad_norm,
                              "tokens": result.tokens, "seconds": result.seconds}), flush=True)
        else:
            print(_line(result.step, args.steps, result.loss, result.grad_norm, result.seconds), flush=True)
        last = result
    assert last is not None  # batches repeat forever, so every step ran
    if save is not None:
        trained = to_host(backend, last.trainable)
        if lora is not None:
            _save(save, lambda d: lora_mod.save_adapters(d, trained, lora, args.model))
        else:
            host = {k: np.ascontiguousarray(trained.get(k, v)) for k, v in params.items()}

            def write_full(d: Path) -> None:
                safetensors.write(d / "model.safetensors", host, metadata={"format": "pt"})
                shutil.copyfile(Path(args.model) / "config.json", d / "config.json")

            _save(save, write_full)
    rate = total_tokens / total_seconds if total_seconds else 0.0
    summary = {"steps": last.step, "final_loss": last.loss, "seconds": total_seconds, "tokens_per_s": rate,
               "saved": str(save) if save else None}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"trained {last.step} steps in {total_seconds:.2f} s ({rate:,.0f} target tokens/s); final loss "
              f"{last.loss:.6f}" + (f"; saved to {save}" if save else ""))
    return 0
