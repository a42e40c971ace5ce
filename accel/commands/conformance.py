"""`accel conformance`: the conformance matrix on the targets available here, with a report."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from accel.commands._common import table


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "conformance", help="run the conformance suite and write a report",
        description="Run op-level and model cases on each target against the NumPy float64 reference; "
                    "print a summary table and write reports/<timestamp>/ and reports/latest/. "
                    "Exit code 1 when any case fails unexpectedly.")
    p.add_argument("--targets", type=_csv, metavar="T1,T2",
                   help="targets to check (default: every target available here but the numpy:cpu reference)")
    p.add_argument("--models", type=_csv, metavar="M1,M2", help="model presets (default: every family's tiny preset)")
    p.add_argument("--cases", type=_csv, metavar="C1,C2", help="case kinds: ops, inference, generation (default all)")
    p.add_argument("--dtypes", type=_csv, metavar="D1,D2", help="dtypes (default float32,float16,bfloat16)")
    p.add_argument("--report-dir", type=Path, default=Path("reports"), metavar="DIR", help="default ./reports")
    p.add_argument("--verbose", action="store_true", help="one table line per case instead of per op")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from accel.conformance import runner
    from accel.targets import discover, select

    if args.targets:
        targets = [str(select(t)) for t in args.targets]  # an unavailable target is an error, not a skip
    else:
        targets = [i.target for i in discover() if i.available and not i.target.startswith("numpy:")]
    from accel.models import presets

    models = args.models or tuple(n for n in presets() if n.endswith("-tiny"))
    plan = runner.Plan(targets, cases=args.cases or runner.CASE_KINDS, models=models,
                       dtypes=args.dtypes or runner.DEFAULT_DTYPES).build()
    print(f"conformance: {len(plan.jobs)} cases on {', '.join(targets)}", flush=True)
    start = time.monotonic()
    rows = runner.run(plan)
    seconds = time.monotonic() - start
    shown = [[r.target, r.case, r.model, r.dtype, f"{r.metrics.get('cosine', float('nan')):.7f}",
              f"{r.metrics.get('max_abs', float('nan')):.2e}", f"{r.metrics.get('max_rel', float('nan')):.2e}",
              r.status, r.detail] for r in rows] if args.verbose else runner.summary_rows(rows)
    print(table(shown, runner.HEADER))
    out = runner.write_reports(rows, args.report_dir, plan, seconds)
    counts = {s: sum(r.status == s for r in rows) for s in ("pass", "fail", "skipped")}
    print(f"\n{counts['pass']} passed, {counts['fail']} failed, {counts['skipped']} skipped in {seconds:.0f} s; "
          f"report: {out} (and {args.report_dir / 'latest'})")
    return runner.exit_code(rows)
