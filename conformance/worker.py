"""One target's cases in a process of their own (`python -m accel.conformance.worker`), so that a crash,
an abort or a hang costs one row and not the suite.

The runner sends a JSON job list on stdin; the worker answers with one line per event on its original
stdout, each prefixed with PREFIX: {"event": "start", "job": i} before a case and {"event": "row",
"job": i, "row": {...}} after it. Everything else the frameworks print goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

PREFIX = "@@accel-conformance@@ "


def _emit(out: TextIO, event: dict[str, Any]) -> None:
    out.write(PREFIX + json.dumps(event, default=float) + "\n")
    out.flush()


def main() -> int:
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # framework chatter on stdout must not interleave with the protocol
    spec = json.loads(sys.stdin.read())

    from accel.conformance.cases import CHECKPOINTS, PROMPTS, Context, Row, case_runners, op_case
    from accel.conformance.golden import GoldenRecord, Recorder
    from accel.errors import AccelError
    from accel.targets import open_target

    target, jobs = spec["target"], spec["jobs"]
    CHECKPOINTS.update(spec.get("checkpoints") or {})
    PROMPTS.update(spec.get("prompts") or {})
    try:
        backend = open_target(target, policy=spec.get("policy"))
        ctx = Context(golden=GoldenRecord(spec["golden"]) if spec.get("golden") else None,
                      recorder=Recorder(Path(spec["record"])) if spec.get("record") else None,
                      nproc=spec.get("nproc", 2), dump=spec.get("dump"))
    except AccelError as e:
        for i, (case, item, dtype) in enumerate(jobs):
            _emit(protocol, {"event": "row", "job": i, "row": Row(target, case, item, dtype, "fail",
                                                                    detail=f"cannot open target: {e}").as_dict()})
        return 0
    runners = case_runners()
    for i, (case, item, dtype) in enumerate(jobs):
        _emit(protocol, {"event": "start", "job": i})
        start = time.monotonic()
        try:
            row = runners[case](backend, op_case(item) if case == "ops" else item, dtype, ctx)
        except Exception as e:  # a case that raises is a failed row; the next case still runs
            where = traceback.extract_tb(e.__traceback__)[-1]
            message = str(e).strip().splitlines()[0] if str(e).strip() else ""
            row = Row(target, case, item, dtype, "fail",
                      detail=f"raised {type(e).__name__}: {message} ({Path(where.filename).name}:{where.lineno})")
        row.seconds = round(time.monotonic() - start, 3)
        if not row.standards and row.status in ("pass", "fail"):  # cases that only accel's own rules judge
            row.standards = {"accel": "pass" if row.status == "pass" else row.detail or "fail"}
        if ctx.recorder is not None:
            ctx.recorder.flush()
        _emit(protocol, {"event": "row", "job": i, "row": row.as_dict()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
