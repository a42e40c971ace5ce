"""`accel targets`: every known target, whether it runs here (and why not), with its capabilities."""

from __future__ import annotations

import argparse
import json

from accel.commands._common import table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("targets", help="list targets: availability, reason, versions, dtypes, fused ops",
                       description="List every known BACKEND:DEVICE target and whether it can run here.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from accel.targets import discover

    infos = discover()
    records = []
    for info in infos:
        rec: dict = {"target": info.target, "available": info.available, "reason": info.reason}
        if info.backend is not None:
            caps = info.backend.capabilities()
            rec |= {"dtypes": list(caps.dtypes), "training": caps.training, "collectives": caps.collectives,
                    "fused_ops": list(caps.fused_ops), "versions": dict(caps.versions)}
        records.append(rec)
    if args.json:
        print(json.dumps({"targets": records}, indent=2))
        return 0
    rows = []
    for r in records:
        if r["available"]:
            versions = " ".join(f"{k} {v}" for k, v in r["versions"].items())
            rows.append([r["target"], "yes", ",".join(r["dtypes"]), "yes" if r["training"] else "no",
                         r["collectives"] or "-", ",".join(r["fused_ops"]) or "-", versions])
        else:
            rows.append([r["target"], "no", "-", "-", "-", "-", r["reason"]])
    print(table(rows, ["target", "available", "dtypes", "train", "collectives", "fused ops", "versions / reason"]))
    return 0
