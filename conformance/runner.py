"""The conformance matrix: cases x models x dtypes on each target, each target in worker processes of its
own with a per-case timeout, a progress bar while it runs, reviewed known failures applied, and a
summary table at the end."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import TextIO

import numpy as np

from accel.conformance.cases import Row, case_modules
from accel.conformance.op_cases import CASES as OP_CASES
from accel.conformance.worker import PREFIX
from accel.errors import ConformanceError

BUILTIN_KINDS = ("ops", "inference", "generation")
DEFAULT_DTYPES = ("float32", "float16", "bfloat16")
Job = tuple[str, str, str]  # (case kind, item, dtype)
KNOWN_FAILURES = Path(__file__).parent / "known_failures"
HOST_DEVICES = ("cpu", "llvm")  # targets on these share only the host's cores


def case_kinds() -> list[str]:
    return [*BUILTIN_KINDS, *(k for m in case_modules() for k in m.CASE_KINDS)]


def resolve_models(specs: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """Model names for the jobs, and the checkpoint directories among them (name -> absolute path). A
    spec is a preset or an HF checkpoint directory, named by the directory's name (rows and golden
    records then read the same on every machine)."""
    from accel.models import config_from_pretrained, presets

    known = presets()
    names: list[str] = []
    directories: dict[str, str] = {}
    for spec in specs:
        path = Path(spec)
        if spec in known and not (path.is_dir() and ("/" in spec or spec.startswith("."))):
            name = spec
        elif path.is_dir() or "/" in spec or spec.startswith("."):
            config_from_pretrained(path)  # a directory of an unsupported model_type is refused here
            name = path.resolve().name
            if name in known:
                raise ConformanceError(f"checkpoint directory {spec} has the name of the preset {name}; rename it")
            if name in directories and directories[name] != str(path.resolve()):
                raise ConformanceError(f"two checkpoint directories are named {name} ({directories[name]}, {spec}); "
                                       "rename one")
            directories[name] = str(path.resolve())
        else:
            raise ConformanceError(f"{spec!r} is neither a model preset nor a checkpoint directory; "
                                   "see `accel models`")
        if name not in names:
            names.append(name)
    return names, directories


def checkpoint_prompts(checkpoints: dict[str, str], given: list | None, generation: bool
                       ) -> tuple[dict[str, list[list[int]]], list[str]]:
    """Each checkpoint directory's prompts as token ids through its own tokenizer, and notes for the user.
    The prompts given (accel.data.prompts.Prompt) must all fit the model's context, with the generated
    tokens after them when `generation`; by default a directory takes the built-in set, a prompt longer
    than that cut to fit (said in a note: they are probes, and the long one is meant to reach the end
    of the context). A directory without tokenizer files runs on seeded random ids, as a preset does
    (said in a note), unless prompts were given: then it is an error."""
    from accel.conformance.cases import GENERATED
    from accel.data import prompts as P
    from accel.data.tokenizer import has_tokenizer, load_tokenizer
    from accel.models import config_from_pretrained

    out: dict[str, list[list[int]]] = {}
    notes: list[str] = []
    for name, directory in checkpoints.items():
        if given is None and not has_tokenizer(directory):
            notes.append(f"{name} has no tokenizer files: its cases run on seeded random token ids")
            continue
        tokenizer = load_tokenizer(directory)  # missing (prompts given) or corrupt: a one-line error
        limit, model = P.context_length(directory), config_from_pretrained(directory)
        if generation and getattr(model, "use_dynamic_ntk", False):
            # Qwen v1 past its training length: the cached generation keeps the prefill's NTK base, which
            # full recomputation does not, as in the original; a generation case stays within seq_length.
            limit = min(limit or model.seq_length, model.seq_length)
        room = GENERATED if generation else 0
        if given is not None:
            out[name] = P.encode_prompts(directory, tokenizer, given, limit, room)
            continue
        ids = [i for i in (P.encode_prompt(tokenizer, p) for p in P.BUILTIN_PROMPTS) if i]
        room_left = None if limit is None else limit - room
        if room_left is not None and room_left < 1:
            notes.append(f"{name}: its context of {limit} tokens leaves no room for a prompt and {room} generated "
                         "tokens, so its cases run on seeded random token ids")
            continue
        cut = sum(room_left is not None and len(i) > room_left for i in ids)
        if cut:  # probes, not the user's text: the long one is meant to reach the context's end
            notes.append(f"{name}: {cut} of the {len(ids)} built-in prompts are cut to {room_left} tokens, its "
                         f"context of {limit}{f' less {room} generated' if room else ''}")
        out[name] = [i[:room_left] for i in ids]
    return out, notes


def stored_dtype(directory: str) -> str:
    """The dtype a checkpoint directory's floating-point weights are stored in (the most common one)."""
    from collections import Counter

    from accel.checkpoint.hf import HFCheckpoint

    ckpt = HFCheckpoint(directory)
    counts = Counter(ckpt.info(n).dtype.name for n in ckpt.keys())
    floats = [d for d, _ in counts.most_common() if d in ("float32", "float16", "bfloat16", "float64")]
    return floats[0] if floats else "float32"


def plan_jobs(cases: Iterable[str], models: Iterable[str], dtypes: Iterable[str] | None,
              checkpoints: dict[str, str] | None = None, full_training: bool | None = None) -> list[Job]:
    """The jobs of a run. `checkpoints`: the models among `models` that are checkpoint directories (name
    -> path); they take the inference, generation and training cases (LoRA at the dtype the weights are
    stored in when it is asked for, and full fine-tuning only with `full_training`: its optimiser state
    is 4x the weights), not the suite's own checkpoint-format and collective cases. Presets train both
    ways unless `full_training` is False. `dtypes` None: DEFAULT_DTYPES for presets and ops, and for a
    directory the dtype its weights are stored in (training: bfloat16 when that is float16, which
    trains only with loss scaling): at real size another dtype is a second copy of the weights."""
    cases, models = list(cases), list(models)
    known = case_kinds()
    unknown = sorted(set(cases) - set(known))
    if unknown:
        raise ConformanceError(f"unknown case kind(s) {', '.join(unknown)}; known: {', '.join(known)}")
    from accel.models import presets

    directories = checkpoints or {}
    missing = sorted(set(models) - set(presets()) - set(directories))
    if missing:
        raise ConformanceError(f"unknown model preset(s) {', '.join(missing)}; see `accel models`")
    stored = {name: stored_dtype(path) for name, path in directories.items()}

    def dtypes_of(model: str | None, training: bool = False) -> list[str]:
        if dtypes is not None:
            return list(dtypes)
        if model not in stored:
            return list(DEFAULT_DTYPES)
        return ["bfloat16" if training and stored[model] == "float16" else stored[model]]

    jobs: list[Job] = []
    for case in cases:
        if case == "ops":
            jobs += [("ops", f"{c.op}[{c.shape}]", d) for d in dtypes_of(None) for c in OP_CASES]
        elif case == "inference":
            for d in dict.fromkeys(d for m in models for d in dtypes_of(m)):  # dtype-major, as before
                jobs += [("inference", m, d) for m in models if d in dtypes_of(m)]
        elif case == "generation":
            # a preset's generation is judged at float32; a directory's at its dtype (see cases.py)
            jobs += [("generation", m, d) for m in models for d in dtypes_of(m) if d == "float32" or m in directories]
        else:
            module = next(m for m in case_modules() if case in m.CASE_KINDS)
            if case == "training":
                for name in models:
                    for kind, item, dtype in module.plan(case, [name], dtypes_of(name, training=True)):
                        lora = item.endswith("+lora")
                        if name in directories and lora and stored[name] in dtypes_of(name):
                            dtype = stored[name]
                        if lora or (full_training if name in directories else full_training is not False):
                            jobs.append((kind, item, dtype))
            else:
                jobs += module.plan(case, [m for m in models if m not in directories], dtypes_of(None))
    return jobs


def model_of(item: str) -> str:
    """The model a job's item names: "qwen2-tiny+lora", "qwen2-tiny:npz", "tp-qwen2-tiny" -> "qwen2-tiny"."""
    for prefix in ("tp-", "dp-step-"):
        item = item.removeprefix(prefix)
    return item.partition("+")[0].partition(":")[0]


# --- running a target in workers --------------------------------------------------------------------


@dataclass
class Options:
    case_timeout: float = 300.0
    golden: str | None = None
    record: str | None = None
    dump: str | None = None  # where the workers write msprobe dumps of the inference cases' taps
    policy: dict[str, str] = field(default_factory=dict)
    known_failures: Path = KNOWN_FAILURES
    nproc: int = 2
    jobs: int = 1  # targets run at once
    checkpoints: dict[str, str] = field(default_factory=dict)  # model name -> checkpoint directory
    prompts: dict[str, list[list[int]]] = field(default_factory=dict)  # model name -> its prompts' ids


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


def run_target(target: str, jobs: list[Job], options: Options, on_row: Callable[[Row], None]) -> list[Row]:
    """Runs `jobs` on `target` in a worker process; a crash or timeout becomes that case's row and a new
    worker takes the remaining cases."""
    rows: dict[int, Row] = {}
    pending = list(range(len(jobs)))
    while pending:
        with tempfile.TemporaryFile(mode="w+") as err:
            done = _run_worker(target, jobs, pending, options, err, rows, on_row)
            if not done:  # the worker died before starting a case: nothing more will run
                err.seek(0)
                tail = [line for line in err.read().splitlines() if line.strip()][-1:] or ["no output"]
                for i in pending:
                    if i not in rows:
                        rows[i] = Row(target, *jobs[i][:2], jobs[i][2], "crashed",
                                      detail=f"worker failed before the case: {tail[0][:200]}")
                        on_row(rows[i])
        pending = [i for i in pending if i not in rows]
    return [rows[i] for i in range(len(jobs))]


def _run_worker(target: str, jobs: list[Job], pending: list[int], options: Options, err: TextIO,
                rows: dict[int, Row], on_row: Callable[[Row], None]) -> bool:
    """One worker over the pending jobs. Returns False when it started no case at all."""
    spec = {"target": target, "jobs": [jobs[i] for i in pending], "golden": options.golden,
            "record": options.record, "dump": options.dump, "policy": options.policy, "nproc": options.nproc,
            "checkpoints": options.checkpoints, "prompts": options.prompts}
    proc = subprocess.Popen([sys.executable, "-m", "accel.conformance.worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(spec))
    proc.stdin.close()
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    current: int | None = None
    started_any = False
    since = time.monotonic()
    buffer = ""
    while True:
        remaining = options.case_timeout - (time.monotonic() - since)
        if remaining <= 0:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            index = pending[current] if current is not None else next(i for i in pending if i not in rows)
            rows[index] = Row(target, *jobs[index][:2], jobs[index][2], "timeout",
                              detail=f"timeout after {options.case_timeout:g} s")
            on_row(rows[index])
            return True
        if not selector.select(timeout=min(remaining, 1.0)):
            continue
        chunk = os.read(proc.stdout.fileno(), 65536).decode()
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split("\n")
        for line in lines:
            if not line.startswith(PREFIX):
                continue
            event = json.loads(line[len(PREFIX):])
            if event["event"] == "start":
                current, started_any, since = event["job"], True, time.monotonic()
            elif event["event"] == "row":
                index = pending[event["job"]]
                rows[index] = Row(**event["row"])
                on_row(rows[index])
                current, since = None, time.monotonic()
    code = proc.wait()
    if current is not None:  # died inside a case
        index = pending[current]
        if code < 0:
            why = f"crashed: {_signal_name(-code)}"
        else:
            err.seek(0)
            tail = [line for line in err.read().splitlines() if line.strip()][-1:] or [""]
            why = f"crashed: exit code {code} {tail[0][:200]}".rstrip()
        rows[index] = Row(target, *jobs[index][:2], jobs[index][2], "crashed", detail=why)
        on_row(rows[index])
        return True
    return started_any or all(i in rows for i in pending)


# --- known failures ---------------------------------------------------------------------------------


def known_failures_file(target: str, directory: Path = KNOWN_FAILURES) -> Path:
    """known_failures/<backend>_<device kind>.yaml, e.g. mindspore_cpu.yaml, torch-compile_cuda.yaml."""
    backend, _, device = target.partition(":")
    return directory / f"{backend}_{device.partition(':')[0]}.yaml"


def load_known_failures(target: str, directory: Path = KNOWN_FAILURES) -> list[dict[str, str]]:
    """Reviewed expected failures of a target: entries {case, model, dtype, reason}; `model` may be a
    glob ("attention[*]"), a missing `dtype` matches every dtype."""
    import yaml

    path = known_failures_file(target, directory)
    if not path.is_file():
        return []
    try:
        entries = yaml.safe_load(path.read_text()) or []
    except yaml.YAMLError as e:
        raise ConformanceError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(entries, list):
        raise ConformanceError(f"{path} must hold a list of entries")
    for e in entries:
        if not isinstance(e, dict) or not {"case", "model", "reason"} <= e.keys():
            raise ConformanceError(f"{path}: every entry needs case, model and reason: {e!r}")
    return entries


def apply_known_failures(rows: list[Row], directory: Path = KNOWN_FAILURES) -> list[Row]:
    by_target: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        entries = by_target.setdefault(row.target, load_known_failures(row.target, directory))
        match = next((e for e in entries if e["case"] == row.case
                      and (row.model == e["model"] or fnmatch(row.model, e["model"]))  # "op[shape]" as it is
                      and e.get("dtype", row.dtype) == row.dtype), None)
        if match is None:
            continue
        if row.status in ("fail", "crashed", "timeout"):
            row.detail = f"known: {match['reason']} ({row.status}: {row.detail})"
            row.status = "known-failure"
        elif row.status == "pass":
            row.detail = f"known failure now passes: remove it from {known_failures_file(row.target, directory)}"
    return rows


def exit_code(rows: Iterable[Row]) -> int:
    return 1 if any(r.status in ("fail", "crashed", "timeout") for r in rows) else 0


# --- progress and summary ---------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on a terminal; otherwise (CI logs) a line every 10% and at least one a
    minute."""

    def __init__(self, total: int, stream: TextIO = sys.stderr):
        self.total, self.done, self.stream = total, 0, stream
        self.tty = stream.isatty()
        self.start = time.monotonic()
        self.failed = 0
        self._last_decile = -1
        self._last_line = 0.0

    def step(self, row: Row) -> None:
        self.done += 1
        self.failed += row.status in ("fail", "crashed", "timeout")
        frac = self.done / max(self.total, 1)
        label = f"{row.target} {row.case} {row.model} {row.dtype}"
        elapsed = time.monotonic() - self.start
        if self.tty:
            bar = "#" * int(30 * frac)
            self.stream.write(f"\r[{bar:<30}] {self.done}/{self.total} {elapsed:4.0f}s {self.failed} failed "
                              f"{label[:48]:<48}")
            if self.done == self.total:
                self.stream.write("\n")
        elif (int(frac * 10) != self._last_decile or row.status in ("crashed", "timeout")
              or elapsed - self._last_line >= 60):
            self._last_decile, self._last_line = int(frac * 10), elapsed
            self.stream.write(f"conformance: {self.done}/{self.total} ({elapsed:.0f} s, {self.failed} failed) "
                              f"{label} {row.status}\n")
        self.stream.flush()


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


HEADER = ["target", "case", "model/op", "dtype", "cosine", "max_abs", "max_rel", "status", "judged by", "detail"]
_ORDER = {s: i for i, s in enumerate(("crashed", "timeout", "fail", "known-failure", "pass", "skipped"))}


def summary_rows(rows: Iterable[Row]) -> list[list[str]]:
    """Op rows folded to one line per target/op/dtype (the worst shape); other rows as they are."""
    groups: dict[tuple[str, str, str, str], list[Row]] = {}
    for r in rows:
        key_model = r.model.split("[")[0] if r.case == "ops" else r.model
        groups.setdefault((r.target, r.case, key_model, r.dtype), []).append(r)
    out = []
    for (target, case, model, dtype), rs in groups.items():
        worst = min(rs, key=lambda r: _ORDER.get(r.status, 0))
        measured = [r.metrics for r in rs if "accel_cosine" in r.metrics]
        cos = min((m["accel_cosine"] for m in measured), default=None)
        mae = max((m["max_abs"] for m in measured), default=None)
        mre = max((m["max_rel"] for m in measured), default=None)
        extra = worst.detail
        if "max_loss_rel" in worst.metrics:
            extra = f"loss rel {worst.metrics['max_loss_rel']:.1e}" + (f"; {worst.detail}" if worst.detail else "")
        if "token_agreement" in worst.metrics:
            extra = f"tokens {worst.metrics['token_agreement']:.0%}" + (f"; {worst.detail}" if worst.detail else "")
        if worst.first_divergence:
            fd = worst.first_divergence
            extra += f"; first divergence: {fd['tap']} ({fd['op']})"
        out.append([target, case, model, dtype, _fmt(cos, ".7f"), _fmt(mae, ".2e"), _fmt(mre, ".2e"),
                    worst.status, ", ".join(worst.standards) or "-", extra[:160]])
    return out


def run(targets: list[str], jobs: list[Job], options: Options, progress: bool = True) -> list[Row]:
    """Every target's workers, `options.jobs` targets at a time; targets on an accelerator take turns on
    it (two frameworks sharing one device would measure, and allocate, against each other)."""
    bar = Progress(len(jobs) * len(targets)) if progress else None
    shown, accelerator = threading.Lock(), threading.Lock()

    def on_row(row: Row) -> None:
        if bar is not None:
            with shown:
                bar.step(row)

    def one(target: str) -> list[Row]:
        if target.partition(":")[2].split(":")[0] in HOST_DEVICES:
            return run_target(target, jobs, options, on_row)
        with accelerator:
            return run_target(target, jobs, options, on_row)

    with ThreadPoolExecutor(max(1, options.jobs)) as pool:
        rows = [row for target_rows in pool.map(one, targets) for row in target_rows]
    return apply_known_failures(rows, options.known_failures)
