"""`accel localise`: the first module of an msprobe dump whose output departs from accel's reference."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from accel.commands._common import atomic_write, parse_ids, table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "localise", help="name the first module of an msprobe dump that diverges from accel's reference",
        description="Read an msprobe PyTorch dump (msprobe's PrecisionDebugger, task tensor or statistics, level "
                    "L0 or mix) taken while running the Hugging Face model on the target device, replay its token "
                    "ids through accel's float64 reference and name the first module whose output diverges: "
                    "each module re-run on its own dumped input (its layer-isolated error, judged by msprobe's "
                    "benchmark standard against torch:cpu at the dump's dtype), beside its propagated error. "
                    "Exit 0 when no module diverges, 1 when one does, 2 on an error.")
    p.add_argument("--dump", required=True, metavar="DIR",
                   help="the dump: its root (dump_path), a step* folder or a rank*/proc* folder")
    p.add_argument("--model", required=True, metavar="DIR|PRESET",
                   help="the HF checkpoint directory the dump ran (or a preset name)")
    p.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights (default 0)")
    p.add_argument("--step", type=int, help="the step to read, where the dump holds several")
    p.add_argument("--rank", help="the rank (or proc folder) to read, where a step holds several")
    p.add_argument("--input-ids", metavar="IDS",
                   help="comma-separated token ids of the dumped prompt (needed for statistics-only dumps)")
    p.add_argument("--all", action="store_true",
                   help="re-run every module on its own dumped input and list them all (a forward per module: "
                        "slow on a large model); by default the decoder layers (and the modules around them), then "
                        "the modules inside the first that fails")
    p.add_argument("--json", metavar="FILE", help="also write every module's metrics as JSON")
    p.add_argument("--write-reference", metavar="DIR",
                   help="also write accel's float64 reference on the dump's own inputs, in the dump's dtype, as an "
                        "msprobe dump under the same module names (DIR new or empty): `msprobe compare -tp "
                        "<the dump's dump.json> -gp DIR/step0/rank0/dump.json` then flags the same module")
    p.set_defaults(run=run)


def _fmt(m: dict[str, float], key: str, spec: str) -> str:
    return format(m[key], spec) if key in m else "-"


def run(args: argparse.Namespace) -> int:
    from accel.localise import localise
    from accel.models import load

    if args.write_reference:  # refused before the work, not after it
        from accel.msprobe_dump import refuse_taken

        refuse_taken(Path(args.write_reference), "--write-reference")
    model, params = load(args.model, seed=args.seed)
    ids = parse_ids(args.input_ids) if args.input_ids else None
    result = localise(args.dump, model, params, step=args.step, rank=args.rank, input_ids=ids, every=args.all,
                      write_reference=args.write_reference,
                      progress=lambda line: print(f"localise: {line}", file=sys.stderr, flush=True))
    # by default the modules re-run on their own input (the coarse pass, then inside the first failing unit)
    shown = [r for r in result.modules if args.all or r.isolated or r.isolated_problem]
    if result.statistics_only:
        rows = [[r.entry, r.tap, _fmt(r.propagated, "norm_relative_err", ".2e"), r.isolated_problem or ""]
                for r in shown]
        header = ["module", "tap", "norm rel err", "verdict"]
    else:
        rows = [[r.entry, r.tap, r.op, _fmt(r.propagated, "max_abs", ".2e"), _fmt(r.isolated, "max_abs", ".2e"),
                 _fmt(r.isolated, "rmse", ".2e"), "fail" if r.isolated_problem else "pass" if r.isolated else "-"]
                for r in shown]
        header = ["module", "tap", "op", "propagated max abs", "isolated max abs", "isolated rmse", "own error"]
    if rows:
        print(table(rows, header))
    if args.json:
        def write(tmp: Path) -> None:
            tmp.write_text(json.dumps(result.as_dict(), indent=1, default=str))

        atomic_write(args.json, write)
    what = "statistics" if result.statistics_only else f"{result.dtype}, {result.tokens} tokens"
    if result.first is None:
        print(f"no module diverges ({len(result.modules)} modules of {result.dump}; {what})")
        return 0
    f = result.first
    where = f"layer {f.layer}, " if f.layer is not None else ""
    print(f"first divergence: {f.entry} ({where}accel tap {f.tap}, op {f.op}): {f.isolated_problem}")
    if f.called_at:
        print(f"  called at {f.called_at}")
    if f.isolated:
        print(f"  own error (on its dumped input): max abs {_fmt(f.isolated, 'max_abs', '.3g')}, "
              f"cosine {_fmt(f.isolated, 'accel_cosine', '.9f')}; propagated: max abs "
              f"{_fmt(f.propagated, 'max_abs', '.3g')}, cosine {_fmt(f.propagated, 'accel_cosine', '.9f')}")
    return 1
