"""`accel verify`: are two checkpoints equal, tensor by tensor (and, with --logits, by the model's output)?"""

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
    p.add_argument("--logits", action="store_true",
                   help="also load both as the model (config.json beside a checkpoint, or --config) and compare one "
                        "forward's logits on the same token ids; the exit code is then the logits' verdict (accel's "
                        "inference standard), so a conversion is proven by the model's output")
    p.add_argument("--input-ids", metavar="IDS", help="token ids of that forward (default: 16 seeded ids)")
    p.add_argument("--target", default="torch:cpu", help="where to run the forwards (default torch:cpu)")
    p.add_argument("--dtype", default="float32", help="compute dtype of the forwards (default float32)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from accel.checkpoint.compare import compare
    from accel.checkpoint.convert import human

    c = compare(args.a, args.b, model=args.model, config=args.config)
    how = " under HF names" if c.mapped else ""
    if c.equal:
        print(f"equal: {len(c.names)} tensors, {human(c.nbytes)}{how}")
    else:
        print(table([[n, what] for n, what in c.differences.items()], ["tensor", "difference"]))
        print(f"differ: {len(c.differences)} of {len(c.names)} tensors{how}")
    if not args.logits:
        return 0 if c.equal else 1
    from accel.checkpoint.compare import compare_logits
    from accel.commands._common import parse_ids

    ids = parse_ids(args.input_ids) if args.input_ids else None
    lc = compare_logits(args.a, args.b, model=args.model, config=args.config, ids=ids, target=args.target,
                        dtype=args.dtype)
    m = lc.metrics
    said = (f"logits on {lc.tokens} tokens ({lc.target}, {lc.dtype}): max abs diff {m['max_abs']:.3g}, "
            f"cosine {m['accel_cosine']:.9f}")
    print(f"{said}: {'agree' if lc.agree else 'differ: ' + str(lc.problem)}")
    return 0 if lc.agree else 1
