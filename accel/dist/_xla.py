"""accel.dist inside jax.shard_map: the collectives of one mesh axis."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from accel.dist import (
    DEFAULT_TIMEOUT,
    CollectiveError,
    Collectives,
    LaunchInfo,
    _message,
)


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
