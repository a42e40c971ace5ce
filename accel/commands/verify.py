"""`accel verify`: are two checkpoints equal, tensor by tensor? Exit 0 only when they are."""

from __future__ import annotations

import argparse

from accel.commands._common import table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify", help="compare two checkpoints tensor by tensor (exit 0 only when equal)",
        description="Compare two checkpoints (any formats: FORMAT:PATH, as for `accel convert`) tensor by "
                    "tensor: names, dtypes, shapes and every byte. When one is named for Hugging Face and the "
                    "other for MindFormers, both are compared under the HF names through the model's key map. "
                    "Exit 0 when equal, 1 when not (each differing tensor is named), 2 on an error.")
    p.add_argument("a", metavar="FORMAT:PATH")
    p.add_argument("b", metavar="FORMAT:PATH")
    p.add_argument("--model", metavar="FAMILY", help="model family of the key map (default: from a config.json)")
    p.add_argument("--config", metavar="CONFIG.json", help="HF config.json (family and q/k/v block sizes)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from accel.checkpoint.compare import compare
    from accel.checkpoint.convert import human

    c = compare(args.a, args.b, model=args.model, config=args.config)
    how = " under HF names" if c.mapped else ""
    if c.equal:
        print(f"equal: {len(c.names)} tensors, {human(c.nbytes)}{how}")
        return 0
    print(table([[n, what] for n, what in c.differences.items()], ["tensor", "difference"]))
    print(f"differ: {len(c.differences)} of {len(c.names)} tensors{how}")
    return 1
