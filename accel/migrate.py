"""Run PyTorch code written for CUDA, unmodified, on another torch device: `torch:cpu` or `torch:npu`.

`enable(target)` patches, in place and reversibly, the CUDA entry points a training or inference script
uses: `.cuda()` on tensors and modules, `device="cuda"` / `"cuda:1"` / `torch.device("cuda")` in factory
functions, `.to()`, `torch.load(map_location=...)` and `torch.set_default_device`, the `torch.cuda.*`
functions in `CUDA_API` (device queries, synchronize, memory statistics, streams and events, RNG),
autocast and GradScaler on "cuda", and `init_process_group("nccl")` / DDP's device ids. Everything else
in torch is left alone: a tensor created with device="cpu" stays on cpu.

- `torch:npu` maps CUDA to torch_npu's own API (`torch.npu.*`, device "npu", collective backend "hccl"),
  the same mapping torch_npu's contrib/transfer_to_npu.py applies, but reversible and limited to the
  listed entry points.
- `torch:cpu` maps CUDA to the host: the device is "cpu", the collective backend is "gloo", the device
  RNG is the cpu generator, memory statistics read 0, streams and events are no-op stand-ins.
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

from accel.errors import BackendUnavailable, TargetUnavailable, UsageError

# Same reason as backends/torch_eager.py: with torch_npu installed, `import torch` would import it
# through torch's device-backend autoload and fail on a machine without CANN.
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

try:
    import torch
except ImportError as e:  # pragma: no cover - torch is a core dependency
    raise BackendUnavailable(f"torch cannot be imported ({e}); pip install torch") from None

log = logging.getLogger("accel.migrate")

# The torch.cuda functions and classes that enable() maps (scan_patterns.yaml's `torch-cuda-api` lists
# the same names: a test keeps the two in step).
CUDA_API = (
    "is_available", "device_count", "current_device", "set_device", "synchronize", "get_device_name",
    "is_bf16_supported", "device",
    "memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved", "memory_stats",
    "reset_peak_memory_stats", "reset_max_memory_allocated", "empty_cache",
    "Stream", "Event", "current_stream", "default_stream", "stream",
    "manual_seed", "manual_seed_all", "seed", "seed_all", "initial_seed",
    "get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all",
)
# Factory functions whose `device=` keyword is mapped (only those this torch has are patched).
FACTORIES = (
    "tensor", "as_tensor", "asarray", "zeros", "ones", "empty", "full", "rand", "randn", "randint", "randperm",
    "arange", "range", "linspace", "logspace", "eye", "zeros_like", "ones_like", "empty_like", "full_like",
    "rand_like", "randn_like", "randint_like", "empty_strided", "normal", "tril_indices", "triu_indices",
    "scalar_tensor", "sparse_coo_tensor",
)
TENSOR_NEW = ("new_tensor", "new_empty", "new_zeros", "new_ones", "new_full", "new_empty_strided")
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


def _zero(device: Any = None) -> int:
    return 0


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def _cpu_cuda_api() -> dict[str, Any]:
    # The device RNG is the cpu generator on this target. Go to the generator itself: torch.manual_seed
    # and torch.seed call torch.cuda.manual_seed_all, which would recurse.
    cpu_rng = torch.default_generator

    def manual_seed(seed: int) -> None:
        cpu_rng.manual_seed(seed)

    def seed() -> None:
        cpu_rng.seed()

    return {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "set_device": _nothing,
        "synchronize": _nothing,
        "get_device_name": lambda device=None: "cpu",
        "is_bf16_supported": lambda including_emulation=True: True,
        "device": _CpuDevice,
        "memory_allocated": _zero, "max_memory_allocated": _zero, "memory_reserved": _zero,
        "max_memory_reserved": _zero,
        "memory_stats": lambda device=None: {},
        "reset_peak_memory_stats": _nothing, "reset_max_memory_allocated": _nothing, "empty_cache": _nothing,
        "Stream": _CpuStream,
        "Event": _CpuEvent,
        "current_stream": lambda device=None: _CPU_STREAMS[-1],
        "default_stream": lambda device=None: _CPU_STREAMS[0],
        "stream": _CpuStreamContext,
        "manual_seed": manual_seed, "manual_seed_all": manual_seed,
        "seed": seed, "seed_all": seed,
        "initial_seed": cpu_rng.initial_seed,
        "get_rng_state": lambda device="cuda": cpu_rng.get_state(),
        "set_rng_state": lambda new_state, device="cuda": cpu_rng.set_state(new_state),
        "get_rng_state_all": lambda: [cpu_rng.get_state()],
        "set_rng_state_all": lambda new_states: cpu_rng.set_state(new_states[0]),
    }


def _npu_cuda_api(target: _Target) -> dict[str, Any]:
    npu = torch.npu  # type: ignore[attr-defined]  # registered by `import torch_npu`
    out: dict[str, Any] = {}
    for name in CUDA_API:
        fn = getattr(npu, name)
        # classes and argument-less functions go as they are; the rest get their device arguments mapped
        takes_device = not isinstance(fn, type) and name not in ("is_available", "device_count", "current_device")
        out[name] = _map_args(fn, target, ints=False) if takes_device else fn
    return out


# --- wrappers ------------------------------------------------------------------------------------------


def _distinct(name: str, fn: Any) -> Any:
    """A new function object calling fn. torch._dynamo keys its trace rules by object identity and
    asserts when one object sits under two torch.cuda names with different rules."""
    if isinstance(fn, type):
        return fn

    @functools.wraps(fn)
    def stand_in(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    stand_in.__name__ = name
    return stand_in


def _map_args(fn: Callable[..., Any], target: _Target, ints: bool, positional: bool = True,
              keys: Sequence[str] = ("device",)) -> Callable[..., Any]:
    """fn with CUDA devices in its positional arguments (when `positional`) and `keys` keywords mapped."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if positional:
            args = tuple(target.map(a, ints) for a in args)
        for key in keys:
            if key in kwargs:
                kwargs[key] = target.map(kwargs[key], ints)
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


def _patches(target: _Target) -> list[tuple[Any, str, Any, str]]:
    """(owner, attribute, replacement, label) for every entry point mapped on `target`."""
    out: list[tuple[Any, str, Any, str]] = []
    add = lambda owner, name, new, label: out.append((owner, name, new, label))  # noqa: E731
    tensor_to, module_to = torch.Tensor.to, torch.nn.Module.to

    def tensor_cuda(self: torch.Tensor, device: Any = None, non_blocking: bool = False, **kw: Any) -> torch.Tensor:
        return tensor_to(self, target.device(device), non_blocking=non_blocking, **kw)

    def module_cuda(self: torch.nn.Module, device: Any = None) -> torch.nn.Module:
        return module_to(self, target.device(device))

    add(torch.Tensor, "cuda", tensor_cuda, "torch.Tensor.cuda")
    add(torch.nn.Module, "cuda", module_cuda, "torch.nn.Module.cuda")
    add(torch.Tensor, "to", _map_args(tensor_to, target, ints=True), "torch.Tensor.to")
    add(torch.nn.Module, "to", _map_args(module_to, target, ints=True), "torch.nn.Module.to")
    add(torch.nn.Module, "to_empty", _map_args(torch.nn.Module.to_empty, target, ints=True),
        "torch.nn.Module.to_empty")
    for name in TENSOR_NEW:
        add(torch.Tensor, name, _map_args(getattr(torch.Tensor, name), target, False, positional=False),
            f"torch.Tensor.{name}")
    for name in FACTORIES:
        if hasattr(torch, name):
            add(torch, name, _map_args(getattr(torch, name), target, False, positional=False), f"torch.{name}")
    add(torch, "set_default_device", _map_params(torch.set_default_device, device=target.map),
        "torch.set_default_device")
    from torch.utils._device import DeviceContext

    add(DeviceContext, "__init__", _map_params(DeviceContext.__init__, device=target.map), "torch.device context")
    add(torch, "load", _map_params(torch.load, map_location=functools.partial(_map_location, target)),
        "torch.load")

    api = _cpu_cuda_api() if target.kind == "cpu" else _npu_cuda_api(target)
    for name in CUDA_API:
        add(torch.cuda, name, _distinct(name, api[name]), f"torch.cuda.{name}")

    # CUDA autocast keeps its default dtype (float16) on the target; the cpu default would be bfloat16.
    cuda_dtype = torch.get_autocast_dtype("cuda")
    autocast = torch.amp.autocast_mode.autocast
    autocast_init = autocast.__init__

    @functools.wraps(autocast_init)
    def autocast_init_mapped(self: Any, device_type: str, dtype: Any = None, *args: Any, **kwargs: Any) -> None:
        if _CUDA_STR.fullmatch(device_type):
            device_type, dtype = target.kind, dtype or cuda_dtype
        autocast_init(self, device_type, dtype, *args, **kwargs)

    add(autocast, "__init__", autocast_init_mapped, "torch.autocast")
    scaler = torch.amp.grad_scaler.GradScaler
    scaler_device = lambda d: target.map(d).split(":")[0] if _CUDA_STR.fullmatch(str(d)) else d  # noqa: E731
    add(scaler, "__init__", _map_params(scaler.__init__, device=scaler_device),
        "torch.amp.GradScaler")
    if target.kind == "npu":
        add(torch.cuda.amp, "GradScaler", torch.npu.amp.GradScaler, "torch.cuda.amp.GradScaler")  # type: ignore[attr-defined]

    if torch.distributed.is_available():
        dist = torch.distributed
        c10d = dist.distributed_c10d
        # device_id binds a process group to one accelerator; the host has none to bind
        backend_map = {"backend": target.backend,
                       "device_id": (lambda d: None) if target.kind == "cpu" else target.map}
        for owner in (dist, c10d):
            add(owner, "init_process_group", _map_params(c10d.init_process_group, **backend_map),
                f"{owner.__name__}.init_process_group")
            add(owner, "new_group", _map_params(c10d.new_group, **backend_map), f"{owner.__name__}.new_group")
        available = {"cpu": dist.is_gloo_available, "npu": getattr(dist, "is_hccl_available", None)}[target.kind]
        if available is not None:
            add(dist, "is_nccl_available", available, "torch.distributed.is_nccl_available")
        ddp = torch.nn.parallel.DistributedDataParallel
        if target.kind == "cpu":  # DDP over cpu modules requires device_ids=None and output_device=None
            ids: dict[str, Callable[[Any], Any]] = {"device_ids": lambda v: None, "output_device": lambda v: None}
        else:
            ids = {"device_ids": lambda v: v if v is None else [target.map(d) for d in v],
                   "output_device": target.map}
        add(ddp, "__init__", _map_params(ddp.__init__, **ids), "torch.nn.parallel.DistributedDataParallel")
    return out


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
