"""`accel infer`: prefill logits of a token sequence on a target, written as float32 .npy."""

from __future__ import annotations

import argparse

import numpy as np

from accel.commands._common import add_model, add_target, atomic_write, open_run, parse_ids


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="prefill logits of token ids, saved as .npy",
                       description="Run one forward pass and save the logits, float32 of shape [1, S, vocab].")
    add_model(p)
    add_target(p)
    p.add_argument("--input-ids", required=True, metavar="IDS", help="comma-separated token ids, e.g. 5,17,33")
    p.add_argument("--out", required=True, metavar="LOGITS.npy", help="where to write the logits")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from accel.runtime import check_ids, infer

    ids = parse_ids(args.input_ids)
    model, backend, params, dtype = open_run(args)
    logits = infer(model, backend, params, check_ids(model, ids))

    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, logits)

    atomic_write(args.out, write)
    print(f"{model.name} on {backend.target} ({dtype}): logits {list(logits.shape)} -> {args.out}; "
          f"last-position argmax {int(logits[0, -1].argmax())}")
    return 0
