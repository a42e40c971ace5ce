"""`accel mindrecord`: jsonl SFT data (Alpaca or plain text) to tokenised, padded MindRecord shards."""

from __future__ import annotations

import argparse
import json
import sys
import time

MAX_LISTED_SKIPS = 20  # skipped lines reported one by one; the rest are counted in the summary


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mindrecord", help="convert jsonl SFT data to MindRecord shards",
        description="Tokenise jsonl data (Alpaca instruction/input/output or {\"text\": ...}) into int32 "
                    "input_ids/labels/attention_mask rows of seq_length + 1 tokens, prompt tokens and padding "
                    "set to -100 in the labels, written with MindSpore's FileWriter.")
    p.add_argument("--data", required=True, metavar="FILE", help="input .jsonl, one JSON object per line")
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="HF tokenizer.json, SentencePiece .model, or a directory holding either")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="output MindRecord file; with --shards N the files are FILE0 .. FILE{N-1}")
    p.add_argument("--seq-length", type=int, required=True, metavar="N",
                   help="training sequence length; rows hold N + 1 tokens, longer samples are truncated")
    p.add_argument("--shards", type=int, default=1, metavar="N", help="number of MindRecord shards (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (all its shards)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="report malformed lines and skip them (default: the first one is an error)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(run=run)


class _Progress:
    """Rows converted so far, on stderr: rewritten in place on a terminal, a line every few seconds
    otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = time.monotonic()  # the first line after 5 s: quick runs print only the summary
        self.shown = False

    def __call__(self, rows: int, seconds: float) -> None:
        now = time.monotonic()
        if not self.tty and now - self.last < 5.0:
            return
        self.last, self.shown = now, True
        rate = rows / seconds if seconds > 0 else 0.0
        start = "\r" if self.tty else ""
        print(f"{start}converted {rows:,} rows ({rate:,.0f} rows/s)", end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty and self.shown:
            print(file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from accel.data import mindrecord, tokenizer

    tok = tokenizer.load(args.tokenizer)
    listed = 0

    def on_skip(e: Exception) -> None:
        nonlocal listed
        listed += 1
        if listed <= MAX_LISTED_SKIPS:
            print(f"accel mindrecord: skipped {e}", file=sys.stderr)

    progress = _Progress()
    try:
        summary = mindrecord.convert(args.data, args.out, tok, args.seq_length, shards=args.shards,
                                     overwrite=args.overwrite, skip_bad=args.skip_bad_lines, on_skip=on_skip,
                                     progress=progress)
    finally:
        progress.close()
    if args.json:
        print(json.dumps({**summary.__dict__, "files": list(summary.files), "seq_length": args.seq_length,
                          "eos_id": tok.eos_id, "pad_id": tok.pad_id}))
        return 0
    more = f" ({summary.skipped - MAX_LISTED_SKIPS} not listed)" if summary.skipped > MAX_LISTED_SKIPS else ""
    print(f"rows {summary.rows:,}  tokens {summary.tokens:,} ({summary.target_tokens:,} in the loss)  "
          f"truncated {summary.truncated:,}  without target {summary.no_target:,}  skipped lines "
          f"{summary.skipped:,}{more}")
    rate = summary.rows / summary.seconds if summary.seconds else 0.0
    eos = "none" if tok.eos_id is None else tok.eos_id
    print(f"wrote {', '.join(summary.files)} in {summary.seconds:.2f} s ({rate:,.0f} rows/s); "
          f"eos id {eos}, pad id {tok.pad_id}")
    return 0
