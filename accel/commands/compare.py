"""`accel compare`: one model through several targets (eager, torch.compile, ONNX Runtime, TVM, XLA):
accuracy against the float64 reference and speed, side by side, as a table and a report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from accel.commands._common import add_model
from accel.compare import DEFAULT_TARGETS, REFERENCE, REFERENCE_DTYPE
from accel.dtypes import check_float
from accel.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="accuracy and speed of one model on several compiler stacks, side by side",
        description="Run one model on each target in its own process: prefill logits and greedy tokens against "
                    f"the {REFERENCE} {REFERENCE_DTYPE} reference, compile/export time, prefill latency, decode "
                    "tokens/s and peak memory. A target that fails to export or compile is a row with the "
                    "compiler's reason; the others still run. Writes report.json, report.md and chart.png under "
                    "REPORT_DIR/compare-<timestamp>/. Exit code 1 when a target did not run through.")
    add_model(p)
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS), metavar="T1,T2,...",
                   help=f"comma-separated targets (default {','.join(DEFAULT_TARGETS)})")
    p.add_argument("--dtype", default="float32", help="compute dtype of the targets (default float32)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens, seeded random ids (default 128)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated (default 32)")
    p.add_argument("--reference", default=REFERENCE, metavar="TARGET",
                   help=f"the accuracy reference (default {REFERENCE}, computing in {REFERENCE_DTYPE}); its "
                        "dtype is float64 on numpy:cpu and float32 elsewhere")
    p.add_argument("--report-dir", default="reports", type=Path, help="where reports go (default reports/)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per target (default 1800)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from accel.compare import compare, render_table, write_report
    from accel.models import load

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets:
        raise UsageError("--targets names no target; give e.g. torch:cpu,xla:cpu")
    if len(set(targets)) != len(targets):
        raise UsageError(f"--targets names a target twice: {args.targets}")
    dtype = check_float(args.dtype)
    if args.report_dir.exists() and not args.report_dir.is_dir():
        raise UsageError(f"--report-dir {args.report_dir} is a file; give a directory")
    model, params = load(args.model, seed=args.seed)
    ref_dtype = REFERENCE_DTYPE if args.reference.startswith("numpy:") else "float32"
    result = compare(model, params, targets, dtype, args.prompt_len, args.new_tokens, seed=args.seed,
                     reference=args.reference, reference_dtype=ref_dtype, timeout=args.timeout,
                     progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(render_table(result))
    out = write_report(result, args.report_dir)
    print(f"report: {out}/report.md (report.json, chart.png)")
    return 0 if all(r.status == "ok" for r in [result.reference, *result.results]) else 1
