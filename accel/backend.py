"""The Backend contract. One file per backend in `backends/` implements it; nothing else in the tree
needs to change to add one (register it in `accel.registry` or through the `accel.backends` entry-point
group)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from accel.errors import AccelError, UnsupportedDtype
from accel.routing import Impl, Ops, build_ops


@dataclass(frozen=True)
class Capabilities:
    dtypes: tuple[str, ...]
    training: bool
    collectives: str | None = None  # the process-group backend this device uses ("gloo", "nccl", "hccl")
    compiled: bool = False
    fused_ops: tuple[str, ...] = ()  # ops routed to a vendor fused kernel by default
    versions: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    name: ClassVar[str]
    device_kinds: ClassVar[tuple[str, ...]]  # "cpu", "cuda", ... (an index may follow: "cuda:1")
    device: str
    ops: Ops

    @classmethod
    def probe(cls, device: str) -> str | None:
        """None when `device` can run here, else the reason it cannot."""
        ...

    def capabilities(self) -> Capabilities: ...

    def asarray(self, a: np.ndarray, dtype: str | None = None) -> Any: ...

    def to_numpy(self, x: Any) -> np.ndarray: ...

    def compile(self, fn: Callable[..., Any]) -> Callable[..., Any]: ...

    def value_and_grad(self, fn: Callable[..., Any]) -> Callable[..., Any]: ...


class BackendBase(ABC):
    """Shared plumbing: builds the routed `ops` from `implementations()` and a policy, checks dtypes.
    Subclasses provide `probe`, `implementations`, `capabilities`, `asarray`, `to_numpy`."""

    name: ClassVar[str] = ""
    device_kinds: ClassVar[tuple[str, ...]] = ()

    def __init__(self, device: str, policy: Mapping[str, str] | None = None):
        self.device = device
        self.ops = build_ops(self, self.implementations(), policy or {}, self.target)

    @property
    def target(self) -> str:
        return f"{self.name}:{self.device}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.target}>"

    @abstractmethod
    def implementations(self) -> dict[str, list[Impl]]:
        ...

    @abstractmethod
    def capabilities(self) -> Capabilities:
        ...

    def check_dtype(self, dtype: str) -> str:
        supported = self.capabilities().dtypes
        if dtype not in supported:
            raise UnsupportedDtype(f"{self.target} does not support {dtype}; it supports {', '.join(supported)}")
        return dtype

    def compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return fn

    def value_and_grad(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        raise AccelError(f"{self.target} cannot train (no value_and_grad); pick a target whose `accel targets` "
                         "row says train: yes")


def impls(**variants: Callable[..., Any] | tuple[Callable[..., Any], str | None]) -> list[Impl]:
    """Ranked implementations of one op, best first: `impls(fused=(fn, reason_or_None), composite=fn)`."""
    out = []
    for variant, value in variants.items():
        fn, unavailable = value if isinstance(value, tuple) else (value, None)
        out.append(Impl(variant, fn, unavailable))
    return out
