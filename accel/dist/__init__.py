"""Collectives over the engines' own libraries, with a timeout on every call.

One set of calls on three engines:

- torch.distributed, the process group's backend chosen per device by torch's multi-device string,
  "cpu:gloo,cuda:nccl,npu:hccl" by default (hccl is registered by torch_npu; devices absent here are
  left out of the string, so a CPU tensor goes to gloo and a CUDA tensor to NCCL in one group);
- MindSpore, `mindspore.communication` with "hccl" on Ascend, "nccl" on GPU and "mccl" (MindSpore's own
  CPU collectives) on CPU;
- XLA, inside `jax.shard_map` over a mesh axis (`XlaCollectives(axis)`): psum, all_gather,
  psum_scatter, all_to_all, ppermute. Several CPU devices come from
  XLA_FLAGS=--xla_force_host_platform_device_count=N, set before jax is imported.

Processes come from the engines' own launchers, never from this module: torchrun (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), msrun (MS_WORKER_NUM, MS_SCHED_HOST, MS_SCHED_PORT, RANK_ID) or
jax.distributed (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). `accel launch` runs the
first two. `init()` reads whichever is set; the rest of this module calls the world it opened.

What each call computes (the NumPy expectations of the conformance cases), identical on every engine:

- all_reduce(x, op): the elementwise sum / avg / max / min over the ranks. avg is the sum divided by
  the world size, rounded toward zero for integer tensors (as NCCL's ncclAvg does for integers).
- all_gather(x, axis=0): every rank's x (one shape on every rank) concatenated along axis, rank order.
- reduce_scatter(x, op, axis=0): the reduction split along axis as np.array_split does (the first
  n % world ranks get one more row): this rank's piece. Under XLA, n must divide by the axis size.
- broadcast(x, src): src's x, on every rank.
- all_to_all(x, axis=0): x split along axis as np.array_split into world pieces, piece j sent to rank
  j; the pieces this rank received, concatenated in rank order.
- send(x, dst) / recv(x, src): point to point; recv returns src's tensor, shaped and typed like x.
  Under XLA one SPMD op does both sides: permute(x, pairs).
- barrier().

torch reduces in place where torch.distributed does (all_reduce, broadcast, recv) and returns the
result; MindSpore and XLA return new tensors. Always use the return value.

Timeouts: every call waits at most `timeout` seconds (init's argument, else ACCEL_DIST_TIMEOUT, else
300). torch: init_process_group(timeout=...) sets gloo's per-operation timeout, which every gloo
collective honours (the call raises; the call path stays raw torch.distributed's), send/recv wait with
`work.wait(timeout)`, and barrier is gloo's monitored_barrier, which names the ranks that did not
arrive; a peer that dies mid-collective closes its sockets and the others fail at once. On NCCL/HCCL
the same timeout arms the process group's watchdog, which aborts the communicator. MindSpore queues
a collective and returns before it has run, so each call is followed by a sync of its executor: a
failure MindSpore reports becomes a CollectiveError there, and since the call cannot be interrupted from
Python, a timer thread ends the rank with a one-line error (exit 124) when it overruns. Either way a
dead rank is an error within the timeout, never a hang.

This module holds the shared surface (`Collectives`), the launch environment and the process-wide
world; each engine is a module of its own (`_torch`, `_mindspore`, `_xla`) that imports its framework
only when called.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from accel.errors import AccelError, UsageError

REDUCE_OPS = ("sum", "avg", "max", "min")
TORCH_BACKENDS = "cpu:gloo,cuda:nccl,npu:hccl"
MINDSPORE_BACKENDS = "cpu:mccl,gpu:nccl,ascend:hccl"
DEFAULT_TIMEOUT = 300.0
TIMEOUT_EXIT_CODE = 124  # a MindSpore rank ended by the watchdog, as timeout(1) exits


class CollectiveError(AccelError):
    """A collective or process-group set-up that failed (a peer gone, a bad launch environment)."""


class CollectiveTimeout(CollectiveError):
    """A collective that did not complete within its timeout."""


# --- the launch environment ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchInfo:
    launcher: str  # torchrun | msrun | jax
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def engine(self) -> str:
        return {"torchrun": "torch", "msrun": "mindspore", "jax": "xla"}[self.launcher]


_LAUNCHERS = {  # launcher -> (rank, world size, local rank, master address, master port) variables
    "torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"),
    "msrun": ("RANK_ID", "MS_WORKER_NUM", "DEVICE_ID", "MS_SCHED_HOST", "MS_SCHED_PORT"),
    "jax": ("JAX_PROCESS_ID", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_COORDINATOR_ADDRESS", ""),
}
_HOW_TO_LAUNCH = "start it with `accel launch --nproc N -- python SCRIPT`, torchrun or msrun"


def launch_info(environ: Mapping[str, str] | None = None) -> LaunchInfo | None:
    """The launcher environment of this process (torchrun's, msrun's or jax.distributed's), None when
    no launcher started it. A partial or inconsistent environment is a CollectiveError."""
    env = os.environ if environ is None else environ
    found = next((name for name, names in _LAUNCHERS.items() if names[1] in env), None)
    if found is None:
        return None
    rank_var, world_var, local_var, addr_var, port_var = _LAUNCHERS[found]
    raw: dict[str, str | None] = {v: env.get(v) for v in (rank_var, world_var, addr_var)}
    if found == "jax":  # one variable, HOST:PORT
        host, _, port_text = (raw[addr_var] or "").rpartition(":")
        raw[addr_var], raw[f"the port in {addr_var}"] = host or None, port_text or None
    else:
        raw[port_var] = env.get(port_var)
    missing = [k for k, v in raw.items() if v is None]
    if missing:
        raise CollectiveError(f"{found} environment incomplete: {', '.join(missing)} not set; {_HOW_TO_LAUNCH}")
    rank_text, world_text, addr, port_text = (str(v) for v in raw.values())
    try:
        rank, world, port = int(rank_text), int(world_text), int(port_text)
        local = int(env.get(local_var) or env.get("LOCAL_RANK") or 0)
    except ValueError:
        raise CollectiveError(f"{found} environment: {rank_var}, {world_var}, {local_var} and the port must be "
                              f"integers, got {rank_text!r}, {world_text!r}, {env.get(local_var)!r}, {port_text!r}") \
            from None
    if world < 1 or not 0 <= rank < world:
        raise CollectiveError(f"{found} environment: rank {rank} is not in 0..{world - 1} ({world_var}={world})")
    return LaunchInfo(found, rank, world, local, addr, port)


def parse_backends(spec: str, kinds: Sequence[str] = ("cpu", "cuda", "npu")) -> dict[str, str]:
    """"cpu:gloo,cuda:nccl" -> {"cpu": "gloo", "cuda": "nccl"}: the collectives library per device kind."""
    out: dict[str, str] = {}
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        kind, sep, lib = item.partition(":")
        if not sep or not kind or not lib:
            raise CollectiveError(f"collectives backend {item!r} is not DEVICE:LIBRARY, e.g. {TORCH_BACKENDS}")
        if kind not in kinds:
            raise CollectiveError(f"collectives backend {item!r}: unknown device {kind!r}; devices: {', '.join(kinds)}")
        out[kind] = lib
    if not out:
        raise CollectiveError(f"collectives backend string {spec!r} names no device; e.g. {TORCH_BACKENDS}")
    return out


def default_timeout() -> float:
    text = os.environ.get("ACCEL_DIST_TIMEOUT")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_TIMEOUT:  # inf and nan too: a timedelta cannot hold them
        raise CollectiveError(f"ACCEL_DIST_TIMEOUT={text[:40]!r} is not a number of seconds in (0, {MAX_TIMEOUT:g}]")
    return value


MAX_TIMEOUT = 7 * 24 * 3600.0  # a week: longer is a mistake, and timedelta and gloo's milliseconds hold it


def _message(e: BaseException) -> str:
    """The gist of a library's error: its first line, without a C++ source location in brackets and
    after its first sentence ("Connection closed by peer [host]:port. This is typically ...")."""
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", line)
    return re.split(r"\.\s+(?=[A-Z])", line, maxsplit=1)[0].rstrip(".")[:200]


def split_sizes(n: int, parts: int) -> list[int]:
    """np.array_split's piece sizes: the first n % parts pieces one longer."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def _check_partition(groups: Sequence[Sequence[int]], world: int) -> None:
    flat = sorted(r for g in groups for r in g)
    if flat != list(range(world)):
        raise CollectiveError(f"groups {[list(g) for g in groups]} do not partition the ranks 0..{world - 1}")


# --- the shared surface -------------------------------------------------------------------------------


class Collectives(ABC):
    """The calls every engine offers; see the module docstring for what each computes."""

    engine: str = ""
    rank: Any = 0
    world_size: int = 1
    timeout: float = DEFAULT_TIMEOUT

    @abstractmethod
    def all_reduce(self, x: Any, op: str = "sum") -> Any:
        ...

    @abstractmethod
    def all_gather(self, x: Any, axis: int = 0) -> Any:
        ...

    @abstractmethod
    def reduce_scatter(self, x: Any, op: str = "sum", axis: int = 0) -> Any:
        ...

    @abstractmethod
    def broadcast(self, x: Any, src: int = 0) -> Any:
        ...

    @abstractmethod
    def all_to_all(self, x: Any, axis: int = 0) -> Any:
        ...

    @abstractmethod
    def barrier(self) -> None:
        ...

    def send(self, x: Any, dst: int) -> None:
        raise UsageError(f"{self.engine} collectives have no one-sided send; exchange with permute instead")

    def recv(self, x: Any, src: int) -> Any:
        raise UsageError(f"{self.engine} collectives have no one-sided recv; exchange with permute instead")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} rank {self.rank} of {self.world_size}>"

    # argument checks shared by the engines
    def _op(self, op: str) -> str:
        if op not in REDUCE_OPS:
            raise CollectiveError(f"unknown reduction {op!r}; one of {', '.join(REDUCE_OPS)}")
        return op

    def _peer(self, peer: int, what: str) -> int:
        if not isinstance(peer, int) or not 0 <= peer < self.world_size:
            raise CollectiveError(f"{what} rank {peer!r} is not in 0..{self.world_size - 1}")
        if what in ("send to", "receive from") and peer == self.rank:
            raise CollectiveError(f"rank {self.rank} cannot {what} itself")
        return peer

    def _timed_out(self, what: str) -> CollectiveTimeout:
        return CollectiveTimeout(f"{what} did not complete within {self.timeout:g} s on rank {self.rank} of "
                                 f"{self.world_size}: a peer rank died or hangs (see its log); ACCEL_DIST_TIMEOUT "
                                 "sets the limit")


# --- the process-wide world ---------------------------------------------------------------------------

_WORLD: Collectives | None = None
_INIT: dict[str, Callable[..., Collectives]] = {
    "torch": lambda info, backend, timeout, axis: _init_torch(info, backend, timeout),
    "mindspore": lambda info, backend, timeout, axis: _init_mindspore(info, backend, timeout),
    "xla": lambda info, backend, timeout, axis: _init_jax(info, timeout, axis),
}


def init(backend: str | None = None, *, timeout: float | None = None, engine: str | None = None,
         axis: str = "ranks") -> Collectives:
    """Opens this rank's world from its launcher's environment and makes it the one the module-level
    calls use. `backend`: the library per device ("cpu:gloo,cuda:nccl,npu:hccl" for torch, the
    default; "cpu:mccl,gpu:nccl,ascend:hccl" for MindSpore). `engine`: torch | mindspore | xla, by
    default the launcher's (torchrun -> torch, msrun -> mindspore, jax.distributed -> xla). `axis`:
    the mesh axis name of the XLA collectives. A script that opened its own torch process group keeps
    it (and its timeout). In msrun's scheduler process, which runs the script too, init() serves as
    MindSpore's scheduler and ends the process with the job."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    info = launch_info()
    if info is None:
        raise CollectiveError(f"no launcher environment (RANK/WORLD_SIZE, MS_WORKER_NUM, JAX_NUM_PROCESSES): "
                              f"{_HOW_TO_LAUNCH}")
    engine = engine or info.engine
    if engine not in _INIT:
        raise CollectiveError(f"unknown collectives engine {engine!r}; one of {', '.join(_INIT)}")
    _WORLD = _INIT[engine](info, backend, timeout if timeout is not None else default_timeout(), axis)
    return _WORLD


def world() -> Collectives:
    if _WORLD is None:
        raise CollectiveError("accel.dist.init() has not been called in this process")
    return _WORLD


def is_initialized() -> bool:
    return _WORLD is not None


def shutdown() -> None:
    """Closes the torch process group (other engines keep theirs until the process ends)."""
    global _WORLD
    if isinstance(_WORLD, TorchCollectives):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _WORLD = None


def all_reduce(x: Any, op: str = "sum") -> Any:
    return (_WORLD or world()).all_reduce(x, op)


def all_gather(x: Any, axis: int = 0) -> Any:
    return world().all_gather(x, axis)


def reduce_scatter(x: Any, op: str = "sum", axis: int = 0) -> Any:
    return world().reduce_scatter(x, op, axis)


def broadcast(x: Any, src: int = 0) -> Any:
    return world().broadcast(x, src)


def all_to_all(x: Any, axis: int = 0) -> Any:
    return world().all_to_all(x, axis)


def barrier() -> None:
    world().barrier()


def send(x: Any, dst: int) -> None:
    world().send(x, dst)


def recv(x: Any, src: int) -> Any:
    return world().recv(x, src)


from accel.dist._mindspore import MindSporeCollectives, _init_mindspore  # noqa: E402
from accel.dist._torch import TorchCollectives, _init_torch  # noqa: E402
from accel.dist._xla import XlaCollectives, _init_jax  # noqa: E402

__all__ = ["REDUCE_OPS", "CollectiveError", "CollectiveTimeout", "Collectives", "LaunchInfo", "MindSporeCollectives",
           "TorchCollectives", "XlaCollectives", "all_gather", "all_reduce", "all_to_all", "barrier",
           "broadcast", "default_timeout", "init", "is_initialized", "launch_info", "parse_backends", "recv",
           "reduce_scatter", "send", "shutdown", "split_sizes", "world"]
