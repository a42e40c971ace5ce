"""The conformance matrix: cases × models × dtypes on each target, a progress bar while it runs, a
summary table at the end, and report.json / report.md under reports/<timestamp>/ and reports/latest/."""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from accel.conformance.cases import STATUSES, Row, run_generation_case, run_inference_case, run_op_case
from accel.conformance.op_cases import CASES

from accel.errors import ConformanceError

CASE_KINDS = ("ops", "inference", "generation")
DEFAULT_MODELS = ("qwen2-tiny",)
DEFAULT_DTYPES = ("float32", "float16", "bfloat16")
MODEL_DTYPES = ("float32",)  # model cases at low precision are judged with the issue-7 ratio rule


@dataclass
class Plan:
    targets: list[str]
    cases: tuple[str, ...] = CASE_KINDS
    models: tuple[str, ...] = DEFAULT_MODELS
    dtypes: tuple[str, ...] = DEFAULT_DTYPES
    jobs: list[tuple[str, str, str, Any]] = field(default_factory=list)  # (target, case, dtype, item)

    def build(self) -> Plan:
        unknown = sorted(set(self.cases) - set(CASE_KINDS))
        if unknown:
            raise ConformanceError(f"unknown case kind(s) {', '.join(unknown)}; known: {', '.join(CASE_KINDS)}")
        from accel.models import presets

        missing = sorted(set(self.models) - set(presets()))
        if missing:
            raise ConformanceError(f"unknown model preset(s) {', '.join(missing)}; see `accel models`")
        for target in self.targets:
            for case in self.cases:
                if case == "ops":
                    self.jobs += [(target, case, dtype, c) for dtype in self.dtypes for c in CASES]
                else:
                    model_dtypes = [d for d in self.dtypes if d in MODEL_DTYPES] or list(self.dtypes[:1])
                    self.jobs += [(target, case, dtype, m) for dtype in model_dtypes for m in self.models]
        return self


_RUNNERS: dict[str, Callable[[Any, Any, str], Row]] = {
    "ops": lambda backend, item, dtype: run_op_case(backend, item, dtype),
    "inference": lambda backend, item, dtype: run_inference_case(backend, item, dtype),
    "generation": lambda backend, item, dtype: run_generation_case(backend, item, dtype),
}


class Progress:
    """A one-line progress bar on a terminal; a line every 10% otherwise (CI logs)."""

    def __init__(self, total: int, stream: TextIO = sys.stderr):
        self.total, self.done, self.stream = total, 0, stream
        self.tty = stream.isatty()
        self.start = time.monotonic()
        self._last_decile = -1

    def step(self, label: str) -> None:
        self.done += 1
        frac = self.done / max(self.total, 1)
        if self.tty:
            bar = "#" * int(30 * frac)
            self.stream.write(f"\r[{bar:<30}] {self.done}/{self.total} {label[:50]:<50}")
            if self.done == self.total:
                self.stream.write("\n")
        elif int(frac * 10) != self._last_decile:
            self._last_decile = int(frac * 10)
            elapsed = time.monotonic() - self.start
            self.stream.write(f"conformance: {self.done}/{self.total} ({elapsed:.0f} s) {label}\n")
        self.stream.flush()


def run(plan: Plan, progress: bool = True) -> list[Row]:
    from accel.targets import open_target

    rows: list[Row] = []
    bar = Progress(len(plan.jobs)) if progress else None
    backends: dict[str, Any] = {}
    for target, case, dtype, item in plan.jobs:
        if target not in backends:
            backends[target] = open_target(target)
        label = f"{target} {case} {getattr(item, 'op', item)} {dtype}"
        try:
            rows.append(_RUNNERS[case](backends[target], item, dtype))
        except Exception as e:  # a case that raises is a failed row, and the suite goes on
            name = f"{item.op}[{item.shape}]" if case == "ops" else str(item)
            rows.append(Row(target, case, name, dtype, "fail", detail=f"raised {type(e).__name__}: {e}"))
        if bar:
            bar.step(label)
    return rows


# --- output ---------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def summary_rows(rows: Iterable[Row]) -> list[list[str]]:
    """Op rows folded to one line per target/op/dtype (the worst shape); model rows as they are."""
    groups: dict[tuple[str, str, str, str], list[Row]] = {}
    for r in rows:
        key_model = r.model.split("[")[0] if r.case == "ops" else r.model
        groups.setdefault((r.target, r.case, key_model, r.dtype), []).append(r)
    out = []
    for (target, case, model, dtype), rs in groups.items():
        worst = [r for r in rs if r.status not in ("pass", "skipped")] or rs
        cos = min((r.metrics.get("cosine", np.nan) for r in rs if r.metrics), default=None)
        mae = max((r.metrics.get("max_abs", np.nan) for r in rs if r.metrics), default=None)
        mre = max((r.metrics.get("max_rel", np.nan) for r in rs if r.metrics), default=None)
        if case == "generation":
            agree = worst[0].metrics.get("token_agreement")
            cos, mae, mre = None, None, None
            extra = f"tokens {agree:.0%}" if agree is not None else ""
        else:
            extra = worst[0].detail if worst[0].status != "pass" else ""
        if worst[0].first_divergence:
            fd = worst[0].first_divergence
            extra += f"; first divergence {fd['tap']} ({fd['op']})"
        out.append([target, case, model, dtype, _fmt(cos, ".7f"), _fmt(mae, ".2e"), _fmt(mre, ".2e"),
                    worst[0].status, extra])
    return out


HEADER = ["target", "case", "model/op", "dtype", "cosine", "max_abs", "max_rel", "status", "detail"]


def exit_code(rows: Iterable[Row]) -> int:
    return 1 if any(r.status in ("fail", "crashed", "timeout") for r in rows) else 0


def environment() -> dict[str, Any]:
    from accel import __version__

    versions = {"accel-port": __version__, "python": platform.python_version(), "numpy": np.__version__}
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:
        pass
    return {"versions": versions, "machine": platform.machine(), "system": platform.system()}


def write_reports(rows: list[Row], report_dir: Path, plan: Plan, seconds: float) -> Path:
    from accel.commands._common import table

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = report_dir / stamp
    out.mkdir(parents=True, exist_ok=True)
    counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    doc = {"created": stamp, "seconds": round(seconds, 1), "targets": plan.targets, "cases": list(plan.cases),
           "models": list(plan.models), "dtypes": list(plan.dtypes), "counts": counts,
           "environment": environment(), "rows": [r.as_dict() for r in rows]}
    (out / "report.json").write_text(json.dumps(doc, indent=1, default=float))
    md = [f"# Conformance report {stamp}", "", f"Targets: {', '.join(plan.targets)}. "
          f"Finished in {seconds:.0f} s.", "", " · ".join(f"{k}: {v}" for k, v in counts.items()), "", "```",
          table(summary_rows(rows), HEADER), "```", ""]
    (out / "report.md").write_text("\n".join(md))
    latest = report_dir / "latest"
    if latest.is_symlink() or latest.is_file():
        latest.unlink()
    elif latest.exists():
        shutil.rmtree(latest)
    shutil.copytree(out, latest)
    return out
