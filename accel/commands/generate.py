"""`accel generate`: greedy decoding with the KV cache."""

from __future__ import annotations

import argparse
import json

from accel.commands._common import add_model, add_target, open_run
from accel.data.prompts import add_prompt_options, prompts_from_args
from accel.data.tokenizer import end_tokens
from accel.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="greedy decoding with the KV cache",
                       description="Greedy decoding of new tokens after the prompt, with the KV cache. The "
                                   "prompt is --input-ids, or text through the checkpoint's tokenizer "
                                   "(--prompt, or --prompts: each prompt in turn); then the new tokens' text "
                                   "is printed after their ids.")
    add_model(p)
    add_target(p)
    add_prompt_options(p, "comma-separated prompt token ids")
    p.add_argument("--max-new-tokens", type=int, default=16, metavar="N", help="tokens to generate (default 16)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step instead")
    p.add_argument("--ignore-eos", action="store_true",
                   help="generate all --max-new-tokens; by default, with a tokenizer, generation stops at an end "
                        "token (the tokenizer's, and generation_config.json's eos_token_id)")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object a prompt: {"new_tokens": [...], "text": ... (with a tokenizer), ...}')
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from accel.runtime import check_ids, generate

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be 1 or more, not {args.max_new_tokens}")
    tokenizer, inputs = prompts_from_args(args)
    stop = set() if tokenizer is None or args.ignore_eos else end_tokens(tokenizer)
    model, backend, params, dtype = open_run(args)
    for ids in inputs:
        ids = check_ids(model, ids)
        new = generate(model, backend, params, ids, args.max_new_tokens, use_cache=not args.no_cache,
                       stop=stop)[0].tolist()
        ended = bool(new) and new[-1] in stop
        text = tokenizer.decode(new[:-1] if ended else new) if tokenizer is not None else None
        if args.json:
            record = {"new_tokens": new, "prompt": ids[0].tolist(), "model": model.name,
                      "target": backend.target, "dtype": dtype, "stopped_at_eos": ended}
            print(json.dumps(record if text is None else {**record, "text": text}, ensure_ascii=False))
        else:
            print(" ".join(map(str, new)))
            if text is not None:
                print(text)
    return 0
