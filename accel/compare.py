"""One model through several targets, side by side: what each costs in accuracy and what it gains in
speed.

Accuracy is measured against a reference run, numpy:cpu in float64 by default (the op set's oracle,
so every target, torch:cpu included, is judged by its own error): cosine and max abs error of the
prefill logits, and the share of greedy tokens equal to the reference's. Cost: compile/export time
(the first prefill and decode steps minus the same work once compiled), prefill latency (median of up to 5),
decode tokens/s at batch 1 (a timed generation after a warm-up one), and peak resident memory of the
target's process, absolute and as growth over the process with the weights loaded.

Each target runs in its own spawned process with a timeout: a crash, a hang or a compiler that runs
out of memory is a row of the report ("crashed", "timeout"), a compiler that rejects the model is a
row with the compiler's own reason ("failed"), and the other targets still run.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import pickle
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from accel import hostmem
from accel.errors import AccelError, UsageError

REFERENCE = "numpy:cpu"
REFERENCE_DTYPE = "float64"
DEFAULT_TARGETS = ("torch:cpu", "torch-compile:cpu", "onnxruntime:cpu", "tvm:llvm", "xla:cpu")
PREFILL_REPEATS = 5
PREFILL_BUDGET_S = 30.0  # fewer repeats for a target whose prefill takes seconds


@dataclass
class Result:
    target: str
    dtype: str
    status: str  # ok | failed | unavailable | crashed | timeout
    reason: str = ""
    compile_s: float | None = None
    prefill_ms: float | None = None
    decode_tok_s: float | None = None
    peak_rss_mib: float | None = None
    rss_growth_mib: float | None = None
    cosine: float | None = None
    max_abs: float | None = None
    token_agreement: float | None = None
    tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the whole measurement, process start included


@dataclass
class Comparison:
    model: str
    parameters: int
    dtype: str
    prompt_len: int
    new_tokens: int
    reference: Result
    results: list[Result]


# --- one target (runs in the child process) -----------------------------------------------------------


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line(e: BaseException) -> str:
    """An exception as one trimmed line in the raiser's own words. Exporters wrap the specific error
    (the op they lack) in a generic one: then the deepest cause's first line, under the outer type."""

    def first(x: BaseException) -> str:
        lines = [ln.strip() for ln in _ANSI.sub("", str(x)).splitlines() if ln.strip()]
        return f"{type(x).__name__}: {lines[0]}" if lines else type(x).__name__

    root = e
    while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
        root = root.__cause__ or root.__context__  # type: ignore[assignment]
    text = first(e) if root is e else f"{type(e).__name__}: {first(root)}"
    return text if len(text) <= 300 else text[:297] + "..."


def _peak_rss_mib() -> float:
    return hostmem.peak_rss() / (1 << 20)


def _unavailable(target: str) -> str | None:
    from accel.targets import parse, unavailable_reason

    return unavailable_reason(parse(target))


def measure(target: str, dtype: str, model: Any, params: dict[str, np.ndarray], ids: np.ndarray,
            new_tokens: int) -> tuple[Result, np.ndarray | None]:
    """Run `model` on `target`: timings, memory, prefill logits (float32) and greedy tokens. Failures
    become a Result with the reason, never an exception."""
    from accel.runtime import forward_fn, place
    from accel.targets import open_target

    start, base_rss = time.perf_counter(), _peak_rss_mib()
    result = Result(target, dtype, "failed")
    reason = _unavailable(target)
    if reason is not None:
        result.status, result.reason = "unavailable", reason
        return result, None
    logits_out = None
    try:
        backend = open_target(target, policy={})
        backend.check_dtype(dtype)
        weights = place(backend, params, dtype)
        forward = forward_fn(model, backend)
        prompt = backend.asarray(ids, "int64")

        def greedy(logits: Any) -> np.ndarray:
            return np.argmax(np.asarray(backend.to_numpy(logits), np.float64)[:, -1], axis=-1)  # (1,)

        def generation() -> tuple[float, list[float], list[int], Any]:
            """(prefill seconds, decode step seconds, tokens, prefill logits)"""
            cache = model.new_cache()
            t0 = time.perf_counter()
            logits = forward(weights, prompt, cache)
            nxt = greedy(logits)  # reading the logits waits for the device
            prefill, first_logits, tokens, steps = time.perf_counter() - t0, logits, [int(nxt[0])], []
            for _ in range(new_tokens - 1):
                t0 = time.perf_counter()
                nxt = greedy(forward(weights, backend.asarray(nxt[:, None].astype(np.int64), "int64"), cache))
                steps.append(time.perf_counter() - t0)
                tokens.append(int(nxt[0]))
            return prefill, steps, tokens, first_logits

        def prefill_only() -> float:
            t0 = time.perf_counter()
            greedy(forward(weights, prompt, model.new_cache()))
            return time.perf_counter() - t0

        t0 = time.perf_counter()
        generation()  # compiles (and exports) every graph a generation of this length uses
        first = time.perf_counter() - t0
        prefills: list[float] = []
        while len(prefills) < PREFILL_REPEATS - 1 and sum(prefills) < PREFILL_BUDGET_S:
            prefills.append(prefill_only())
        prefill, steps, tokens, logits = generation()
        prefills.append(prefill)
        result.prefill_ms = 1e3 * float(np.median(prefills))
        result.decode_tok_s = len(steps) / sum(steps) if steps else None
        result.compile_s = max(first - prefill - sum(steps), 0.0)
        result.tokens = tokens
        logits_out = np.asarray(backend.to_numpy(logits), dtype=np.float32)
        result.status = "ok"
    except AccelError as e:
        result.reason = str(e)
    except Exception as e:  # a compiler's own error: the report row carries its words
        result.reason = one_line(e)
    peak = _peak_rss_mib()
    result.peak_rss_mib, result.rss_growth_mib = peak, peak - base_rss
    result.seconds = time.perf_counter() - start
    return result, logits_out


def _child(target: str, dtype: str, work: str, index: int, new_tokens: int) -> None:
    """Entry of a target's process: inputs from `work`, result (JSON) and logits (.npy) back there."""
    log = os.open(os.path.join(work, f"{index}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)  # frameworks' progress and warnings go to the target's log, not the terminal
    os.dup2(log, 2)
    with open(os.path.join(work, "inputs.pkl"), "rb") as f:
        model, params, ids = pickle.load(f)
    result, logits = measure(target, dtype, model, params, ids, new_tokens)
    if logits is not None:
        np.save(os.path.join(work, f"{index}.npy"), logits)
    tmp = os.path.join(work, f"{index}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(asdict(result), f)
    os.replace(tmp, os.path.join(work, f"{index}.json"))


# --- the comparison -------------------------------------------------------------------------------


def _isolated(target: str, dtype: str, work: Path, index: int, new_tokens: int, timeout: float) -> Result:
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no framework state, fork-safe
    start = time.perf_counter()
    proc = ctx.Process(target=_child, args=(target, dtype, str(work), index, new_tokens), daemon=True)
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return Result(target, dtype, "timeout", f"no result within {timeout:.0f} s",
                      seconds=time.perf_counter() - start)
    out = work / f"{index}.json"
    if not out.exists():
        code = proc.exitcode or 0
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        try:
            import signal

            how = f"killed by {signal.Signals(-code).name}" if code < 0 else how
        except ValueError:
            pass
        tail = _log_tail(work / f"{index}.log")
        return Result(target, dtype, "crashed", f"{how}{': ' + tail if tail else ''}",
                      seconds=time.perf_counter() - start)
    return Result(**json.loads(out.read_text()))


def _log_tail(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


def _in_process(target: str, dtype: str, work: Path, index: int, new_tokens: int, timeout: float) -> Result:
    with open(work / "inputs.pkl", "rb") as f:
        model, params, ids = pickle.load(f)
    result, logits = measure(target, dtype, model, params, ids, new_tokens)
    if logits is not None:
        np.save(work / f"{index}.npy", logits)
    return result


def compare(model: Any, params: dict[str, np.ndarray], targets: Sequence[str], dtype: str = "float32",
            prompt_len: int = 128, new_tokens: int = 32, *, seed: int = 0, reference: str = REFERENCE,
            reference_dtype: str = REFERENCE_DTYPE, isolate: bool = True, timeout: float = 1800.0,
            progress: Callable[[str], None] | None = None) -> Comparison:
    """Run the reference and every target (each in its own process unless `isolate` is False) on the
    same seeded prompt, and judge each target's prefill logits and greedy tokens against the
    reference's."""
    from accel.conformance.metrics import compare as metrics
    from accel.targets import parse

    if prompt_len < 1 or new_tokens < 1:
        raise UsageError("--prompt-len and --new-tokens must be 1 or more")
    for t in (*targets, reference):
        parse(t)  # an unknown backend or device is a usage error, before anything runs
    say = progress or (lambda line: None)
    ids = np.random.default_rng(seed).integers(0, model.vocab_size, (1, prompt_len)).astype(np.int64)
    runner = _isolated if isolate else _in_process
    with tempfile.TemporaryDirectory(prefix="accel-compare-") as scratch:
        work = Path(scratch)
        with open(work / "inputs.pkl", "wb") as f:
            pickle.dump((model, dict(params), ids), f, protocol=pickle.HIGHEST_PROTOCOL)
        plan = [(reference, reference_dtype), *((t, dtype) for t in targets)]
        results, logits = [], []
        for i, (target, dt) in enumerate(plan):
            what = "reference" if i == 0 else f"{i}/{len(targets)}"
            say(f"[{what}] {target} ({dt}): compiling and measuring ...")
            r = runner(target, dt, work, i, new_tokens, timeout)
            path = work / f"{i}.npy"
            logits.append(np.load(path) if r.status == "ok" and path.exists() else None)
            results.append(r)
            say(f"[{what}] {target}: {_summary(r)}")
    ref, ref_logits = results[0], logits[0]
    for r, lg in zip(results[1:], logits[1:]):
        if r.status == "ok" and ref.status == "ok" and lg is not None and ref_logits is not None:
            m = metrics(lg, ref_logits)
            r.cosine, r.max_abs = m["accel_cosine"], m["max_abs"]
            agree = [a == b for a, b in zip(r.tokens, ref.tokens)]
            r.token_agreement = sum(agree) / len(agree) if agree else None
    return Comparison(model.name, model.num_parameters(), dtype, prompt_len, new_tokens, ref, results[1:])


def _summary(r: Result) -> str:
    if r.status != "ok":
        return f"{r.status}: {r.reason}"
    decode = f"{r.decode_tok_s:.1f} tok/s" if r.decode_tok_s else "-"
    return (f"ok in {r.seconds:.1f} s: compile {r.compile_s:.1f} s, prefill {r.prefill_ms:.1f} ms, decode {decode}, "
            f"peak {r.peak_rss_mib:.0f} MiB")


# --- output ---------------------------------------------------------------------------------------

HEADER = ["target", "status", "compile s", "prefill ms", "decode tok/s", "peak MiB", "growth MiB", "cosine",
          "max abs", "tokens", "reason"]


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def rows(c: Comparison) -> list[list[str]]:
    out = []
    for r in c.results:
        out.append([r.target, r.status, _fmt(r.compile_s, ".2f"), _fmt(r.prefill_ms, ".2f"),
                    _fmt(r.decode_tok_s, ".1f"), _fmt(r.peak_rss_mib, ".0f"), _fmt(r.rss_growth_mib, ".0f"),
                    _fmt(r.cosine, ".9f"), _fmt(r.max_abs, ".2e"), _fmt(r.token_agreement, ".0%"), r.reason])
    return out


def render_table(c: Comparison) -> str:
    from accel.commands._common import table

    ref = c.reference
    head = (f"{c.model} ({c.parameters:,} parameters), {c.dtype}, prompt {c.prompt_len} tokens, "
            f"{c.new_tokens} new tokens; reference {ref.target} {ref.dtype}"
            + ("" if ref.status == "ok" else f" ({ref.status}: {ref.reason}; no accuracy figures)"))
    return head + "\n" + table(rows(c), HEADER)


def _markdown(c: Comparison, stamp: str) -> str:
    def cell(x: str) -> str:
        return x.replace("|", "\\|")

    lines = [f"# Compiler comparison {stamp}", "",
             f"Model **{c.model}** ({c.parameters:,} parameters), compute dtype {c.dtype}, prompt of {c.prompt_len} "
             f"tokens, {c.new_tokens} greedy new tokens at batch 1. Accuracy against {c.reference.target} in "
             f"{c.reference.dtype}: cosine and max abs error of the prefill logits, share of greedy tokens equal. "
             "Compile: first generation minus a compiled one. Prefill: median of up to "
             f"{PREFILL_REPEATS}. Peak: the target process's maximum resident set; growth: over that process "
             "with the weights loaded, before the target started.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows(c)]
    return "\n".join(lines) + "\n"


def _chart(c: Comparison, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("compile_s", "compile / export (s)"), ("prefill_ms", "prefill latency (ms)"),
              ("decode_tok_s", "decode (tokens/s)"), ("peak_rss_mib", "peak memory (MiB)")]
    names = [r.target for r in c.results]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (attr, title) in zip(axes, panels):
        values = [getattr(r, attr) or 0.0 for r in c.results]
        bars = ax.bar(range(len(names)), values, color=["#4878a8" if r.status == "ok" else "#c44e52"
                                                        for r in c.results])
        for bar, r in zip(bars, c.results):
            if r.status != "ok":
                ax.annotate(r.status, (bar.get_x() + bar.get_width() / 2, 0), ha="center", va="bottom",
                            fontsize=7, rotation=90, color="#c44e52")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    fig.suptitle(f"{c.model}, {c.dtype}, prompt {c.prompt_len}, {c.new_tokens} new tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(c: Comparison, report_dir: Path) -> Path:
    """report.json, report.md and chart.png in a new `compare-<timestamp>` folder of `report_dir`,
    which appears complete or not at all."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    report_dir.mkdir(parents=True, exist_ok=True)
    final = report_dir / f"compare-{stamp}"
    n = 1
    while final.exists():
        n += 1
        final = report_dir / f"compare-{stamp}-{n}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=report_dir))
    try:
        doc = {"created": stamp, **{k: v for k, v in asdict(c).items() if k not in ("reference", "results")},
               "reference": asdict(c.reference), "results": [asdict(r) for r in c.results],
               "environment": _environment()}
        (tmp / "report.json").write_text(json.dumps(doc, indent=1))
        (tmp / "report.md").write_text(_markdown(c, stamp))
        _chart(c, tmp / "chart.png")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _environment() -> dict[str, Any]:
    import platform

    from accel import __version__

    return {"accel-port": __version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count()}
