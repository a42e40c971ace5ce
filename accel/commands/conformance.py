"""`accel conformance`: the conformance matrix on the targets available here, with a report."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from accel.commands._common import table
from accel.data.prompts import add_text_prompt_options, given_prompts
from accel.errors import UsageError
from accel.staging import discard_staged, stage_dir


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "conformance", help="run the conformance suite and write a report",
        description="Run op-level, model and training cases on each target against the NumPy float64 reference "
                    "(or a golden record), each target in its own process; print a summary table and write "
                    "reports/<timestamp>/ and reports/latest/. Exit code 1 when any case fails unexpectedly.")
    p.add_argument("--targets", type=_csv, metavar="T1,T2",
                   help="targets to check (default: every target available here but the numpy:cpu reference)")
    p.add_argument("--models", type=_csv, metavar="M1,DIR",
                   help="model presets and/or Hugging Face checkpoint directories, a row naming a directory by "
                        "its name (default: every *-tiny preset)")
    add_text_prompt_options(p.add_mutually_exclusive_group(),
                            "for the checkpoint directories in --models (default for them: the built-in set)")
    p.add_argument("--full-training", action="store_true",
                   help="train checkpoint directories fully as well as with LoRA (full fine-tuning holds AdamW "
                        "state of 4x the weights; presets always train both ways)")
    p.add_argument("--cases", type=_csv, metavar="C1,C2",
                   help="case kinds: ops, inference, generation, training, checkpoints, collectives (default: all "
                        "but collectives)")
    p.add_argument("--dtypes", type=_csv, metavar="D1,D2",
                   help="dtypes (default: float32,float16,bfloat16 for presets; a checkpoint directory's "
                        "inference and generation at the dtype its weights are stored in)")
    golden = p.add_mutually_exclusive_group()
    golden.add_argument("--golden", type=Path, metavar="DIR",
                        help="compare against a golden record written on another machine")
    golden.add_argument("--write-golden", type=Path, metavar="DIR",
                        help="record inputs, expected values and this target's outputs as a golden record")
    p.add_argument("--dump", type=Path, metavar="DIR",
                   help="also write each target's taps of the inference cases, with their inputs, as an msprobe dump "
                        "under the Hugging Face module names: DIR/<backend>_<device>/<model>/<dtype>/step0/rank0 "
                        "(DIR new or empty), for `msprobe compare` against another target's or an NPU's dump")
    p.add_argument("--known-failures", type=Path, metavar="DIR",
                   help="directory of reviewed expected failures, <backend>_<device>.yaml (default: the suite's own)")
    p.add_argument("--nproc", type=int, default=2, metavar="N", help="ranks of the collective cases (default 2)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), metavar="N",
                   help="targets run at once (default: 2 on a machine with 2 or more cores); targets on one "
                        "accelerator always take turns")
    p.add_argument("--case-timeout", type=float, default=300.0, metavar="S", help="seconds per case (default 300)")
    p.add_argument("--report-dir", type=Path, default=Path("reports"), metavar="DIR", help="default ./reports")
    p.add_argument("--verbose", action="store_true", help="one table line per case instead of per op")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from accel.conformance import golden, report, runner
    from accel.models import presets
    from accel.targets import discover, select

    if args.targets:
        targets = [str(select(t)) for t in args.targets]  # an unavailable target is an error, not a skip
    else:
        targets = [i.target for i in discover() if i.available and not i.target.startswith("numpy:")]
    if args.nproc < 2:
        raise UsageError("--nproc must be at least 2")
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    options = runner.Options(case_timeout=args.case_timeout, nproc=args.nproc, jobs=args.jobs)
    if args.known_failures:
        if not args.known_failures.is_dir():
            raise UsageError(f"--known-failures {args.known_failures} is not a directory")
        options.known_failures = args.known_failures
    models, options.checkpoints = runner.resolve_models(args.models or ())
    given = given_prompts(args)
    if given is not None and not options.checkpoints:
        raise UsageError("--prompt and --prompts need a checkpoint directory in --models: a preset has no tokenizer")
    if args.golden:
        if given is not None:
            raise UsageError("a golden record replays its own prompts; drop --prompt/--prompts")
        record = golden.GoldenRecord(args.golden)
        record.check_checkpoints(options.checkpoints)  # other weights: one line now, not a wall of failures
        jobs = [j for j in record.jobs() if (not args.cases or j[0] in args.cases)
                and (not models or runner.model_of(j[1]) in models or j[0] == "ops")
                and (not args.dtypes or j[2] in args.dtypes)]
        options.golden = str(args.golden.resolve())
        print(f"conformance: against golden record {args.golden} (written by {record.target})", flush=True)
    else:
        default_cases = [c for c in runner.case_kinds() if c != "collectives"]
        models = models or [n for n in presets() if n.endswith("-tiny")]
        jobs = runner.plan_jobs(args.cases or default_cases, models, args.dtypes, options.checkpoints,
                                full_training=True if args.full_training else None)
        if any(j[0] in ("inference", "generation") for j in jobs):
            options.prompts, notes = runner.checkpoint_prompts(options.checkpoints, given,
                                                               generation=any(j[0] == "generation" for j in jobs))
            for note in notes:
                print(f"conformance: {note}", flush=True)
    staging, identities = None, {}
    if args.dump:
        from accel.msprobe_dump import refuse_taken

        refuse_taken(args.dump, "--dump")
        options.dump = str(stage_dir(args.dump))
    if args.write_golden:
        from accel.checkpoint.identity import tensor_digests

        if len(targets) != 1:
            raise UsageError("--write-golden records one target: give exactly one with --targets")
        identities = {name: tensor_digests(path) for name, path in options.checkpoints.items()}
        staging = golden.staging_dir(args.write_golden)
        options.record = str(staging)
    print(f"conformance: {len(jobs) * len(targets)} cases on {', '.join(targets)}", flush=True)
    start = time.monotonic()
    try:
        rows = runner.run(targets, jobs, options)
        if options.dump:
            os.replace(options.dump, args.dump)  # over an empty directory too
    except BaseException:
        if staging is not None and staging.exists():
            import shutil

            shutil.rmtree(staging)
        raise
    finally:
        if args.dump:
            discard_staged(args.dump)
    seconds = time.monotonic() - start
    shown = [[r.target, r.case, r.model, r.dtype, f"{r.metrics.get('accel_cosine', float('nan')):.7f}",
              f"{r.metrics.get('max_abs', float('nan')):.2e}", f"{r.metrics.get('max_rel', float('nan')):.2e}",
              r.status, ", ".join(r.standards) or "-", r.detail[:160]] for r in rows]
    shown = shown if args.verbose else runner.summary_rows(rows)
    print(table(shown, runner.HEADER))
    meta = {"seconds": round(seconds, 1), "targets": targets, "golden": str(args.golden) if args.golden else None}
    out = report.write(rows, args.report_dir, meta)
    if args.dump:
        print(f"msprobe dumps written to {args.dump}")
    if staging is not None:
        golden.finish(staging, args.write_golden, targets[0], report.environment(), identities)
        print(f"golden record written to {args.write_golden}")
    c = report.counts(rows)
    fixed = sum("known failure now passes" in r.detail for r in rows)
    print(f"\n{c['pass']} passed, {c['fail']} failed, {c['known-failure']} known failures, {c['skipped']} skipped, "
          f"{c['crashed']} crashed, {c['timeout']} timed out in {seconds:.0f} s"
          + (f"; {fixed} known failure(s) now pass" if fixed else "") + f"\nreport: {out}/report.html "
          f"(and {args.report_dir / 'latest'})")
    return runner.exit_code(rows)
