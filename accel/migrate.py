"""Run PyTorch code written for CUDA, unmodified, on another torch device: `torch:cpu` or `torch:npu`.

`enable(target)` patches, in place and reversibly, the CUDA entry points training and serving scripts
use, as listed in accel/migrate_table.yaml with what each becomes on each target: `.cuda()` on tensors
and modules, `device="cuda"` / `"cuda:1"` / `torch.device("cuda")` in factory functions, `.to()`,
`torch.load(map_location=...)`, `torch.Generator(device="cuda")` and `torch.set_default_device`, pinned
memory, the `torch.cuda` device queries, memory statistics, streams, events, graphs, NVTX ranges, RNG and
legacy tensor types, TF32 flags, autocast and GradScaler on "cuda", and `init_process_group("nccl")` /
DDP's device ids. Everything else in torch is left alone: a tensor created with device="cpu" stays on cpu.

- `torch:npu` maps CUDA to torch_npu's own API (`torch.npu.*`, device "npu", collective backend "hccl"),
  as torch_npu's contrib/transfer_to_npu.py does, but reversible and limited to the table's rows; the
  table says where and why the two differ.
- `torch:cpu` maps CUDA to the host: the device is "cpu", the collective backend "gloo", the device RNG
  the cpu generator, memory statistics the process's resident memory, streams and events in-order
  stand-ins; a call with no host meaning (CUDA graphs) stops the script with one line naming it.
- `torch:cuda` patches nothing: the script already targets it.

`disable()` puts back every original object (`torch.cuda.synchronize is original` holds again).

Entry points: `accel run [--target T] -- python train.py ARGS` (one process), and, for a launcher that
starts one process per rank, this module: `torchrun --nproc_per_node 2 -m accel.migrate [--target T]
train.py ARGS`.
"""

from __future__ import annotations

import functools
import gc
import inspect
import logging
import os
import re
import runpy
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accel.errors import AccelError, BackendUnavailable, TargetUnavailable, UsageError

# Same reason as backends/torch_eager.py: with torch_npu installed, `import torch` would import it
# through torch's device-backend autoload and fail on a machine without CANN.
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

try:
    import torch
except ImportError as e:  # pragma: no cover - torch is a core dependency
    raise BackendUnavailable(f"torch cannot be imported ({e}); pip install torch") from None

log = logging.getLogger("accel.migrate")

# --- the table -----------------------------------------------------------------------------------------


class Refused(AccelError):
    """A CUDA call that the target has nothing for (a `refuse:` row of migrate_table.yaml)."""


@dataclass(frozen=True)
class Row:
    """One replaced object: what it becomes on each target (see migrate_table.yaml's header)."""

    name: str
    columns: dict[str, str]  # "cpu" / "npu" -> the column's text
    npu_keywords: dict[str, str]
    npu_drops: tuple[str, ...]
    torch_keeps_cpu: bool  # on cpu, torch's own modules calling it get torch's original

    def kind(self, target: str) -> str:
        """'unchanged', 'refuse', 'object' (a dotted torch name), 'as' (another row's) or 'stand-in'."""
        text = self.columns[target]
        head = text.split(":", 1)[0]
        if head in ("unchanged", "refuse") and ":" in text:
            return head
        if text.startswith("as "):
            return "as"
        return "object" if re.fullmatch(r"torch(_npu)?(\.\w+)+", text) else "stand-in"


@functools.cache
def table() -> tuple[dict[str, list[str] | dict[str, list[str]]], dict[str, Row]]:
    """(device_arguments, rows) of accel/migrate_table.yaml, checked."""
    from importlib import resources

    import yaml

    data = yaml.safe_load(resources.files("accel").joinpath("migrate_table.yaml").read_text(encoding="utf-8"))
    rows = {}
    for name, entry in data["names"].items():
        columns = {t: entry.get(t) for t in ("cpu", "npu")}
        if not all(isinstance(v, str) and v.strip() for v in (*columns.values(), entry.get("transfer_to_npu"))):
            raise AccelError(f"migrate_table.yaml: {name} needs cpu, npu and transfer_to_npu texts")
        rows[name] = Row(name, columns, dict(entry.get("npu_keywords", {})), tuple(entry.get("npu_drops", ())),
                         entry.get("torch_callers") == "original on cpu")
    return data["device_arguments"], rows


def _cuda_api() -> tuple[str, ...]:
    return tuple(n.removeprefix("torch.cuda.") for n in table()[1] if re.fullmatch(r"torch\.cuda\.\w+", n))


# The torch.cuda names the table maps (scan_patterns.yaml's `torch-cuda-api` lists the same: a test keeps
# the two in step).
CUDA_API = _cuda_api()
COLLECTIVE = {"cpu": "gloo", "npu": "hccl", "cuda": "nccl"}

_CUDA_STR = re.compile(r"cuda(?::(\d+))?")
_MISSING = object()


@dataclass(frozen=True)
class _Target:
    kind: str  # "cpu" | "npu" | "cuda"
    index: int | None  # the device a bare "cuda" means, when the target names one

    def map_str(self, s: str) -> str:
        m = _CUDA_STR.fullmatch(s)
        if m is None or self.kind == "cpu":
            return "cpu" if m is not None else s
        index = m.group(1) if m.group(1) is not None else self.index
        return self.kind if index is None else f"{self.kind}:{index}"

    def map(self, d: Any, ints: bool = False) -> Any:
        """d with CUDA replaced by the target: strings, torch.device, and (when `ints`) device indices."""
        if isinstance(d, str):
            return self.map_str(d)
        if isinstance(d, torch.device) and d.type == "cuda":
            return torch.device(self.map_str("cuda" if d.index is None else f"cuda:{d.index}"))
        if ints and isinstance(d, int) and not isinstance(d, bool):
            return torch.device("cpu") if self.kind == "cpu" else torch.device(self.kind, d)
        return d

    def device(self, d: Any = None) -> torch.device:
        """The target device for a `.cuda(d)` argument (None, index, string or torch.device)."""
        if d is None:
            return torch.device(self.map_str("cuda"))
        return torch.device(self.map(d, ints=True))

    def backend(self, b: Any) -> Any:
        """A torch.distributed backend string with nccl (and cuda:nccl) replaced by the target's collective."""
        if not isinstance(b, str):
            return b
        parts: dict[str | None, str] = {}
        for part in b.split(","):
            dev, sep, name = part.strip().rpartition(":")
            dev_key = self.kind if dev == "cuda" else (dev if sep else None)
            name = COLLECTIVE[self.kind] if name.lower() == "nccl" else name
            parts.setdefault(dev_key, name)  # cpu:gloo,cuda:nccl on cpu folds into one cpu:gloo
        return ",".join(name if dev is None else f"{dev}:{name}" for dev, name in parts.items())

    @property
    def name(self) -> str:
        return f"torch:{self.kind}"


# --- the torch.cuda namespace on the cpu target --------------------------------------------------------


class _CpuEvent:
    """torch.cuda.Event on the host: work is synchronous, so an event is complete once recorded."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self.enable_timing = enable_timing
        self._time: float | None = None

    def record(self, stream: Any = None) -> None:
        self._time = time.perf_counter()

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def elapsed_time(self, end_event: _CpuEvent) -> float:
        if self._time is None or end_event._time is None:
            raise RuntimeError("both events must be recorded before elapsed_time()")
        return (end_event._time - self._time) * 1000.0  # milliseconds, as torch.cuda.Event reports


class _CpuStream:
    """torch.cuda.Stream on the host: one in-order stream, so waits and synchronize return at once."""

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any):
        self.priority = priority

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: _CpuEvent | None = None) -> _CpuEvent:
        event = event or _CpuEvent()
        event.record(self)
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_CPU_STREAMS = [_CpuStream()]  # the default stream, then any entered with torch.cuda.stream(s)


class _CpuStreamContext:
    def __init__(self, stream: _CpuStream | None):
        self.stream = stream

    def __enter__(self) -> None:
        if self.stream is not None:
            _CPU_STREAMS.append(self.stream)

    def __exit__(self, *exc: Any) -> None:
        if self.stream is not None:
            _CPU_STREAMS.pop()


class _CpuDevice:
    """`with torch.cuda.device(i):` on the host: there is one device, nothing to switch."""

    def __init__(self, device: Any):
        self.idx = 0

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: Any) -> None:
        pass


@dataclass(frozen=True)
class _CpuProperties:
    """torch.cuda.get_device_properties() of the host, with the fields scripts read."""

    name: str
    total_memory: int
    major: int
    minor: int
    multi_processor_count: int


def _proc_kib(path: str, key: str) -> int | None:
    """A `key: N kB` line of a /proc file, in bytes (None where there is no /proc)."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _peak_rss() -> int:
    import resource

    peak = _proc_kib("/proc/self/status", "VmHWM")
    if peak is None:  # ru_maxrss is kiB on Linux, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return peak


def _rss() -> int:
    rss = _proc_kib("/proc/self/status", "VmRSS")
    return _peak_rss() if rss is None else rss


def _reset_peak_rss(device: Any = None) -> None:
    try:  # Linux >= 4.0: "5" resets VmHWM to the current resident size
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


def _host_memory() -> tuple[int, int]:
    """(available, total) bytes of the host."""
    total, available = _proc_kib("/proc/meminfo", "MemTotal"), _proc_kib("/proc/meminfo", "MemAvailable")
    if total is None or available is None:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page
    return available, total


def _memory_stats(device: Any = None) -> dict[str, int]:
    now, peak = _rss(), _peak_rss()
    return {"allocated_bytes.all.current": now, "allocated_bytes.all.peak": peak,
            "reserved_bytes.all.current": now, "reserved_bytes.all.peak": peak,
            "num_alloc_retries": 0, "num_ooms": 0}


def _memory_summary(device: Any = None, abbreviated: bool = False) -> str:
    s = _memory_stats()
    gib = lambda n: f"{n / 2**30:10.3f} GiB"  # noqa: E731
    return ("accel.migrate on torch:cpu: no device allocator; these are the process's resident memory\n"
            f"  allocated, reserved (resident now): {gib(s['allocated_bytes.all.current'])}\n"
            f"  peak (since start or the last reset): {gib(s['allocated_bytes.all.peak'])}\n")


def _memory_fraction(fraction: float, device: Any = None) -> None:
    if not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"invalid memory fraction {fraction!r}: it must be between 0 and 1")


_NVTX_RANGES: list[Any] = []  # what range_push started, innermost last


def _nvtx_push(msg: str) -> int:
    _NVTX_RANGES.append(msg)
    return len(_NVTX_RANGES) - 1  # NVTX returns the zero-based depth of the range it started


def _nvtx_pop() -> int:
    if not _NVTX_RANGES:
        return -1  # as NVTX does for a pop without a push
    _NVTX_RANGES.pop()
    return len(_NVTX_RANGES)


def _zero(device: Any = None) -> int:
    return 0


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def _cpu_names(target: _Target) -> dict[str, Any]:
    """accel.migrate's own stand-ins on cpu, by table row (the rows' texts say what each means)."""
    # The device RNG is the cpu generator on this target. Go to the generator itself: torch.manual_seed
    # and torch.seed call torch.cuda.manual_seed_all, which would recurse.
    cpu_rng = torch.default_generator

    def manual_seed(seed: int) -> None:
        cpu_rng.manual_seed(seed)

    def seed() -> None:
        cpu_rng.seed()

    def pin_memory(self: torch.Tensor, device: Any = None) -> torch.Tensor:
        return self

    c = "torch.cuda."
    return {
        "torch.Tensor.pin_memory": pin_memory,
        c + "is_available": lambda: True, c + "is_initialized": lambda: True, c + "init": _nothing,
        c + "device_count": lambda: 1, c + "current_device": lambda: 0, c + "set_device": _nothing,
        c + "device": _CpuDevice, c + "synchronize": _nothing, c + "get_device_name": lambda device=None: "cpu",
        c + "get_device_capability": lambda device=None: (0, 0),
        c + "get_device_properties": lambda device=None: _CpuProperties(
            "cpu", _host_memory()[1], 0, 0, os.cpu_count() or 1),
        c + "get_arch_list": lambda: [],
        c + "is_bf16_supported": lambda including_emulation=True: True,
        c + "ipc_collect": _nothing,
        c + "memory_allocated": lambda device=None: _rss(), c + "max_memory_allocated": lambda device=None: _peak_rss(),
        c + "memory_reserved": lambda device=None: _rss(), c + "max_memory_reserved": lambda device=None: _peak_rss(),
        c + "memory_stats": _memory_stats, c + "memory_summary": _memory_summary,
        c + "memory_snapshot": lambda: [], c + "mem_get_info": lambda device=None: _host_memory(),
        c + "reset_peak_memory_stats": _reset_peak_rss, c + "reset_max_memory_allocated": _reset_peak_rss,
        c + "empty_cache": _nothing, c + "set_per_process_memory_fraction": _memory_fraction,
        c + "Stream": _CpuStream, c + "Event": _CpuEvent,
        c + "current_stream": lambda device=None: _CPU_STREAMS[-1],
        c + "default_stream": lambda device=None: _CPU_STREAMS[0],
        c + "stream": _CpuStreamContext,
        c + "nvtx.range_push": _nvtx_push, c + "nvtx.range_pop": _nvtx_pop,
        c + "nvtx.range_start": lambda msg: 0, c + "nvtx.range_end": _nothing, c + "nvtx.mark": _nothing,
        c + "manual_seed": manual_seed, c + "manual_seed_all": manual_seed,
        c + "seed": seed, c + "seed_all": seed,
        c + "initial_seed": cpu_rng.initial_seed,
        c + "get_rng_state": lambda device="cuda": cpu_rng.get_state(),
        c + "set_rng_state": lambda new_state, device="cuda": cpu_rng.set_state(new_state),
        c + "get_rng_state_all": lambda: [cpu_rng.get_state()],
        c + "set_rng_state_all": lambda new_states: cpu_rng.set_state(new_states[0]),
        c + "default_generators": (cpu_rng,),
    }


def _npu_names(target: _Target) -> dict[str, Any]:
    """accel.migrate's own stand-ins on npu, where the table's text is not a torch_npu object."""
    npu = torch.npu  # type: ignore[attr-defined]  # registered by `import torch_npu`
    ranges: list[int] = []

    def range_push(msg: str) -> int:
        ranges.append(npu.mstx.range_start(msg))
        return len(ranges) - 1

    def range_pop() -> int:
        if not ranges:
            return -1
        npu.mstx.range_end(ranges.pop())
        return len(ranges)

    return {
        "torch.Tensor.is_cuda": property(lambda self: self.is_npu),
        "torch.Tensor.pin_memory": _map_args(torch.Tensor.pin_memory, target, ints=False),
        "torch.cuda.get_device_capability": lambda device=None: (0, 0),
        "torch.cuda.get_arch_list": lambda: [],
        "torch.cuda.nvtx.range_push": range_push, "torch.cuda.nvtx.range_pop": range_pop,
    }


# --- wrappers ------------------------------------------------------------------------------------------


def _distinct(name: str, fn: Any) -> Any:
    """A new function object calling fn. torch._dynamo keys its trace rules by object identity and
    asserts when one object sits under two torch.cuda names with different rules."""
    if isinstance(fn, type) or not callable(fn):
        return fn

    @functools.wraps(fn)
    def stand_in(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    stand_in.__name__ = name
    return stand_in


def _map_args(fn: Callable[..., Any], target: _Target, ints: bool, positional: bool = True,
              keys: Sequence[str] = ("device",), rename: dict[str, str] | None = None,
              drops: Sequence[str] = (), unpin: bool = False) -> Callable[..., Any]:
    """fn with CUDA devices in its positional arguments (when `positional`) and `keys` keywords mapped,
    keywords renamed or dropped where the target's function is spelled differently, and (`unpin`)
    pin_memory=True turned off: the host has no pinned memory of its own."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if positional:
            args = tuple(target.map(a, ints) for a in args)
        for key in keys:
            if key in kwargs:
                kwargs[key] = target.map(kwargs[key], ints)
        for key in drops:
            kwargs.pop(key, None)
        for old, new in (rename or {}).items():
            if old in kwargs:
                kwargs[new] = kwargs.pop(old)
        if unpin and kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return fn(*args, **kwargs)

    return wrapper


def _map_params(fn: Callable[..., Any], **mappers: Callable[[Any], Any]) -> Callable[..., Any]:
    """fn (a Python function) with the named parameters passed through their mapper, defaults included
    (GradScaler's device defaults to "cuda")."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = sig.bind_partial(*args, **kwargs)
        for name, mapper in mappers.items():
            value = bound.arguments.get(name, sig.parameters[name].default)
            if value is inspect.Parameter.empty:
                continue
            new = mapper(value)
            if new is not value:
                bound.arguments[name] = new
        return fn(*bound.args, **bound.kwargs)

    return wrapper


def _refuse(name: str, target: _Target, why: str) -> Callable[..., Any]:
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise Refused(f"{name} has no equivalent on {target.name}: {why}")

    refused.__name__ = name.rsplit(".", 1)[-1]
    return refused


def _object(dotted: str) -> Any:
    """The object a dotted name under torch (or an imported torch_npu) names."""
    first, *rest = dotted.split(".")
    obj: Any = sys.modules[first]
    for part in rest:
        obj = getattr(obj, part)
    return obj


def _resolve_name(dotted: str) -> tuple[Any, str]:
    """(owner, attribute) of a dotted name."""
    head, _, attr = dotted.rpartition(".")
    return _object(head), attr


def _generator(target: _Target) -> type:
    """torch.Generator with its device mapped; instances of the real class still pass isinstance."""
    base = torch.Generator

    class _Meta(type(base)):  # type: ignore[misc]
        def __instancecheck__(cls, obj: Any) -> bool:
            return isinstance(obj, base)

        def __subclasscheck__(cls, sub: type) -> bool:
            return issubclass(sub, base)

    class Generator(base, metaclass=_Meta):  # type: ignore[misc,valid-type]
        def __new__(cls, device: Any = "cpu") -> Any:
            return base.__new__(cls, target.map(device, ints=True))

    Generator.__module__, Generator.__qualname__ = "torch", "Generator"
    return Generator


class _Hf32Matmul:
    """torch.backends.cuda.matmul on npu: allow_tf32 reads and writes torch_npu's allow_hf32."""

    def __init__(self, cublas: Any):
        object.__setattr__(self, "_cublas", cublas)

    def __getattr__(self, name: str) -> Any:
        if name == "allow_tf32":
            return torch.npu.matmul.allow_hf32  # type: ignore[attr-defined]
        return getattr(self._cublas, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "allow_tf32":
            torch.npu.matmul.allow_hf32 = value  # type: ignore[attr-defined]
        else:
            setattr(self._cublas, name, value)


def _patches(target: _Target) -> list[tuple[Any, str, Any, str]]:
    """(owner, attribute, replacement, row) for every entry point mapped on `target`: the table's rows
    and its device-argument functions."""
    device_arguments, rows = table()
    out: list[tuple[Any, str, Any, str]] = []
    add = lambda owner, name, new, label: out.append((owner, name, new, label))  # noqa: E731
    tensor_to, module_to = torch.Tensor.to, torch.nn.Module.to
    cpu = target.kind == "cpu"

    for owner_name, names in device_arguments.items():
        if owner_name == "with_indices":
            continue
        owner = _object(owner_name)
        for name in names:
            if hasattr(owner, name):  # only those this torch has
                add(owner, name, _map_args(getattr(owner, name), target, False, positional=False, unpin=cpu),
                    f"{owner_name}.{name}")
    for owner_name, names in device_arguments["with_indices"].items():
        owner = _object(owner_name)
        for name in names:
            add(owner, name, _map_args(getattr(owner, name), target, ints=True), f"{owner_name}.{name}")

    def tensor_cuda(self: torch.Tensor, device: Any = None, non_blocking: bool = False, **kw: Any) -> torch.Tensor:
        return tensor_to(self, target.device(device), non_blocking=non_blocking, **kw)

    def module_cuda(self: torch.nn.Module, device: Any = None) -> torch.nn.Module:
        return module_to(self, target.device(device))

    tensor_type = torch.Tensor.type

    def type_mapped(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kw: Any) -> Any:
        if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
            dtype = "torch." + ("" if cpu else f"{target.kind}.") + dtype.removeprefix("torch.cuda.")
        return tensor_type(self, dtype, non_blocking, **kw) if dtype is not None else tensor_type(self)

    from torch.utils._device import DeviceContext

    # CUDA autocast keeps its default dtype (float16) on the target; the cpu default would be bfloat16.
    cuda_dtype = torch.get_autocast_dtype("cuda")
    autocast = torch.amp.autocast_mode.autocast
    autocast_init = autocast.__init__

    @functools.wraps(autocast_init)
    def autocast_init_mapped(self: Any, device_type: str, dtype: Any = None, *args: Any, **kwargs: Any) -> None:
        if _CUDA_STR.fullmatch(device_type):
            device_type, dtype = target.kind, dtype or cuda_dtype
        autocast_init(self, device_type, dtype, *args, **kwargs)

    scaler = torch.amp.grad_scaler.GradScaler
    scaler_device = lambda d: target.map(d).split(":")[0] if _CUDA_STR.fullmatch(str(d)) else d  # noqa: E731
    # the rows whose stand-in is not a plain attribute of the row's own name
    special: dict[str, list[tuple[Any, str, Any]]] = {
        "torch.Tensor.cuda": [(torch.Tensor, "cuda", tensor_cuda)],
        "torch.nn.Module.cuda": [(torch.nn.Module, "cuda", module_cuda)],
        "torch.Tensor.type": [(torch.Tensor, "type", type_mapped)],
        "torch.set_default_device": [(torch, "set_default_device",
                                      _map_params(torch.set_default_device, device=target.map))],
        "torch.device context": [(DeviceContext, "__init__", _map_params(DeviceContext.__init__, device=target.map))],
        "torch.load": [(torch, "load", _map_params(torch.load, map_location=functools.partial(_map_location, target)))],
        "torch.Generator": [(torch, "Generator", _generator(target))],
        "torch.autocast": [(autocast, "__init__", autocast_init_mapped)],
        "torch.amp.GradScaler": [(scaler, "__init__", _map_params(scaler.__init__, device=scaler_device))],
    }
    if not cpu:
        conv = torch.npu.conv  # type: ignore[attr-defined]
        special["torch.backends.cuda.matmul.allow_tf32"] = [
            (torch.backends.cuda, "matmul", _Hf32Matmul(torch.backends.cuda.matmul))]
        special["torch.backends.cudnn.allow_tf32"] = [
            (type(torch.backends.cudnn), "allow_tf32",
             property(lambda self: conv.allow_hf32, lambda self, v: setattr(conv, "allow_hf32", v)))]
    if torch.distributed.is_available():
        dist = torch.distributed
        c10d = dist.distributed_c10d
        # device_id binds a process group to one accelerator; the host has none to bind
        backend_map = {"backend": target.backend, "device_id": (lambda d: None) if cpu else target.map}
        init = _map_params(c10d.init_process_group, **backend_map)
        group = _map_params(c10d.new_group, **backend_map)
        special["torch.distributed.init_process_group"] = [(dist, "init_process_group", init)]
        special["torch.distributed.distributed_c10d.init_process_group"] = [(c10d, "init_process_group", init)]
        special["torch.distributed.new_group"] = [(dist, "new_group", group)]
        special["torch.distributed.distributed_c10d.new_group"] = [(c10d, "new_group", group)]
        ddp = torch.nn.parallel.DistributedDataParallel
        if cpu:  # DDP over cpu modules requires device_ids=None and output_device=None
            ids: dict[str, Callable[[Any], Any]] = {"device_ids": lambda v: None, "output_device": lambda v: None}
        else:
            ids = {"device_ids": lambda v: v if v is None else [target.map(d) for d in v],
                   "output_device": target.map}
        special["torch.nn.parallel.DistributedDataParallel"] = [(ddp, "__init__", _map_params(ddp.__init__, **ids))]
    else:  # pragma: no cover - every torch wheel we install has torch.distributed
        rows = {n: r for n, r in rows.items() if not n.startswith(("torch.distributed.", "torch.nn.parallel."))}

    own = _cpu_names(target) if cpu else _npu_names(target)
    for name, row in rows.items():
        kind = row.kind(target.kind)
        if kind == "unchanged":
            continue
        if name in special:
            for owner, attr, new in special[name]:
                add(owner, attr, new, name)
            continue
        owner, attr = _resolve_name(name)
        if kind == "refuse":
            new = _refuse(name, target, row.columns[target.kind].split(":", 1)[1].strip())
        elif kind == "object":
            new = _object(row.columns[target.kind])
            if callable(new) and not isinstance(new, type) and not cpu:
                new = _map_args(new, target, ints=False, rename=row.npu_keywords, drops=row.npu_drops)
        elif name in own:
            new = own[name]
        else:
            raise AccelError(f"migrate_table.yaml: {name} on {target.name} says {row.columns[target.kind]!r}, "
                             "and accel.migrate has no stand-in of that name")
        if cpu and row.torch_keeps_cpu:
            new = _for_scripts(new, getattr(owner, attr))
        add(owner, attr, _distinct(attr, new) if owner is torch.cuda else new, name)
    return out


def _for_scripts(new: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    """`new` for the script's calls, `original` for torch's own: inductor, for one, reads the CUDA device
    properties into its cache key and expects a CPU build's AssertionError, not a host description."""

    @functools.wraps(original)
    def either(*args: Any, **kwargs: Any) -> Any:
        frame = sys._getframe(1)
        while frame.f_back is not None and frame.f_globals.get("__name__") == __name__:
            frame = frame.f_back  # past our own wrappers
        caller = frame.f_globals.get("__name__", "")
        inside_torch = caller == "torch" or caller.startswith("torch.")
        return (original if inside_torch else new)(*args, **kwargs)

    return either


def _map_location(target: _Target, location: Any) -> Any:
    if location is None:  # tensors saved on CUDA come back on the target; everything else as saved
        from torch.serialization import default_restore_location

        def restore(storage: Any, saved_at: str) -> Any:
            if _CUDA_STR.fullmatch(saved_at):
                return default_restore_location(storage, target.map_str(saved_at))
            return None

        return restore
    if isinstance(location, dict):
        return {k: target.map(v) for k, v in location.items()}
    return target.map(location)


# --- enable / disable ----------------------------------------------------------------------------------

_lock = threading.Lock()
_state: dict[str, Any] = {"target": None, "saved": []}


def _resolve(spec: str | None) -> tuple[str, _Target]:
    from accel.targets import parse, select

    explicit = spec or os.environ.get("ACCEL_TARGET")
    if explicit and parse(explicit).backend != "torch":
        source = "" if spec else " (from ACCEL_TARGET)"
        raise UsageError(f"accel.migrate runs torch scripts; target {explicit!r}{source} is not a torch target: "
                         "use torch:cpu, torch:npu or torch:cuda")
    chosen = select(spec)  # raises TargetUnavailable with the reason (e.g. torch_npu missing)
    index = chosen.device.partition(":")[2]
    return str(chosen), _Target(chosen.kind, int(index) if index else None)


def enable(target: str | None = None) -> str:
    """Map CUDA calls to `target` (default: ACCEL_TARGET, else the first available of torch:npu,
    torch:cuda, torch:cpu). Returns the target. Calling it again with the same (or no) target does nothing."""
    with _lock:
        if _state["target"] is not None:
            if target is None or target.strip() == _state["target"]:
                return str(_state["target"])
            raise UsageError(f"accel.migrate is already enabled for {_state['target']}; "
                             "call accel.migrate.disable() before enabling another target")
        name, resolved = _resolve(target)
        if resolved.kind == "npu":
            try:
                import torch_npu  # noqa: F401  # registers torch.npu, the "npu" device and the hccl backend
            except Exception as e:  # pragma: no cover - select() probed this import already
                raise TargetUnavailable(f"torch_npu cannot be imported ({e}); is CANN set up?") from None
        patches = [] if resolved.kind == "cuda" else _patches(resolved)
        saved = []
        for owner, attr, new, _ in patches:
            saved.append((owner, attr, vars(owner).get(attr, _MISSING)))
            setattr(owner, attr, new)
        _forget_constructor_cache()
        _state.update(target=name, saved=saved)
        if patches:
            log.info("accel.migrate: CUDA calls now run on %s; patched %d entry points: %s",
                     name, len(patches), ", ".join(label for *_, label in patches))
        else:
            log.info("accel.migrate: target %s is CUDA itself; nothing patched", name)
        return name


def disable() -> None:
    """Put back every object enable() replaced. A no-op when not enabled."""
    with _lock:
        for owner, attr, original in reversed(_state["saved"]):
            if original is _MISSING:  # the attribute was inherited (torch.Tensor.cuda lives on TensorBase)
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)
        _forget_constructor_cache()
        _state.update(target=None, saved=[])


def _forget_constructor_cache() -> None:
    """torch's `with torch.device(...)` mode recognises factory functions through a set it caches on first
    use. Built while patched, it would hold our wrappers, and after disable() the real torch.empty would go
    unrecognised: modules built under a meta-device context (as transformers loads models) would get real
    storage with garbage in it. The set is rebuilt on both sides of a patch."""
    try:
        import torch.utils._device as device_mode
    except ImportError:  # pragma: no cover - torch before 2.0 has no device context
        return
    constructors = getattr(device_mode, "_device_constructors", None)
    if constructors is not None and hasattr(constructors, "cache_clear"):
        constructors.cache_clear()


def enabled() -> str | None:
    """The target CUDA calls are mapped to, or None."""
    return _state["target"]


# --- running a script -----------------------------------------------------------------------------------

_PYTHON = re.compile(r"python[0-9.]*")
_LAUNCHERS = ("torchrun", "torch_npu_run", "deepspeed", "accelerate")
_LAUNCHER_MODULES = ("torch.distributed.run", "torch.distributed.launch")


def parse_command(command: Sequence[str]) -> tuple[str, str, list[str]]:
    """("path", script, args) or ("module", name, args) for `[python [-u]] script.py ARGS` or
    `[python [-u]] -m module ARGS`."""
    hint = "e.g. accel run -- python train.py --lr 1e-3, or -- python -m pkg.train"
    words = list(command)
    launcher = bool(words) and Path(words[0]).name in _LAUNCHERS
    if words and _PYTHON.fullmatch(Path(words[0]).name):
        words = words[1:]
    while words and words[0] == "-u":  # unbuffered output: nothing to do in this process
        words = words[1:]
    if launcher or words[:1] == ["-m"] and words[1:2] and words[1] in _LAUNCHER_MODULES:
        raise UsageError("a launcher starts its own processes, which would run without the mapping; start "
                         "accel.migrate under it instead: torchrun --nproc_per_node N -m accel.migrate "
                         "[--target T] train.py ARGS")
    if not words:
        raise UsageError(f"no script to run; {hint}")
    if words[0] == "-m":
        if len(words) < 2:
            raise UsageError(f"-m needs a module name; {hint}")
        return "module", words[1], words[2:]
    if words[0].startswith("-"):
        raise UsageError(f"python option {words[0]} is not supported here; {hint}")
    return "path", words[0], words[1:]


def verbose() -> None:
    """Show this module's INFO line (what was patched) on stderr, without configuring the root logger,
    which belongs to the script."""
    if not any(getattr(h, "_accel", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler._accel = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def launch(command: Sequence[str], target: str | None = None) -> int:
    """Run a script (or `-m module`) as __main__ in this process with CUDA mapped to `target`; returns
    its exit code (an uncaught exception prints its traceback and gives 1, as python does)."""
    kind, name, args = parse_command(command)
    if kind == "path" and not Path(name).is_file():
        raise UsageError(f"script {name} does not exist")
    enable(target)
    argv, path = sys.argv[:], sys.path[:]
    try:
        if kind == "module":
            sys.argv = [name, *args]  # runpy puts the module's file in argv[0]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(name, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [name, *args]
            sys.path.insert(0, str(Path(name).resolve().parent))
            runpy.run_path(name, run_name="__main__")
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        raise
    except Refused as e:  # one line naming the call and where the script made it
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename != __file__]
        where = f"{frames[-1].filename}:{frames[-1].lineno}: " if frames else ""
        print(f"accel.migrate: error: {where}{e}", file=sys.stderr)
        return e.exit_code
    except BaseException as e:  # the script's own failure: its traceback, without our frames
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, runpy.run_path.__code__.co_filename):
            tb = tb.tb_next
        traceback.print_exception(type(e), e, tb)
        return 1
    finally:
        sys.argv[:], sys.path[:] = argv, path
        # Free what the script left in reference cycles (DDP's reducer holds its process group) now,
        # while the interpreter is whole: gloo's threads torn down during interpreter exit can abort
        # the process ("terminate called without an active exception") after the script succeeded.
        gc.collect()
        disable()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m accel.migrate [-v] [--target T] script.py ARGS` (or `-m module ARGS`)."""
    from accel.errors import AccelError

    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] in (["-h"], ["--help"]):
        print("usage: python -m accel.migrate [-v] [--target torch:DEVICE] (script.py | -m module) [ARGS...]\n"
              "Runs the script as __main__ with its CUDA calls mapped to the target; under a launcher:\n"
              "  torchrun --nproc_per_node N -m accel.migrate [--target T] train.py ARGS")
        return 0
    target = None
    while words and (words[0] in ("-v", "--verbose") or words[0].startswith("--target")):
        if words[0] in ("-v", "--verbose"):
            verbose()
            words = words[1:]
        elif "=" in words[0]:
            target, words = words[0].split("=", 1)[1], words[1:]
        elif len(words) > 1:
            target, words = words[1], words[2:]
        else:
            words = []
    if words and words[0] == "--":
        words = words[1:]
    try:
        return launch(words, target)
    except AccelError as e:
        print(f"accel.migrate: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    # `python -m` runs this file as a second module object; delegate to the imported one so a script
    # that imports accel.migrate sees the same state.
    from accel import migrate as _migrate

    sys.exit(_migrate.main())
