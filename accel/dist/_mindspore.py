"""accel.dist on mindspore.communication, with a watchdog: MindSpore's collectives cannot be
interrupted from Python."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

from accel.dist import (
    MINDSPORE_BACKENDS,
    TIMEOUT_EXIT_CODE,
    CollectiveError,
    Collectives,
    LaunchInfo,
    _check_partition,
    _message,
    parse_backends,
    split_sizes,
)


class _Bounded:
    """One collective, bounded: MindSpore queues the call and returns at once (a failure surfaced later,
    from whatever next read the tensor, ~30 s after a peer stopped answering), so the body is followed
    by a sync of MindSpore's executor inside the bound: `_pynative_executor.sync()`, private, because
    the public `mindspore.runtime.synchronize()` does not support the CPU device. A MindSpore failure
    becomes a CollectiveError; an overrun ends the process with a one-line error, since the call blocks
    in C++ and cannot be interrupted from Python."""

    def __init__(self, owner: Collectives, what: str):
        self.owner, self.what = owner, what

    def __enter__(self) -> None:
        self.timer = threading.Timer(self.owner.timeout, self._fire)
        self.timer.daemon = True
        self.timer.start()

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None, tb: Any) -> None:
        try:
            if kind is None:
                from mindspore.common.api import _pynative_executor

                try:
                    _pynative_executor.sync()
                except RuntimeError as failed:
                    e = failed
            if isinstance(e, RuntimeError):
                raise CollectiveError(f"{self.what} failed on rank {self.owner.rank} of {self.owner.world_size}: "
                                      f"{_message(e)}; a peer rank may have died or hangs (see its log)") from None
        finally:
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
        with _Bounded(self, f"all_reduce({op})"):
            self._mdist.all_reduce(x, op="sum" if op == "avg" else op, group=self.group)
        return self._divide(x) if op == "avg" else x

    def all_gather(self, x: Any, axis: int = 0) -> Any:
        scalar = x.ndim == 0
        with _Bounded(self, "all_gather"):
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
        with _Bounded(self, f"broadcast from rank {src}"):
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
        with _Bounded(self, "barrier"):
            self._mdist.barrier(group=self.group)

    def _pair(self, a: int, b: int) -> str:
        key = (min(self._ranks[a], self._ranks[b]), max(self._ranks[a], self._ranks[b]))
        if key not in self._pairs:  # both ends of a send/recv reach here together, so both create it
            name = f"accel_p2p_{key[0]}_{key[1]}"
            with _Bounded(self, f"creating the group of ranks {key}"):
                self._comm.create_group(name, list(key))
            self._pairs[key] = name
        return self._pairs[key]

    def send(self, x: Any, dst: int) -> None:
        dst = self._peer(dst, "send to")
        with _Bounded(self, f"send to rank {dst}"):
            if self._native:
                self._mdist.send(x, dst=self._ranks[dst], group=self.group)
            else:
                self._mdist.broadcast(x.copy(), src=self._ranks[self.rank], group=self._pair(self.rank, dst))

    def recv(self, x: Any, src: int) -> Any:
        src = self._peer(src, "receive from")
        x = x.copy()
        with _Bounded(self, f"recv from rank {src}"):
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
        with _Bounded(self, f"creating the group of ranks {mine}"):
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
        # it serves the workers and ends the process with the job (failed when a worker did)
        try:
            comm.init(wanted[target])
        except RuntimeError as e:
            sys.stderr.write(f"accel.dist: error: MindSpore's scheduler ended the job: {_message(e)}\n")
            sys.exit(1)
        sys.exit(0)
    try:  # joining the cluster is bounded by msrun's own --cluster_time_out (MS_TOPO_TIMEOUT)
        comm.init(wanted[target])
    except RuntimeError as e:
        text = _message(e)
        raise CollectiveError(f"MindSpore communication init ({wanted[target]}) failed on rank {info.rank} of "
                              f"{info.world_size}: {text}") from None
    return MindSporeCollectives(wanted[target], timeout)
