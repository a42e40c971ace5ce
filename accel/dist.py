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
the same timeout arms the process group's watchdog, which aborts the communicator. MindSpore
collectives cannot be interrupted from Python, so a watchdog thread ends the rank with a one-line error
when a call overruns. Either way a dead rank is an error within the timeout, never a hang.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
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
    if value <= 0:
        raise CollectiveError(f"ACCEL_DIST_TIMEOUT={text!r} is not a positive number of seconds")
    return value


def _message(e: BaseException) -> str:
    """The gist of a library's error: its first line, without a C++ source location in brackets and
    after its first sentence ("Connection closed by peer [host]:port. This is typically ...")."""
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", line)
    return re.split(r"\.\s+(?=[A-Z])", line, maxsplit=1)[0].rstrip(".")[:200]


def split_sizes(n: int, parts: int) -> list[int]:
    """np.array_split's piece sizes: the first n % parts pieces one longer."""
    return [n // parts + (i < n % parts) for i in range(parts)]


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


# --- torch.distributed --------------------------------------------------------------------------------


class TorchCollectives(Collectives):
    """A torch.distributed process group (gloo / NCCL / HCCL per device)."""

    engine = "torch"

    def __init__(self, group: Any, backends: Mapping[str, str], device: str, timeout: float,
                 local_rank: int = 0):
        import torch.distributed as dist

        self._dist = dist
        # newer torch renamed the tensor-in, tensor-out forms (2.13 warns on the old names); older has only those
        self._gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        self.group = group
        self.backends = dict(backends)
        self.device = device  # this rank's compute device: "cpu", "cuda:1", "npu:0"
        self.timeout = timeout
        self._delta = timedelta(seconds=timeout)
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.local_rank = local_rank
        ops = dist.ReduceOp
        self._reduce_ops = {"sum": ops.SUM, "max": ops.MAX, "min": ops.MIN}

    # -- plumbing
    def _run(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """A collective as torch.distributed runs it, bounded by the process group's timeout (gloo's
        per-operation timeout; NCCL's watchdog), its failures turned into CollectiveErrors. The same
        call path as raw torch.distributed: no extra thread hand-off or copy."""
        try:
            fn(*args, group=self.group, **kwargs)
        except RuntimeError as e:
            raise self._failure(what, e) from None

    def _wait(self, work: Any, what: str) -> None:
        """A point-to-point request, waited on with the timeout explicitly."""
        try:
            done = work.wait(timeout=self._delta)
        except RuntimeError as e:
            raise self._failure(what, e) from None
        if done is False:
            raise self._timed_out(what)

    def _failure(self, what: str, e: BaseException) -> CollectiveError:
        text = _message(e)
        if "timed out" in text.lower() or "timeout" in text.lower():
            return self._timed_out(what)
        return CollectiveError(f"{what} failed on rank {self.rank} of {self.world_size}: {text}; a peer rank "
                               "may have died (see its log)")

    def _reduce(self, op: str, x: Any) -> tuple[Any, bool]:
        """(torch ReduceOp, whether avg still needs the division)."""
        if op != "avg":
            return self._reduce_ops[op], False
        # native AVG only where the library has it for the dtype (NCCL, floats); gloo's AVG rejects
        # integers, so elsewhere avg is a sum then one division
        if self.backends.get(x.device.type) == "nccl" and x.is_floating_point():
            return self._dist.ReduceOp.AVG, False
        return self._reduce_ops["sum"], True

    def _divide(self, x: Any) -> Any:
        if x.is_floating_point():
            return x.div_(self.world_size)
        return x.div_(self.world_size, rounding_mode="trunc")

    @staticmethod
    def _padded(x0: Any, sizes: list[int]) -> Any:
        """x0 (n, ...) split by `sizes` with every piece zero-padded to the longest: (len(sizes) * m, ...)."""
        m = sizes[0]
        if all(s == m for s in sizes):
            return x0.contiguous()
        out = x0.new_zeros((len(sizes) * m, *x0.shape[1:]))
        start = 0
        for i, s in enumerate(sizes):
            out[i * m: i * m + s] = x0[start: start + s]
            start += s
        return out

    # -- the calls
    def all_reduce(self, x: Any, op: str = "sum") -> Any:
        reduce_op = self._reduce_ops.get(op)
        if reduce_op is None:  # avg, or not an op
            reduce_op, divide = self._reduce(self._op(op), x)
        else:
            divide = False
        try:  # written out, not through _run: this is the call on every training step's path
            self._dist.all_reduce(x, op=reduce_op, group=self.group)
        except RuntimeError as e:
            raise self._failure(f"all_reduce({op})", e) from None
        return self._divide(x) if divide else x

    def all_gather(self, x: Any, axis: int = 0) -> Any:
        x0 = (x.reshape(1) if x.dim() == 0 else x.movedim(axis, 0)).contiguous()
        out = x0.new_empty((self.world_size * x0.shape[0], *x0.shape[1:]))
        self._run("all_gather", self._gather, out, x0)
        return out if x.dim() == 0 else out.movedim(0, axis)

    def reduce_scatter(self, x: Any, op: str = "sum", axis: int = 0) -> Any:
        reduce_op, divide = self._reduce(self._op(op), x)
        x0 = x.movedim(axis, 0)
        sizes = split_sizes(x0.shape[0], self.world_size)
        out = x0.new_empty((sizes[0], *x0.shape[1:]))
        self._run(f"reduce_scatter({op})", self._scatter, out, self._padded(x0, sizes), op=reduce_op)
        out = out[: sizes[self.rank]]
        return (self._divide(out) if divide else out).movedim(0, axis)

    def broadcast(self, x: Any, src: int = 0) -> Any:
        src = self._peer(src, "broadcast source")
        self._run(f"broadcast from rank {src}", self._dist.broadcast, x, src=src)
        return x

    def all_to_all(self, x: Any, axis: int = 0) -> Any:
        x0 = x.movedim(axis, 0)
        sizes = split_sizes(x0.shape[0], self.world_size)
        m, mine = sizes[0], sizes[self.rank]
        out = x0.new_empty((self.world_size * m, *x0.shape[1:]))
        self._run("all_to_all", self._dist.all_to_all_single, out, self._padded(x0, sizes))
        out = out.reshape(self.world_size, m, *x0.shape[1:])[:, :mine].reshape(self.world_size * mine, *x0.shape[1:])
        return out.movedim(0, axis)

    def barrier(self) -> None:
        if self.device == "cpu" and self.backends.get("cpu") == "gloo":
            try:  # names the ranks that did not arrive
                self._dist.monitored_barrier(group=self.group, timeout=self._delta, wait_all_ranks=True)
            except RuntimeError as e:
                raise CollectiveTimeout(f"barrier on rank {self.rank} of {self.world_size}: {_message(e)}") from None
            return
        import torch

        flag = torch.zeros(1, device=self.device)
        self._run("barrier", self._dist.all_reduce, flag)

    def send(self, x: Any, dst: int) -> None:
        dst = self._peer(dst, "send to")
        self._wait(self._dist.isend(x.contiguous(), dst=dst, group=self.group), f"send to rank {dst}")

    def recv(self, x: Any, src: int) -> Any:
        src = self._peer(src, "receive from")
        self._wait(self._dist.irecv(x, src=src, group=self.group), f"recv from rank {src}")
        return x

    def subgroup(self, groups: Sequence[Sequence[int]]) -> TorchCollectives:
        """The collectives of this rank's group among `groups` (a partition of the ranks, e.g. the
        tensor-parallel groups of a tp x dp grid). Every rank calls it with the same `groups`."""
        _check_partition(groups, self.world_size)
        mine = None
        for ranks in groups:  # torch wants every rank to create every group, in one order
            pg = self._dist.new_group(list(ranks), timeout=self._delta)
            if self.rank in ranks:
                mine = pg
        return TorchCollectives(mine, self.backends, self.device, self.timeout, self.local_rank)


def _check_partition(groups: Sequence[Sequence[int]], world: int) -> None:
    flat = sorted(r for g in groups for r in g)
    if flat != list(range(world)):
        raise CollectiveError(f"groups {[list(g) for g in groups]} do not partition the ranks 0..{world - 1}")


def _torch_device_available(torch: Any, kind: str) -> bool:
    if kind == "cpu":
        return True
    if kind == "cuda":
        return bool(torch.cuda.is_available())
    if kind == "npu":
        try:
            import torch_npu  # noqa: F401 - registers the npu device and the hccl backend
        except Exception:
            return False
        return bool(torch.npu.is_available())
    return False


def _init_torch(info: LaunchInfo, backend: str | None, timeout: float) -> TorchCollectives:
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # torch_npu is imported by us, for npu only
    import torch
    import torch.distributed as dist

    wanted = parse_backends(backend or TORCH_BACKENDS)
    here = {kind: lib for kind, lib in wanted.items() if _torch_device_available(torch, kind)}
    if not here:
        raise CollectiveError(f"none of the devices in {backend!r} is available here; cpu:gloo always is")
    kind = next(k for k in ("npu", "cuda", "cpu") if k in here)
    device = "cpu" if kind == "cpu" else f"{kind}:{info.local_rank}"
    if kind != "cpu":
        getattr(torch, kind).set_device(info.local_rank)
    if dist.is_initialized():  # the script opened its own process group: use it
        return TorchCollectives(None, here, device, timeout, info.local_rank)
    # one device: the plain library name (gloo's monitored_barrier wants a pure gloo group)
    spec = next(iter(here.values())) if len(here) == 1 else ",".join(f"{k}:{lib}" for k, lib in here.items())
    try:
        dist.init_process_group(spec, init_method="env://", timeout=timedelta(seconds=timeout),
                                rank=info.rank, world_size=info.world_size)
    except (RuntimeError, ValueError) as e:
        raise _init_failure(info, timeout, e) from None
    return TorchCollectives(None, here, device, timeout, info.local_rank)


def _init_failure(info: LaunchInfo, timeout: float, e: BaseException) -> CollectiveError:
    text = _message(e)
    where = f"rank {info.rank} of {info.world_size} ({info.launcher}, master {info.master_addr}:{info.master_port})"
    name = type(e).__name__
    if "clients joined" in text or name == "DistStoreError":
        return CollectiveTimeout(f"process group set-up timed out after {timeout:g} s on {where}: {text}; did every "
                                 "rank start, and is the world size right?")
    if name == "DistNetworkError":
        return CollectiveError(f"cannot reach the master from {where} within {timeout:g} s: {text}; check "
                               "MASTER_ADDR/MASTER_PORT and that rank 0 runs")
    return CollectiveError(f"process group set-up failed on {where}: {text}")


# --- MindSpore ----------------------------------------------------------------------------------------


class _Watchdog:
    """Ends the process with a one-line error when the body overruns: MindSpore's collectives block in
    C++ and cannot be interrupted from Python."""

    def __init__(self, owner: Collectives, what: str):
        self.owner, self.what = owner, what

    def __enter__(self) -> None:
        self.timer = threading.Timer(self.owner.timeout, self._fire)
        self.timer.daemon = True
        self.timer.start()

    def __exit__(self, *exc: Any) -> None:
        self.timer.cancel()

    def _fire(self) -> None:
        sys.stderr.write(f"accel.dist: error: {self.owner._timed_out(self.what)}; ending this rank\n")
        sys.stderr.flush()
        os._exit(TIMEOUT_EXIT_CODE)


class MindSporeCollectives(Collectives):
    """mindspore.communication's world group. On CPU (mccl) MindSpore 2.10 has kernels for AllReduce,
    AllGather and Broadcast only: reduce_scatter is an all_reduce and a slice, all_to_all an all_gather
    and a slice, and send/recv a broadcast inside a two-rank group."""

    engine = "mindspore"

    def __init__(self, library: str, timeout: float, group: str | None = None, ranks: Sequence[int] | None = None):
        from mindspore import communication as comm
        from mindspore import ops
        from mindspore.mint import distributed as mdist

        self._comm, self._ops, self._mdist = comm, ops, mdist
        self.library = library
        self.group = group or comm.GlobalComm.WORLD_COMM_GROUP
        self.rank = comm.get_rank(self.group)
        self.world_size = comm.get_group_size(self.group)
        # MindSpore names ranks globally in broadcast, send and create_group: this group's rank i is _ranks[i]
        self._ranks = list(ranks) if ranks is not None else list(range(self.world_size))
        self.timeout = timeout
        self._native = library != "mccl"
        self._gather = ops.AllGather(group=self.group)
        self._pairs: dict[tuple[int, int], str] = {}

    def _moved(self, x: Any, axis: int) -> Any:
        return x if axis == 0 else self._ops.moveaxis(x, axis, 0)

    def _back(self, x: Any, axis: int) -> Any:
        return x if axis == 0 else self._ops.moveaxis(x, 0, axis)

    def _divide(self, x: Any) -> Any:
        if x.is_floating_point():
            return self._ops.div(x, self.world_size)
        return self._ops.div(x, self.world_size, rounding_mode="trunc")

    def all_reduce(self, x: Any, op: str = "sum") -> Any:
        op = self._op(op)
        x = x.copy()  # mint's all_reduce works in place: leave the caller's tensor alone
        with _Watchdog(self, f"all_reduce({op})"):
            self._mdist.all_reduce(x, op="sum" if op == "avg" else op, group=self.group)
        return self._divide(x) if op == "avg" else x

    def all_gather(self, x: Any, axis: int = 0) -> Any:
        scalar = x.ndim == 0
        with _Watchdog(self, "all_gather"):
            out = self._gather(x.reshape(1) if scalar else self._moved(x, axis))
        return out if scalar else self._back(out, axis)

    def reduce_scatter(self, x: Any, op: str = "sum", axis: int = 0) -> Any:
        x0 = self._moved(x, axis)
        sizes = split_sizes(x0.shape[0], self.world_size)
        start = sum(sizes[: self.rank])
        total = self.all_reduce(x0, op)  # no ReduceScatter kernel on CPU; on Ascend HCCL runs the all_reduce
        return self._back(total[start: start + sizes[self.rank]], axis)

    def broadcast(self, x: Any, src: int = 0) -> Any:
        src = self._peer(src, "broadcast source")
        x = x.copy()
        with _Watchdog(self, f"broadcast from rank {src}"):
            self._mdist.broadcast(x, src=self._ranks[src], group=self.group)
        return x

    def all_to_all(self, x: Any, axis: int = 0) -> Any:
        x0 = self._moved(x, axis)
        n = x0.shape[0]
        sizes = split_sizes(n, self.world_size)
        start, mine = sum(sizes[: self.rank]), sizes[self.rank]
        everyone = self.all_gather(x0)  # (world * n, ...): rank i's x at rows i*n ..
        pieces = [everyone[i * n + start: i * n + start + mine] for i in range(self.world_size)]
        return self._back(self._ops.concat(pieces, 0), axis)

    def barrier(self) -> None:
        with _Watchdog(self, "barrier"):
            self._mdist.barrier(group=self.group)

    def _pair(self, a: int, b: int) -> str:
        key = (min(self._ranks[a], self._ranks[b]), max(self._ranks[a], self._ranks[b]))
        if key not in self._pairs:  # both ends of a send/recv reach here together, so both create it
            name = f"accel_p2p_{key[0]}_{key[1]}"
            with _Watchdog(self, f"creating the group of ranks {key}"):
                self._comm.create_group(name, list(key))
            self._pairs[key] = name
        return self._pairs[key]

    def send(self, x: Any, dst: int) -> None:
        dst = self._peer(dst, "send to")
        with _Watchdog(self, f"send to rank {dst}"):
            if self._native:
                self._mdist.send(x, dst=self._ranks[dst], group=self.group)
            else:
                self._mdist.broadcast(x.copy(), src=self._ranks[self.rank], group=self._pair(self.rank, dst))

    def recv(self, x: Any, src: int) -> Any:
        src = self._peer(src, "receive from")
        x = x.copy()
        with _Watchdog(self, f"recv from rank {src}"):
            if self._native:
                self._mdist.recv(x, src=self._ranks[src], group=self.group)
            else:
                self._mdist.broadcast(x, src=self._ranks[src], group=self._pair(self.rank, src))
        return x

    def subgroup(self, groups: Sequence[Sequence[int]]) -> MindSporeCollectives:
        """The collectives of this rank's group among `groups` (a partition of the ranks); only the
        members create a MindSpore group."""
        _check_partition(groups, self.world_size)
        mine = [self._ranks[r] for r in next(g for g in groups if self.rank in g)]
        name = "accel_group_" + "_".join(map(str, mine))
        with _Watchdog(self, f"creating the group of ranks {mine}"):
            self._comm.create_group(name, mine)
        return MindSporeCollectives(self.library, self.timeout, name, mine)


def _init_mindspore(info: LaunchInfo, backend: str | None, timeout: float) -> MindSporeCollectives:
    import mindspore as ms
    from mindspore import communication as comm

    wanted = parse_backends(backend or MINDSPORE_BACKENDS, ("cpu", "gpu", "ascend"))
    target = str(ms.get_context("device_target")).lower()
    if target not in wanted:
        raise CollectiveError(f"MindSpore runs on {target} here, and the collectives backend string names no "
                              f"library for it ({backend or MINDSPORE_BACKENDS})")
    if os.environ.get("MS_ROLE") == "MS_SCHED":
        # msrun runs the script in its scheduler process too, where MindSpore's init is the scheduler:
        # it serves the workers and ends the process with the job
        comm.init(wanted[target])
        sys.exit(0)
    try:  # joining the cluster is bounded by msrun's own --cluster_time_out (MS_TOPO_TIMEOUT)
        comm.init(wanted[target])
    except RuntimeError as e:
        text = _message(e)
        raise CollectiveError(f"MindSpore communication init ({wanted[target]}) failed on rank {info.rank} of "
                              f"{info.world_size}: {text}") from None
    return MindSporeCollectives(wanted[target], timeout)


# --- XLA (inside jax.shard_map) -------------------------------------------------------------------------


class XlaCollectives(Collectives):
    """Collectives over the mesh axis `axis` of the jax.shard_map being traced. An SPMD program has one
    shape on every device, so reduce_scatter and all_to_all need the split dim to divide by the axis
    size, and point to point is one `permute`. A single-process mesh cannot lose a device; across
    processes jax.distributed's heartbeat (init's timeout) ends the job when one dies."""

    engine = "xla"

    def __init__(self, axis: str, timeout: float = DEFAULT_TIMEOUT):
        from jax import lax

        self._lax = lax
        self.axis = axis
        self.timeout = timeout

    @property
    def rank(self) -> Any:  # type: ignore[override]
        return self._lax.axis_index(self.axis)

    @property
    def world_size(self) -> int:  # type: ignore[override]
        return int(self._lax.axis_size(self.axis))

    def _even(self, n: int, what: str) -> None:
        if n % self.world_size:
            raise CollectiveError(f"{what} under XLA needs the split dim ({n}) to divide by the axis size "
                                  f"({self.world_size}): an SPMD program has one shape on every device")

    def all_reduce(self, x: Any, op: str = "sum") -> Any:
        op = self._op(op)
        lax = self._lax
        if op == "max":
            return lax.pmax(x, self.axis)
        if op == "min":
            return lax.pmin(x, self.axis)
        total = lax.psum(x, self.axis)
        return _xla_divide(total, self.world_size) if op == "avg" else total

    def all_gather(self, x: Any, axis: int = 0) -> Any:
        if x.ndim == 0:
            return self._lax.all_gather(x, self.axis)
        return self._lax.all_gather(x, self.axis, axis=axis, tiled=True)

    def reduce_scatter(self, x: Any, op: str = "sum", axis: int = 0) -> Any:
        op = self._op(op)
        self._even(x.shape[axis], "reduce_scatter")
        if op in ("sum", "avg"):
            out = self._lax.psum_scatter(x, self.axis, scatter_dimension=axis, tiled=True)
            return _xla_divide(out, self.world_size) if op == "avg" else out
        total = self.all_reduce(x, op)  # XLA has no max/min reduce-scatter
        n = x.shape[axis] // self.world_size
        return self._lax.dynamic_slice_in_dim(total, self.rank * n, n, axis)

    def broadcast(self, x: Any, src: int = 0) -> Any:
        src = self._peer(src, "broadcast source")
        return self._lax.all_gather(x, self.axis)[src]  # exact for every dtype, unlike a masked psum

    def all_to_all(self, x: Any, axis: int = 0) -> Any:
        self._even(x.shape[axis], "all_to_all")
        return self._lax.all_to_all(x, self.axis, split_axis=axis, concat_axis=axis, tiled=True)

    def barrier(self) -> None:
        """Nothing to wait for: the devices of one SPMD program step together."""

    def permute(self, x: Any, pairs: Sequence[tuple[int, int]]) -> Any:
        """x of rank src arrives on rank dst for each (src, dst); ranks that receive nothing get zeros."""
        return self._lax.ppermute(x, self.axis, perm=list(pairs))


def _xla_divide(x: Any, n: int) -> Any:
    import jax.numpy as jnp
    from jax import lax

    # lax.div rounds integers toward zero, the rule of the other engines
    return x / n if jnp.issubdtype(x.dtype, jnp.floating) else lax.div(x, jnp.asarray(n, x.dtype))


def _init_jax(info: LaunchInfo, timeout: float, axis: str) -> XlaCollectives:
    import jax

    if info.world_size > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices across processes
        try:
            jax.distributed.initialize(f"{info.master_addr}:{info.master_port}", info.world_size, info.rank,
                                       initialization_timeout=int(timeout), heartbeat_timeout_seconds=int(timeout))
        except Exception as e:
            text = _message(e)
            raise CollectiveError(f"jax.distributed.initialize failed on process {info.rank} of {info.world_size} "
                                  f"(coordinator {info.master_addr}:{info.master_port}): {text}") from None
    return XlaCollectives(axis, timeout)


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
