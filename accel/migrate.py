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
import logging
import os
import re
import runpy
import sys
import threading
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

from accel.migrate_map import (  # noqa: E402  # after torch, which needs the autoload switch above
    CUDA_STR,
    Hf32Matmul,
    Refused,
    Target,
    distinct,
    for_scripts,
    generator_class,
    map_args,
    map_location,
    map_params,
    refuse,
)

log = logging.getLogger("accel.migrate")

# --- the table -----------------------------------------------------------------------------------------


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
_MISSING = object()


def _npu_names(target: Target) -> dict[str, Any]:
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
        "torch.Tensor.pin_memory": map_args(torch.Tensor.pin_memory, target, ints=False),
        "torch.cuda.get_device_capability": lambda device=None: (0, 0),
        "torch.cuda.get_arch_list": lambda: [],
        "torch.cuda.nvtx.range_push": range_push, "torch.cuda.nvtx.range_pop": range_pop,
    }


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


def _patches(target: Target) -> list[tuple[Any, str, Any, str]]:
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
                add(owner, name, map_args(getattr(owner, name), target, False, positional=False, unpin=cpu),
                    f"{owner_name}.{name}")
    for owner_name, names in device_arguments["with_indices"].items():
        owner = _object(owner_name)
        for name in names:
            add(owner, name, map_args(getattr(owner, name), target, ints=True), f"{owner_name}.{name}")

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
        if CUDA_STR.fullmatch(device_type):
            device_type, dtype = target.kind, dtype or cuda_dtype
        autocast_init(self, device_type, dtype, *args, **kwargs)

    scaler = torch.amp.grad_scaler.GradScaler
    scaler_device = lambda d: target.map(d).split(":")[0] if CUDA_STR.fullmatch(str(d)) else d  # noqa: E731
    # the rows whose stand-in is not a plain attribute of the row's own name
    special: dict[str, list[tuple[Any, str, Any]]] = {
        "torch.Tensor.cuda": [(torch.Tensor, "cuda", tensor_cuda)],
        "torch.nn.Module.cuda": [(torch.nn.Module, "cuda", module_cuda)],
        "torch.Tensor.type": [(torch.Tensor, "type", type_mapped)],
        "torch.set_default_device": [(torch, "set_default_device",
                                      map_params(torch.set_default_device, device=target.map))],
        "torch.device context": [(DeviceContext, "__init__", map_params(DeviceContext.__init__, device=target.map))],
        "torch.load": [(torch, "load", map_params(torch.load, map_location=functools.partial(map_location, target)))],
        "torch.Generator": [(torch, "Generator", generator_class(target))],
        "torch.autocast": [(autocast, "__init__", autocast_init_mapped)],
        "torch.amp.GradScaler": [(scaler, "__init__", map_params(scaler.__init__, device=scaler_device))],
    }
    if not cpu:
        conv = torch.npu.conv  # type: ignore[attr-defined]
        special["torch.backends.cuda.matmul.allow_tf32"] = [
            (torch.backends.cuda, "matmul", Hf32Matmul(torch.backends.cuda.matmul))]
        special["torch.backends.cudnn.allow_tf32"] = [
            (type(torch.backends.cudnn), "allow_tf32",
             property(lambda self: conv.allow_hf32, lambda self, v: setattr(conv, "allow_hf32", v)))]
    if torch.distributed.is_available():
        dist = torch.distributed
        c10d = dist.distributed_c10d
        # device_id binds a process group to one accelerator; the host has none to bind
        backend_map = {"backend": target.backend, "device_id": (lambda d: None) if cpu else target.map}
        init = map_params(c10d.init_process_group, **backend_map)
        group = map_params(c10d.new_group, **backend_map)
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
        special["torch.nn.parallel.DistributedDataParallel"] = [(ddp, "__init__", map_params(ddp.__init__, **ids))]
    else:  # pragma: no cover - every torch wheel we install has torch.distributed
        rows = {n: r for n, r in rows.items() if not n.startswith(("torch.distributed.", "torch.nn.parallel."))}

    from accel.migrate_host import host_names  # the cpu stand-ins, only where they are used

    own = host_names() if cpu else _npu_names(target)
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
            new = refuse(name, target, row.columns[target.kind].split(":", 1)[1].strip())
        elif kind == "object":
            new = _object(row.columns[target.kind])
            if callable(new) and not isinstance(new, type) and not cpu:
                new = map_args(new, target, ints=False, rename=row.npu_keywords, drops=row.npu_drops)
        elif name in own:
            new = own[name]
        else:
            raise AccelError(f"migrate_table.yaml: {name} on {target.name} says {row.columns[target.kind]!r}, "
                             "and accel.migrate has no stand-in of that name")
        if cpu and row.torch_keeps_cpu:
            new = for_scripts(new, getattr(owner, attr))
        add(owner, attr, distinct(attr, new) if owner is torch.cuda else new, name)
    return out


# --- enable / disable ----------------------------------------------------------------------------------

_lock = threading.Lock()
_state: dict[str, Any] = {"target": None, "saved": []}


def _resolve(spec: str | None) -> tuple[str, Target]:
    from accel.targets import parse, select

    explicit = spec or os.environ.get("ACCEL_TARGET")
    if explicit and parse(explicit).backend != "torch":
        source = "" if spec else " (from ACCEL_TARGET)"
        raise UsageError(f"accel.migrate runs torch scripts; target {explicit!r}{source} is not a torch target: "
                         "use torch:cpu, torch:npu or torch:cuda")
    chosen = select(spec)  # raises TargetUnavailable with the reason (e.g. torch_npu missing)
    index = chosen.device.partition(":")[2]
    return str(chosen), Target(chosen.kind, int(index) if index else None)


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
_OWN_FILES = frozenset(str(Path(__file__).with_name(n)) for n in ("migrate.py", "migrate_map.py", "migrate_host.py"))
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
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename not in _OWN_FILES]
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
