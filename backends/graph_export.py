"""Graph capture through `torch.export`, shared by the backends that lower the torch forward to another
compiler and run it there (ONNX Runtime, TVM): `GraphBackend` is their base, `Lowering` the one thing
each of them supplies.

GraphBackend.compile(fn) returns a callable that, per call, flattens the arguments: tensors become graph
inputs (dims 0 and 1, batch and sequence in this layout, exported dynamic: Dim.AUTO); a mapping of
tensors (the weights) becomes the graph's parameters; a KVCache contributes its layers as inputs and
gets the new layers back as outputs; a Taps (argument, or a cell of fn's closure) is filled from
extra outputs. The graph is exported once per argument layout and per range of shapes its guards
accept (torch.export records them: a Python branch on a length, as Qwen v1's logn scaling, narrows
the range), lowered by the backend (ONNX, TVM), and kept on disk under a key of everything it
depends on.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from accel import cache_dir
from accel.backend import BackendBase, impls
from accel.backends.torch_eager import _COMPOSITES, _DTYPES, TorchBackend, attention_sdpa, torch
from accel.compare import one_line
from accel.errors import AccelError
from accel.models._layers import KVCache, Model, Taps
from accel.routing import Impl


def traceable_asarray(backend: Any, a: Any, dtype: str | None = None) -> torch.Tensor:
    """torch_eager's asarray, except inside a dynamo trace, where the model turns NumPy constants
    (positions, rotary tables, ALiBi slopes) into tensors: there torch.as_tensor is what dynamo
    follows (and keeps symbolic positions symbolic)."""
    if torch.compiler.is_compiling():
        return torch.as_tensor(a, dtype=_DTYPES[dtype] if dtype else None)
    return TorchBackend.asarray(backend, a, dtype)


EXPORTS: Counter[str] = Counter()  # graphs exported in this process, per lowering: the cache's evidence
_CAPTURING = [0]  # > 0 while a graph is being traced: GraphBackend's ops run their torch body
_ALLOWED_GUARD_NODES = (ast.Expression, ast.Compare, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Subscript, ast.Call,
                        ast.Attribute, ast.Name, ast.Constant, ast.Load, ast.operator, ast.cmpop, ast.boolop,
                        ast.unaryop)


class ExportFailed(AccelError):
    """A graph that the exporter or compiler rejects; the message is its own reason, one line."""


def _tensor_digest(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def _source_digest(*modules: str) -> str:
    import importlib

    h = hashlib.sha256()
    for name in modules:
        h.update(Path(importlib.import_module(name).__file__ or "").read_bytes())
    return h.hexdigest()[:16]


def _describe(v: Any, depth: int = 0) -> str | None:
    """A stable description of a closure value for the disk key; None when it has none."""
    if v is None or isinstance(v, bool | int | float | str):
        return repr(v)
    if isinstance(v, tuple | list):
        parts = [_describe(x, depth) for x in v]
        return None if None in parts else f"{type(v).__name__}({','.join(parts)})"  # type: ignore[arg-type]
    if isinstance(v, Model):
        return f"{type(v).__module__}.{type(v).__qualname__}{v!r}/{_source_digest(type(v).__module__)}"
    if isinstance(v, GraphBackend):  # every exporting backend traces the same torch ops
        return f"torch ops {sorted(v.ops.routes.items())}"
    if isinstance(v, BackendBase):
        return f"backend {v.target} {sorted(v.ops.routes.items())}"
    if hasattr(v, "routes") and hasattr(v, "backend"):  # an Ops namespace
        return f"ops {v.backend.target} {sorted(v.routes.items())}"
    if isinstance(v, Taps):
        return "taps"
    if isinstance(v, torch.Tensor) or (isinstance(v, Mapping) and v and all(isinstance(t, torch.Tensor)
                                                                             for t in v.values())):
        h = hashlib.sha256()
        for k, t in (v.items() if isinstance(v, Mapping) else [("", v)]):
            h.update(str(k).encode())
            _tensor_digest(h, t)
        return h.hexdigest()[:16]
    if callable(v) and hasattr(v, "__code__") and depth < 2:
        return _fn_description(v, depth + 1)
    return None


def _fn_description(fn: Any, depth: int = 0) -> str | None:
    code = fn.__code__
    parts = [fn.__module__, fn.__qualname__, hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()]
    for cell in fn.__closure__ or ():
        d = _describe(cell.cell_contents, depth)
        if d is None:
            return None
        parts.append(d)
    return "|".join(parts)


def _closure_taps(fn: Any) -> list[Any]:
    return [c for c in (fn.__closure__ or ()) if isinstance(c.cell_contents, Taps)]


class _Call:
    """One call's arguments flattened: graph inputs, weights, caches and taps, and how to rebuild them."""

    def __init__(self, fn: Any, args: tuple, kwargs: dict):
        self.inputs: list[torch.Tensor] = []
        self.weights: list[Mapping[str, torch.Tensor]] = []
        self.caches: list[KVCache] = []
        self.taps: list[Any] = []
        keys: list[str] = []
        self.layout = ([self._walk(a, keys) for a in args], {k: self._walk(v, keys) for k, v in kwargs.items()})
        self.cells = _closure_taps(fn)
        self.taps += [c.cell_contents for c in self.cells]
        self.key = f"{'/'.join(keys)}|kw={sorted(kwargs)}|cell_taps={len(self.cells)}"

    def _walk(self, x: Any, keys: list[str]) -> Any:
        if isinstance(x, torch.Tensor):
            self.inputs.append(x)
            keys.append(f"t{x.dtype}{x.dim()}")
            return ("t", len(self.inputs) - 1)
        if isinstance(x, KVCache):
            present = tuple(kv is not None for kv in x.layers)
            static = tuple(sorted((k, v) for k, v in vars(x).items() if k not in ("layers", "length")))
            first = len(self.inputs)
            self.inputs += [t for kv in x.layers if kv is not None for t in kv]
            self.caches.append(x)
            keys.append(f"c{type(x).__qualname__}{present}{static}{[t.dtype for t in self.inputs[first:]][:1]}")
            return ("c", len(self.caches) - 1, type(x), present, static, first)
        if isinstance(x, Taps):
            self.taps.append(x)
            keys.append("taps")
            return ("taps", len(self.taps) - 1)
        if isinstance(x, Mapping) and x and all(isinstance(v, torch.Tensor) for v in x.values()):
            self.weights.append(x)
            keys.append("w" + ",".join(f"{k}:{v.dtype}{tuple(v.shape)}" for k, v in x.items()))
            return ("w", len(self.weights) - 1)
        if isinstance(x, list | tuple):
            keys.append(f"{type(x).__name__}{len(x)}")
            return ("l", type(x), [self._walk(v, keys) for v in x])
        if x is None or isinstance(x, bool | int | float | str):
            keys.append(repr(x))
            return ("s", x)
        raise AccelError(f"cannot export a call with an argument of type {type(x).__name__}")

    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(t.shape) for t in self.inputs]


def _rebuild(node: Any, inputs: tuple, weights: list[dict], taps: list[Any]) -> Any:
    kind = node[0]
    if kind == "t":
        return inputs[node[1]]
    if kind == "w":
        return weights[node[1]]
    if kind == "taps":
        return taps[node[1]]
    if kind == "c":
        _, _, cls, present, static, j = node
        cache = object.__new__(cls)
        vars(cache).update(static)
        cache.layers = []
        for p in present:
            cache.layers.append((inputs[j], inputs[j + 1]) if p else None)
            j += 2 if p else 0
        first = next((kv for kv in cache.layers if kv is not None), None)
        cache.length = first[0].shape[1] if first is not None else 0
        return cache
    if kind == "l":
        return node[1](_rebuild(n, inputs, weights, taps) for n in node[2])
    return node[1]


class _Module(torch.nn.Module):
    """fn over flat tensor inputs, the weights as (frozen) parameters; outputs flat: fn's result, the
    caches' layers, the taps' values. A dry run (eager) records that layout for the caller."""

    def __init__(self, fn: Any, call: _Call):
        super().__init__()
        self.fn, self.layout, self.n_taps, self.cells = fn, call.layout, len(call.taps), call.cells
        self.n_arg_taps = len(call.taps) - len(call.cells)
        attr_of: dict[int, str] = {}
        self.names: list[list[tuple[str, str]]] = []
        for w in call.weights:
            pairs = []
            for name, t in w.items():
                if id(t) not in attr_of:  # a tensor under two names (tied weights) is one parameter
                    attr_of[id(t)] = f"w{len(attr_of)}"
                    self.register_parameter(attr_of[id(t)], torch.nn.Parameter(t, requires_grad=False))
                pairs.append((name, attr_of[id(t)]))
            self.names.append(pairs)
        self.record: dict[str, Any] = {}

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weights = [{n: getattr(self, a) for n, a in pairs} for pairs in self.names]
        dry = not self.record
        taps = [Taps() if dry else {} for _ in range(self.n_taps)]
        args, kwargs = self.layout
        args = [_rebuild(n, inputs, weights, taps) for n in args]
        kwargs = {k: _rebuild(n, inputs, weights, taps) for k, n in kwargs.items()}
        caches = [a for a in (*args, *kwargs.values()) if isinstance(a, KVCache)]
        saved = [c.cell_contents for c in self.cells]
        for cell, t in zip(self.cells, taps[self.n_arg_taps:]):
            cell.cell_contents = t
        try:
            out = self.fn(*args, **kwargs)
        finally:
            for cell, t in zip(self.cells, saved):
                cell.cell_contents = t
        outs = [out] if isinstance(out, torch.Tensor) else list(out)
        if any(kv is None for c in caches for kv in c.layers):
            raise AccelError("a forward left a KV cache layer empty; cannot export it")
        if dry:
            self.record = {
                "out": "tensor" if isinstance(out, torch.Tensor) else [type(out).__name__, len(outs)],
                "caches": [{k: v for k, v in vars(c).items() if k not in ("layers", "length")} for c in caches],
                "taps": [[list(t.keys()), dict(t.ops)] for t in taps],
            }
        return (*outs, *[t for c in caches for kv in c.layers for t in kv], *[v for t in taps for v in t.values()])


def _guards(ep: Any) -> dict[str, Any]:
    """What input shapes an exported program accepts: per input and dim an int or a symbol, the
    symbols' ranges, and torch.export's relational guards (Python expressions over the sizes)."""
    from torch.export.graph_signature import InputKind

    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    dims = [[d if isinstance(d, int) else str(d) for d in nodes[s.arg.name].meta["val"].shape]
            for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    ranges = {str(s): [int(r.lower), None if str(r.upper) in ("int_oo", "oo") else int(r.upper)]
              for s, r in ep.range_constraints.items()}
    return {"dims": dims, "ranges": ranges, "code": list(getattr(ep, "_guards_code", []) or [])}


class _Sizes(tuple):
    def size(self) -> tuple[int, ...]:  # guard code reads L['flat_args'][i].size()[d]
        return tuple(self)


def accepts(guards: dict[str, Any], shapes: list[tuple[int, ...]]) -> bool:
    if len(shapes) != len(guards["dims"]):
        return False
    env: dict[str, int] = {}
    for dims, shape in zip(guards["dims"], shapes):
        if len(dims) != len(shape):
            return False
        for d, n in zip(dims, shape):
            if isinstance(d, int):
                if d != n:
                    return False
            elif d.isidentifier():
                if env.setdefault(d, n) != n:
                    return False
    for sym, (lo, hi) in guards["ranges"].items():
        if sym in env and not (lo <= env[sym] and (hi is None or env[sym] <= hi)):
            return False
    scope = {"L": {"flat_args": [_Sizes(s) for s in shapes]}}
    for code in guards["code"]:
        tree = ast.parse(code, mode="eval")
        # guard code is torch's, but it round-trips through the cache directory: evaluate sizes only
        if not all(isinstance(n, _ALLOWED_GUARD_NODES) for n in ast.walk(tree)) or \
                any(isinstance(n, ast.Attribute) and n.attr != "size" for n in ast.walk(tree)):
            return False
        if not eval(compile(tree, "<guard>", "eval"), {"__builtins__": {}}, scope):
            return False
    return True


class Lowering(ABC):
    """What an exporting backend adds: turning an ExportedProgram into a file, and running it."""

    name: ClassVar[str] = ""
    what: ClassVar[str] = ""  # the compiler, as error messages name it
    suffix: ClassVar[str] = ""
    weights_in_graph: ClassVar[bool] = True  # True: weights are constants of the artifact (in its key)

    @abstractmethod
    def key(self) -> str:
        ...

    @abstractmethod
    def build(self, ep: Any, path: Path) -> dict[str, Any]:
        """Write the artifact for `ep` to `path`; returns what `load` needs besides the file."""
        ...

    @abstractmethod
    def load(self, path: Path, meta: dict[str, Any]) -> Callable[[list[torch.Tensor], list[torch.Tensor]],
                                                                 list[torch.Tensor]]:
        """runner(inputs, parameters) -> outputs, all torch CPU tensors."""
        ...


_EP_MEMO: dict[str, list[tuple[dict, Any, dict, tuple]]] = {}  # exported programs made in this process


class GraphCompiler:
    """compile(fn) of an exporting backend: graphs per argument layout and shape range, on disk."""

    def __init__(self, fn: Callable[..., Any], lowering: Lowering, dynamic: bool = True):
        self.fn, self.lowering, self.dynamic = fn, lowering, dynamic
        # layout key -> [(guards, runner, output record, parameter names)]
        self.graphs: dict[str, list[tuple[dict, Any, dict, list[str]]]] = {}
        self._digests: dict[tuple[int, ...], tuple[str, Any]] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = _Call(self.fn, args, kwargs)
        key = call.key
        if self.lowering.weights_in_graph:  # the graph holds these very weights as constants
            key += f"|{self._weights_digest(call)}"
        graphs = self.graphs.setdefault(key, [])
        shapes = call.shapes()
        hit = next((g for g in graphs if accepts(g[0], shapes)), None)
        if hit is None:
            hit = self._load_or_build(call)
            graphs.append(hit)
        _, run, record, names = hit
        return self._scatter(call, record, run(call.inputs, _parameters(call, names)))

    def _weights_digest(self, call: _Call) -> str:
        ids = tuple(id(t) for w in call.weights for t in w.values())
        if ids not in self._digests:
            h = hashlib.sha256()
            for w in call.weights:
                for k, t in w.items():
                    h.update(k.encode())
                    _tensor_digest(h, t)
            self._digests[ids] = (h.hexdigest()[:24], list(call.weights))  # keeps the tensors (and ids) alive
        return self._digests[ids][0]

    def _graph_key(self, call: _Call) -> str | None:
        """What the exported program depends on (the lowering aside); None when fn's closure holds
        something without a stable description."""
        desc = _fn_description(self.fn)
        if desc is None:
            return None
        src = _source_digest("accel.models._layers", "accel.backends.torch_eager", __name__)
        return "\n".join([desc, call.key, src, torch.__version__, f"dynamic={self.dynamic}"])

    def _key(self, call: _Call) -> str | None:
        graph_key = self._graph_key(call)
        if graph_key is None:
            return None
        parts = [graph_key, self.lowering.key(), _source_digest(type(self.lowering).__module__)]
        if self.lowering.weights_in_graph:
            parts.append(self._weights_digest(call))
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]

    def _load_or_build(self, call: _Call) -> tuple[dict, Any, dict, Any]:
        key = self._key(call)
        shapes = call.shapes()
        folder = cache_dir() / self.lowering.name / key if key else None
        if folder is not None and (folder / "index.json").exists():
            try:
                index = json.loads((folder / "index.json").read_text())
            except (OSError, ValueError):
                index = []
            for entry in index:
                if accepts(entry["guards"], shapes) and (folder / entry["file"]).exists():
                    run = self.lowering.load(folder / entry["file"], entry["meta"])
                    return entry["guards"], run, entry["record"], entry["meta"]["parameters"]
        guards, ep, record, _ = self._export(call)
        with tempfile.TemporaryDirectory() as scratch:
            # an artifact without a key (its function's closure has no stable description) lives
            # only as long as it takes to load it
            target = folder if folder is not None else Path(scratch)
            target.mkdir(parents=True, exist_ok=True)
            file = target / f"{uuid.uuid4().hex[:12]}{self.lowering.suffix}"
            try:
                meta = self.lowering.build(ep, file)
            except AccelError:
                raise
            except Exception as e:
                raise ExportFailed(f"{self.lowering.what} failed: {one_line(e)}") from e
            EXPORTS[self.lowering.name] += 1
            # parameters the artifact takes as inputs, in its order (none where they are constants)
            meta["parameters"] = [] if self.lowering.weights_in_graph else list(ep.graph_signature.parameters)
            try:
                run = self.lowering.load(file, meta)
            except Exception as e:
                file.unlink(missing_ok=True)
                raise ExportFailed(f"{self.lowering.what}: the compiled graph does not load: {one_line(e)}") from e
            if folder is not None and _jsonable(record):  # indexed once it is known to load
                _append_index(folder, {"file": file.name, "guards": guards, "record": record, "meta": meta})
        return guards, run, record, meta["parameters"]

    def _export(self, call: _Call) -> tuple[dict, Any, dict, Any]:
        # exported programs are shared in this process between lowerings (ONNX and TVM export the same
        # graph); one whose weights are constants of the artifact must hold these very tensors
        memo_key = self._graph_key(call)
        tensors = tuple(t for w in call.weights for t in w.values())
        for guards, ep, record, held in _EP_MEMO.get(memo_key or "", []):
            same = len(held) == len(tensors) and all(a is b for a, b in zip(held, tensors))
            if accepts(guards, call.shapes()) and (same or not self.lowering.weights_in_graph):
                return guards, ep, record, held
        module = _Module(self.fn, call)
        strict = not call.taps  # taps graphs export non-strict and static (conformance only)
        if strict and self.dynamic:
            dims = (tuple({d: torch.export.Dim.AUTO for d in range(min(t.dim(), 2))} for t in call.inputs),)
        else:
            dims = None  # forward(*inputs): one entry for the var-positional tuple
        _CAPTURING[0] += 1
        try:
            with torch.no_grad():
                module(*call.inputs)  # the dry run records the output layout
                ep = torch.export.export(module, tuple(call.inputs), dynamic_shapes=dims, strict=strict)
        except AccelError:
            raise
        except Exception as e:
            raise ExportFailed(f"torch.export cannot capture the graph: {one_line(e)}") from e
        finally:
            _CAPTURING[0] -= 1
        entry = (_guards(ep), ep, module.record, tensors)
        if memo_key is not None:
            memo = _EP_MEMO.setdefault(memo_key, [])
            memo.append(entry)
            while len(_EP_MEMO) > 16:
                _EP_MEMO.pop(next(iter(_EP_MEMO)))
        return entry

    def _scatter(self, call: _Call, record: dict[str, Any], outs: list[torch.Tensor]) -> Any:
        i = 0
        if record["out"] == "tensor":
            out, i = outs[0], 1
        else:
            kind, n = record["out"]
            out, i = (list if kind == "list" else tuple)(outs[:n]), n
        for cache, static in zip(call.caches, record["caches"]):
            cache.layers = [(outs[i + 2 * j], outs[i + 2 * j + 1]) for j in range(len(cache.layers))]
            i += 2 * len(cache.layers)
            vars(cache).update(static)
            cache.length = cache.layers[0][0].shape[1] if cache.layers else 0
        for taps, (names, ops) in zip(call.taps, record["taps"]):
            taps.update(zip(names, outs[i:i + len(names)]))
            if isinstance(taps, Taps):
                taps.ops.update(ops)
            i += len(names)
        return out


def _parameters(call: _Call, names: list[str]) -> list[torch.Tensor]:
    """The call's weights named as _Module names them (w0, w1, ... by first appearance)."""
    distinct = list({id(t): t for w in call.weights for t in w.values()}.values()) if names else []
    return [distinct[int(n[1:])] for n in names]


def _jsonable(x: Any) -> bool:
    try:
        return bool(json.dumps(x))
    except TypeError:
        return False


def _append_index(folder: Path, entry: dict[str, Any]) -> None:
    index_path = folder / "index.json"
    try:
        index = json.loads(index_path.read_text()) if index_path.exists() else []
    except (OSError, ValueError):
        index = []
    tmp = folder / f".index.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps([*index, entry]))
    os.replace(tmp, index_path)


class GraphBackend(BackendBase):
    """Base of the backends that export the torch forward and run it elsewhere (ONNX Runtime, TVM).
    Their arrays are torch CPU tensors; the compiler's runtime takes them per call.

    Their ops: each op call outside a compiled function is itself exported as a one-op graph (static
    shapes) and run by the backend's runtime, so op-level conformance measures the compiler's kernels
    and not torch's; these graphs are cached on disk like the model's. Inside a capture the ops are the
    torch bodies being traced."""

    lowering: Lowering

    def __init__(self, device: str, policy: Mapping[str, str] | None = None):
        self.torch_device = torch.device("cpu")
        self._op_graphs: dict[str, GraphCompiler] = {}
        super().__init__(device, policy)

    asarray = traceable_asarray
    to_numpy = TorchBackend.to_numpy

    def implementations(self) -> dict[str, list[Impl]]:
        table = {name: impls(composite=self._through_graph(name, fn)) for name, fn in _COMPOSITES.items()}
        table["attention"] = impls(sdpa=self._through_graph("attention", attention_sdpa),
                                   composite=table["attention"][0].fn)
        return table

    def _through_graph(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def op(*args: Any, **kwargs: Any) -> Any:
            if _CAPTURING[0] or torch.compiler.is_compiling():
                return fn(*args, **kwargs)
            key = f"{name}:{fn.__name__}"
            if key not in self._op_graphs:
                self._op_graphs[key] = GraphCompiler(fn, self.lowering, dynamic=False)
            return self._op_graphs[key](*args, **kwargs)

        op.__name__ = fn.__name__
        return op

    def compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        compiler = GraphCompiler(fn, self.lowering)
        return functools.wraps(fn)(lambda *args, **kwargs: compiler(*args, **kwargs))

