"""msprobe (mindstudio-probe) PyTorch dumps, read and written, and the verdicts of its compare.

A dump is DUMP/step<N>/{rank<N>, rank, proc<pid>}/ holding dump.json (every API and module call in the
order they returned, each tensor's dtype, shape and statistics), construct.json (each call's enclosing
module), stack.json and, for task "tensor", dump_tensor_data/*.pt (bare tensors). `read_dump` reads one,
`write_dump` writes module calls as one that msprobe's compare reads, `module_map` says which Hugging Face
module computes which accel tap (accel/msprobe_names.yaml), `first_error_row` reads compare's result.
Formats as mindstudio-probe 26.2.0 writes them; each comment names the msprobe file it is read from.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from accel.errors import AccelError
from accel.staging import discard_staged, stage_dir


class DumpError(AccelError):
    """An msprobe dump or compare result that is missing, ambiguous or corrupt."""


# --- reading -----------------------------------------------------------------------------------------

# Entry names: modules `Module.<path>.<Class>.forward.<call>` (pytorch/dump/module_dump/module_processor.py,
# register_module_hook), APIs `<Kind>.<api>.<call>.forward` (Functional.linear.3.forward).
_MODULE = re.compile(r"Module\.(?P<module>.+)\.(?P<cls>[^.]+)\.(?P<dir>forward|backward)\.(?P<call>\d+)")
_API = re.compile(r"(?P<api>.+)\.(?P<call>\d+)\.(?P<dir>forward|backward)")
# A call's keys in dump.json, and the word its tensors' data files use for each (Module...0.kwargs.x.pt).
_SECTIONS = {"input_args": "input", "input_kwargs": "kwargs", "output": "output", "parameters": "parameters"}


@dataclass(frozen=True)
class TensorRecord:
    """One tensor of a call, `name` as its data file is named, without `.pt`."""

    name: str
    dtype: str  # torch's name without "torch.": float32, bfloat16, int64
    shape: tuple[int, ...]
    max: float | None  # None where msprobe computes none: Mean and Norm of float64 and integer tensors
    min: float | None
    mean: float | None
    norm: float | None
    md5: str | None  # summary_mode md5 (a CRC-32 of the bytes), or xor (a checksum instead of statistics)
    requires_grad: bool
    path: Path | None  # the data file; None in statistics dumps

    def load(self, keep_dtype: bool = False) -> np.ndarray:
        """The data as float64, or in its own dtype (bfloat16 as ml_dtypes.bfloat16)."""
        if self.path is None:
            raise DumpError(f"{self.name} has statistics only: dump with task 'tensor' to have its data")
        import torch  # framework-import-ok: lazy, msprobe's .pt files are torch's

        try:
            t = torch.load(self.path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise DumpError(f"{self.path} is missing: the dump is incomplete; dump again") from None
        except Exception as e:  # pickle and zip errors of every kind: not a file msprobe wrote
            raise DumpError(f"{self.path} is not a tensor file torch.load(weights_only=True) reads "
                            f"({type(e).__name__}): it is corrupt or not msprobe's; dump again") from None
        if not isinstance(t, torch.Tensor):
            raise DumpError(f"{self.path} holds a {type(t).__name__}, not the bare tensor msprobe saves; dump again")
        t = t.detach().contiguous()
        # numpy has no bfloat16: the same bits as ml_dtypes'
        a = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
        return a if keep_dtype else a.astype(np.float64)


@dataclass(frozen=True)
class Entry:
    """One call in dump.json. Its arguments keep msprobe's structure (lists, dicts, None, {"type", "value"}
    for other values) with a TensorRecord for each tensor."""

    name: str
    kind: str  # module or api
    module: str | None  # model.layers.0.mlp.down_proj
    cls: str | None  # Linear
    api: str | None  # Functional.linear
    direction: str  # forward or backward
    call: int  # numbered from 0 per module (per API name)
    parent: str | None  # the enclosing module's entry, from construct.json
    input_args: list[Any]
    input_kwargs: dict[str, Any]
    output: list[Any]
    parameters: dict[str, TensorRecord]

    def inputs(self) -> list[TensorRecord]:
        """The tensors of the positional, then the keyword arguments, flattened: [0] is "input 0"."""
        return list(_tensors([self.input_args, self.input_kwargs]))

    def outputs(self) -> list[TensorRecord]:
        return list(_tensors(self.output))

    def as_call(self) -> ModuleCall:
        """This module call with its data, as `write_dump` takes it."""
        if self.module is None or self.cls is None:
            raise DumpError(f"{self.name} is an API call; write_dump writes module calls")
        return ModuleCall(self.module, self.cls, [t.load(True) for t in self.inputs()],
                          [t.load(True) for t in self.outputs()], {k: v.load(True) for k, v in self.parameters.items()})


def _tensors(value: Any) -> Iterator[TensorRecord]:
    if isinstance(value, TensorRecord):
        yield value
    elif isinstance(value, (list, tuple, dict)):
        for v in value.values() if isinstance(value, dict) else value:
            yield from _tensors(v)


@dataclass(frozen=True)
class Dump:
    path: Path  # the folder holding dump.json
    task: str  # tensor or statistics
    level: str  # L0 (modules), L1 (APIs) or mix
    entries: list[Entry]  # in dump order: as the calls returned, a module after its inner ones

    def module(self, path: str, call: int = 0) -> Entry:
        """The forward entry of module `path`'s call `call`."""
        for e in self.entries:
            if e.module == path and e.call == call and e.direction == "forward":
                return e
        raise DumpError(f"{self.path / 'dump.json'} has no forward call {call} of module {path}")


_FRAME = re.compile(r"File (?P<file>.+?), line (?P<line>\d+), in (?P<func>[^,]+),\s*(?P<code>.*)", re.S)


def call_site(dump: Dump, name: str) -> str | None:
    """Where the model's code made call `name`, from stack.json (core/dump/data_dump/data_collector.py
    writes {index: [[call names], ["File F, line N, in FUNC, \\n CODE", ...]]}, innermost frame first): its
    first frame outside torch.nn and msprobe, as "modeling_qwen2.py:290 in forward: self.mlp(...)"."""
    try:
        stacks = json.loads((dump.path / "stack.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    frames = next((v[1] for v in stacks.values() if isinstance(v, list) and len(v) == 2 and name in v[0]), None)
    for frame in frames or []:
        m = _FRAME.match(str(frame))
        if m and "/torch/nn/" not in m["file"] and "/msprobe/" not in m["file"]:
            return f"{Path(m['file']).name}:{m['line']} in {m['func']}: {m['code'].strip()}"
    return None


def read_dump(path: str | Path, step: int | None = None, rank: int | str | None = None) -> Dump:
    """The dump at `path`: its root, a step<N> folder or a rank/proc folder. Where the root holds several
    steps or a step several ranks, `step` and `rank` (a number, or a folder's name: "proc1234") pick."""
    folder = _locate(Path(path), step, rank)
    raw, parents = _json(folder / "dump.json"), {}
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict):
        raise DumpError(f"{folder / 'dump.json'} has no \"data\" object: it is not an msprobe dump.json")
    if (folder / "construct.json").is_file() and isinstance(construct := _json(folder / "construct.json"), dict):
        parents = construct
    # Data files lie beside dump.json, where compare looks (core/common/utils.py, set_dump_path);
    # the "dump_data_dir" field is where they were written, stale once a dump is moved.
    entries = [_entry(name, call, folder, parents) for name, call in raw["data"].items()]
    return Dump(folder, str(raw.get("task", "")), str(raw.get("level", "")), entries)


def _json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DumpError(f"{file} is not valid JSON ({e.msg}, line {e.lineno}): the dump was cut short; "
                        "dump again") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DumpError(f"cannot read {file}: {getattr(e, 'strerror', None) or e}") from None


def _locate(path: Path, step: int | None, rank: int | str | None) -> Path:
    if (path / "dump.json").is_file():
        return path
    if not path.is_dir():
        raise DumpError(f"{path} is not a directory; give read_dump an msprobe dump directory")
    if steps := _children(path, r"step\d+"):
        path = path / _pick(path, steps, None if step is None else f"step{step}", "step")
    # rank<N> where torch.distributed runs, proc<pid> where not (core/dump/service.py, _create_default_dirs)
    if not (ranks := _children(path, r"rank\d*|proc\d+")):
        raise DumpError(f"no dump.json, step<N> or rank<N>/proc<pid> folder in {path}: not an msprobe dump")
    chosen = path / _pick(path, ranks, f"rank{rank}" if isinstance(rank, int) else rank, "rank")
    if not (chosen / "dump.json").is_file():
        raise DumpError(f"{chosen} has no dump.json: the dump did not finish (debugger.stop() not reached?)")
    return chosen


def _children(path: Path, pattern: str) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and re.fullmatch(pattern, p.name))


def _pick(path: Path, names: list[str], wanted: str | None, what: str) -> str:
    if (wanted is None and len(names) == 1) or wanted in names:
        return wanted or names[0]
    asked = f"has no {wanted}" if wanted is not None else f"holds {len(names)} {what}s"
    raise DumpError(f"{path} {asked}: pass {what}= one of {', '.join(names)}")


def _entry(name: str, raw: Any, folder: Path, parents: Mapping[str, Any]) -> Entry:
    if not isinstance(raw, dict):
        raise DumpError(f"{folder / 'dump.json'}: entry {name} is not an object; not an msprobe dump.json")
    parts = {key: _values(raw.get(key, {} if key in ("input_kwargs", "parameters") else []), f"{name}.{word}",
                          folder) for key, word in _SECTIONS.items()}
    if m := _MODULE.fullmatch(name):
        return Entry(name, "module", m["module"], m["cls"], None, m["dir"], int(m["call"]), parents.get(name), **parts)
    a = _API.fullmatch(name)
    return Entry(name, "api", None, None, a["api"] if a else name, a["dir"] if a else "", int(a["call"]) if a else 0,
                 parents.get(name), **parts)


def _values(value: Any, name: str, folder: Path) -> Any:
    if isinstance(value, list):
        return [_values(v, f"{name}.{i}", folder) for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    if not ("dtype" in value and "shape" in value):  # not a tensor: a structure, or {"type", "value"}
        return {k: _values(v, f"{name}.{k}", folder) for k, v in value.items()}
    path = folder / "dump_tensor_data" / value["data_name"] if value.get("data_name") else None
    if path is not None and not path.is_file():
        raise DumpError(f"{folder / 'dump.json'} names {path.name}, missing from {path.parent}: the dump is "
                        "incomplete; copy dump_tensor_data whole or dump again")
    return TensorRecord(name, str(value["dtype"]).removeprefix("torch."), tuple(value["shape"]), value.get("Max"),
                        value.get("Min"), value.get("Mean"), value.get("Norm"), value.get("md5"),
                        bool(value.get("requires_grad")), path)


# --- writing -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleCall:
    """A module's forward call to write: arrays (NumPy, bfloat16 through ml_dtypes) or torch tensors."""

    module: str  # model.layers.0.mlp.down_proj
    cls: str  # Linear
    inputs: Sequence[Any]
    outputs: Sequence[Any]
    parameters: Mapping[str, Any] = field(default_factory=dict)


def refuse_taken(path: Path, what: str) -> None:
    """A dump is written only into a new or empty directory whose parent exists."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise DumpError(f"{what} {path} exists and is not empty; give a new or empty directory")
    if not path.parent.is_dir():
        raise DumpError(f"{what}: directory {path.parent} does not exist")


def write_dump(path: str | Path, calls: Sequence[ModuleCall], task: str = "tensor") -> Path:
    """Writes `calls`, in order, as msprobe's dump of one step on one rank, PATH/step0/rank0/, which it
    returns. PATH must be new or empty; it appears complete or not at all."""
    path = Path(path)
    if task not in ("tensor", "statistics"):
        raise DumpError(f"task {task!r}: write_dump writes task 'tensor' or 'statistics'")
    refuse_taken(path, "write_dump")
    with _sigterm_raises():
        try:
            staged = stage_dir(path)
            _write(staged / "step0" / "rank0", path / "step0" / "rank0", calls, task)
            os.replace(staged, path)  # over an empty directory too
        except OSError as e:
            raise DumpError(f"cannot write {path}: {e.strerror or e}") from None
        finally:
            discard_staged(path)
    return path / "step0" / "rank0"


def _write(folder: Path, final: Path, calls: Sequence[ModuleCall], task: str) -> None:
    data_dir = folder / "dump_tensor_data" if task == "tensor" else None
    (data_dir or folder).mkdir(parents=True)
    counts: dict[tuple[str, str], int] = {}
    names = []
    for c in calls:  # each module's calls numbered from 0 (module_processor.py, set_and_get_calls_number)
        counts[c.module, c.cls] = counts.get((c.module, c.cls), -1) + 1
        names.append(f"Module.{c.module}.{c.cls}.forward.{counts[c.module, c.cls]}")
    data = {}
    for name, c in zip(names, calls):
        def record(x: Any, suffix: str, requires_grad: bool = False, name: str = name) -> dict[str, Any]:
            return _record(x, f"{name}.{suffix}", data_dir, requires_grad)

        # A real model's parameters are nn.Parameters, requires_grad even under no_grad; compare checks
        # it against the other side (RequiresGradErrChecker).
        data[name] = {"input_args": [record(x, f"input.{i}") for i, x in enumerate(c.inputs)], "input_kwargs": {},
                      "output": [record(x, f"output.{i}") for i, x in enumerate(c.outputs)],
                      "parameters": {k: record(x, f"parameters.{k}", True) for k, x in c.parameters.items()}}
    # A module returns after its inner ones: a call's parent is the first later one whose path encloses it.
    construct = {n: next((names[j] for j in range(i + 1, len(calls))
                          if calls[i].module.startswith(calls[j].module + ".")), None) for i, n in enumerate(names)}
    head = {"task": task, "level": "L0", "framework": "pytorch",
            "dump_data_dir": str(final / "dump_tensor_data") if data_dir else None}
    (folder / "dump.json").write_text(json.dumps(head | {"data": data}, indent=1), encoding="utf-8")
    (folder / "construct.json").write_text(json.dumps(construct, indent=1), encoding="utf-8")
    (folder / "stack.json").write_text("{}", encoding="utf-8")  # no call stacks: compare shows none


def _record(x: Any, name: str, data_dir: Path | None, requires_grad: bool) -> dict[str, Any]:
    import torch  # framework-import-ok: lazy, msprobe's .pt files are torch's

    if not isinstance(x, torch.Tensor):
        a = np.asarray(x, order="C")
        x = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if a.dtype == ml_dtypes.bfloat16 else \
            torch.from_numpy(a)
    x = x.detach().cpu().contiguous()
    # As msprobe computes them (core/dump/data_dump/data_processor/pytorch_processor.py, get_stat_info):
    # torch's max, min, mean and norm in the tensor's own dtype, mean and norm only for floating dtypes
    # but float64; any/all for bool; the value itself for 0-d.
    stats: list[Any] = [None] * 4  # Max, Min, Mean, Norm
    if x.dtype == torch.bool and x.numel():
        stats[:2] = bool(torch.any(x)), bool(torch.all(x))
    elif x.dim() == 0:
        stats = [x.item()] * 4
    elif x.numel():
        stats[:2] = torch.max(x).item(), torch.min(x).item()
        if x.is_floating_point() and x.dtype != torch.float64:
            stats[2:] = torch.mean(x).item(), torch.norm(x).item()
    out = {"type": "torch.Tensor", "dtype": str(x.dtype), "shape": list(x.shape),
           **dict(zip(("Max", "Min", "Mean", "Norm"), stats)), "requires_grad": requires_grad}
    if data_dir is not None:
        torch.save(x.clone(), data_dir / f"{name}.pt")  # a bare tensor, as TensorHandler.save_tensor saves
        out["data_name"] = f"{name}.pt"
    return out


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raised as an exception (as accel's CLI does already), so that the write's `finally` removes
    what it staged; the process then ends by the signal, as it would have."""
    from accel.cli import Terminated

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# --- names -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MappedModule:
    """A module of the original model and the accel taps its output 0 and input 0 equal (None: none),
    each in the tap's layout after `to_tap_layout(array, layout, tap_shape)`."""

    module: str
    classes: tuple[str, ...]  # its class; several where the family's variants differ
    tap_out: str | None
    tap_in: str | None
    out_layout: str | None = None
    in_layout: str | None = None


def module_map(model_type: str, num_layers: int) -> list[MappedModule]:
    """accel/msprobe_names.yaml's modules of `model_type` for a model of `num_layers`, in dump order."""
    import yaml

    table = yaml.safe_load(Path(__file__).with_name("msprobe_names.yaml").read_text(encoding="utf-8"))
    if model_type not in table:
        raise DumpError(f"no msprobe names for model_type {model_type!r}; msprobe_names.yaml has {', '.join(table)}")
    family = table[model_type]
    rows: list[tuple[dict[str, Any], dict[str, str]]] = [(r, {}) for r in family["before"]]
    for i in range(num_layers):
        rows += [(r, {"i": str(i), "prev": f"layers.{i - 1}.out" if i else "embed"}) for r in family["layer"]]
    rows += [(r, {"last": f"layers.{num_layers - 1}.out"}) for r in family["after"]]

    def fill(text: str | None, values: dict[str, str]) -> str | None:
        return None if text is None else re.sub(r"\{(\w+)\}", lambda m: values[m[1]], text)

    return [MappedModule(str(fill(r["module"], v)), tuple([r["class"]] if isinstance(r["class"], str) else r["class"]),
                         fill(r.get("out"), v), fill(r.get("in"), v), r.get("out_layout"), r.get("in_layout"))
            for r, v in rows]


def to_tap_layout(array: np.ndarray, layout: str | None, tap_shape: Sequence[int]) -> np.ndarray:
    """`array` as dumped, in the tap's layout: `layout` as "s b (h d) -> b s h d", the sizes of the
    grouped axes read from `tap_shape`."""
    if not layout:
        return array
    src, dst = (side.replace("(", " ").replace(")", " ").split() for side in layout.split("->"))
    sizes = dict(zip(dst, tap_shape))
    try:
        if len(dst) != len(tap_shape):
            raise ValueError
        return array.reshape([sizes[a] for a in src]).transpose([src.index(a) for a in dst])
    except (KeyError, ValueError):
        raise DumpError(f"a dump tensor shaped {array.shape} is not {layout!r} of a tap shaped "
                        f"{tuple(tap_shape)}") from None


def from_tap_layout(array: np.ndarray, layout: str | None) -> np.ndarray:
    """A tap's `array` in the dump's layout: the inverse of `to_tap_layout`."""
    if not layout:
        return array
    src, dst = (side.replace("(", " ").replace(")", " ").split() for side in layout.split("->"))
    sizes = dict(zip(dst, array.shape))
    groups = re.findall(r"\(([^)]*)\)|(\S+)", layout.split("->")[0])
    shape = [int(np.prod([sizes[a] for a in g.split()])) if g else sizes[single] for g, single in groups]
    return array.transpose([dst.index(a) for a in src]).reshape(shape)


def module_for_tap(modules: Sequence[MappedModule], order: Sequence[str], tap: str) -> MappedModule | None:
    """The module a divergence first seen at `tap` (of taps in forward `order`) is in, as msprobe compare
    would flag it: the first, in dump order, whose output is `tap` or a later one while its input is
    an earlier tap (or untapped)."""
    at = {name: i for i, name in enumerate(order)}
    k = at.get(tap)
    if k is None:
        return None
    return next((m for m in modules if m.tap_out in at and at[m.tap_out] >= k
                 and (m.tap_in is None or at.get(m.tap_in, k) < k)), None)


# --- msprobe compare's verdicts ----------------------------------------------------------------------

# `msprobe compare` (core/compare/acc_compare.py, Comparator.compare_core) writes compare_result_<time>.csv
# (.xlsx with --xlsx), a row per tensor in the target dump's order. Its verdict is column "Result" (pass,
# warning or error) with the reasons in "Err_message" (a JSON list); 26.2.0 writes no "Accuracy Reached
# or Not". A call's rows are judged together (core/compare/indicator_analysis/calculator.py,
# calculate_excel_result_df, running core/compare/indicator_analysis/algorithm.py's checkers), its inputs
# being every row not named ".output." (parameters too):
# - task tensor (TENSOR_CHECKERS): error where the target's max or min is nan/inf and the golden's not
#   (InfNanErrChecker); error on output 0 where every input's "One Thousandth Err Ratio" (the share of
#   elements within relative error 0.001, core/compare/utils.py, calc_relative_err_ratio) is > 0.9 and
#   an output's < 0.1 (OneThousandthErrChecker: its message says 0.6, its code 0.1); error where
#   requires_grad, a non-tensor argument, the dtype or the shape differ; warning on output 0 where the
#   inputs' least Cosine is > 0.9 and above the outputs' least by > 0.1 (CosineWarnChecker).
# - task statistics (STATISTICS_CHECKERS): nan/inf, requires_grad, argument, dtype and shape as above;
#   error where every input's |NormRelativeErr| is < 10% and an output's > 50% (RelativeErrChecker);
#   warning where an output's is over 10x the inputs' (RelativeWarnChecker).
# - summary_mode md5: error where the CRC-32 differs (CRC32ErrChecker).
# A call whose inputs already differ is thus rarely an error: the first error row is where a difference
# starts. Calls of `to`, `empty`, `__setitem__` and the like are never judged (ApiIndicatorCalculator).


def first_error_row(compare_output: str | Path) -> dict[str, Any] | None:
    """The first row msprobe compare marked "error", in dump order, as {column: value} (Err_message a
    list); None if none is. `compare_output`: the result file, or the folder holding only one."""
    import pandas as pd

    path = Path(compare_output)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if re.fullmatch(r"compare_result.*\.(csv|xlsx)", p.name))
        if len(found) != 1:
            raise DumpError(f"{path} holds {len(found)} compare_result files; give one"
                            + (f" of {', '.join(p.name for p in found)}" if found else ""))
        path = found[0]
    try:
        table = pd.read_excel(path) if path.suffix == ".xlsx" else pd.read_csv(path)
    except Exception as e:  # pandas' and openpyxl's errors share no base
        raise DumpError(f"cannot read {path} as msprobe compare's result ({type(e).__name__})") from None
    if not {"NPU Name", "Result", "Err_message"} <= set(table.columns):
        raise DumpError(f"{path} has no NPU Name, Result and Err_message columns: not msprobe compare's result")
    failing = table[table["Result"].astype(str).str.strip() == "error"]
    if failing.empty:
        return None
    row = {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in failing.iloc[0].to_dict().items()}
    try:
        row["Err_message"] = json.loads(str(row["Err_message"]))
    except ValueError:
        pass
    return row
