"""accel.dist on torch.distributed: gloo on CPU, NCCL on CUDA, HCCL on Ascend (torch_npu), in one
process group."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

from accel.dist import (
    TORCH_BACKENDS,
    CollectiveError,
    Collectives,
    CollectiveTimeout,
    LaunchInfo,
    _check_partition,
    _message,
    parse_backends,
    split_sizes,
)


class TorchCollectives(Collectives):
    """A torch.distributed process group (gloo / NCCL / HCCL per device)."""

    engine = "torch"

    def __init__(self, group: Any, backends: Mapping[str, str], device: str, timeout: float,
                 local_rank: int = 0, owned: bool = False):
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
        self.owned = owned  # accel.dist opened the process group, so it may close it
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
            self._close()
            raise self._timed_out(what)

    def _failure(self, what: str, e: BaseException) -> CollectiveError:
        self._close()
        text = _message(e)
        if "timed out" in text.lower() or "timeout" in text.lower():
            return self._timed_out(what)
        return CollectiveError(f"{what} failed on rank {self.rank} of {self.world_size}: {text}; a peer rank "
                               "may have died (see its log)")

    def _close(self) -> None:
        """After a failed collective the process group cannot be used again; left open, gloo's threads
        still waiting on the lost peer abort the process as it exits (SIGABRT, "terminate called
        without an active exception") in about one run in four, instead of the exit code the caller
        chose. A group this module opened is closed here, so the rank ends the way its script says."""
        if self.owned and self._dist.is_initialized():
            try:
                self._dist.destroy_process_group()
            except (RuntimeError, ValueError):
                pass

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
                self._close()
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
        return TorchCollectives(mine, self.backends, self.device, self.timeout, self.local_rank, self.owned)




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
    return TorchCollectives(None, here, device, timeout, info.local_rank, owned=True)


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
