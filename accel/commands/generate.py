"""`accel generate`: greedy decoding with the KV cache."""

from __future__ import annotations

import argparse
import json

from accel.commands._common import add_model, add_target, open_run, parse_ids
from accel.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="greedy decoding with the KV cache",
                       description="Greedy decoding of new tokens after the given prompt ids, with the KV cache.")
    add_model(p)
    add_target(p)
    p.add_argument("--input-ids", required=True, metavar="IDS", help="comma-separated prompt token ids")
    p.add_argument("--max-new-tokens", type=int, default=16, metavar="N", help="tokens to generate (default 16)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step instead")
    p.add_argument("--json", action="store_true", help='print one JSON object: {"new_tokens": [...], ...}')
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from accel.runtime import check_ids, generate

    ids = parse_ids(args.input_ids)
    if args.max_new_tokens < 0:
        raise UsageError("--max-new-tokens must be 0 or more")
    model, backend, params, dtype = open_run(args)
    ids = check_ids(model, ids)
    new = generate(model, backend, params, ids, args.max_new_tokens, use_cache=not args.no_cache)[0].tolist()
    if args.json:
        print(json.dumps({"new_tokens": new, "prompt": ids[0].tolist(), "model": model.name,
                          "target": backend.target, "dtype": dtype}))
    else:
        print(" ".join(map(str, new)))
    return 0
