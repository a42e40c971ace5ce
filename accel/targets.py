"""Targets: BACKEND:DEVICE strings (`torch:cpu`, `torch:cuda:1`, `numpy:cpu`, ...), their discovery,
availability (with the reason when unavailable) and selection.

Selection order: explicit argument > ACCEL_TARGET > the first available of npu, cuda, cpu (torch).
An explicitly requested target that cannot run here is an error naming why, never a fallback.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from accel import registry
from accel.errors import BackendUnavailable, TargetUnavailable, UnknownTarget

PROBE_ORDER = ("torch:npu", "torch:cuda", "torch:cpu")


@dataclass(frozen=True)
class Target:
    backend: str
    device: str  # kind with an optional index: "cpu", "cuda", "cuda:1"

    @property
    def kind(self) -> str:
        return self.device.partition(":")[0]

    def __str__(self) -> str:
        return f"{self.backend}:{self.device}"


def parse(spec: str) -> Target:
    spec = spec.strip()
    backend, sep, device = spec.partition(":")
    if not sep or not device:
        raise UnknownTarget(f"target {spec!r} names no device; write BACKEND:DEVICE, e.g. torch:cpu")
    entries = registry.entries()
    if backend not in entries:
        raise UnknownTarget(f"target {spec!r}: no backend named {backend!r}; known backends: {', '.join(entries)}")
    kind, _, index = device.partition(":")
    kinds = entries[backend].device_kinds
    if kinds and kind not in kinds:
        raise UnknownTarget(f"target {spec!r}: backend {backend} has no device {kind!r}; it has {', '.join(kinds)}")
    if index and not index.isdigit():
        raise UnknownTarget(f"target {spec!r}: device index {index!r} is not a number")
    return Target(backend, device)


def unavailable_reason(target: Target) -> str | None:
    """None when the target can run here, else why not (package missing, no driver, no device)."""
    try:
        cls = registry.load(target.backend)
    except BackendUnavailable as e:
        return str(e)
    return cls.probe(target.device)


def select(spec: str | None = None) -> Target:
    """The target to use: `spec`, else ACCEL_TARGET, else the first available in PROBE_ORDER."""
    explicit = spec or os.environ.get("ACCEL_TARGET")
    if explicit:
        target = parse(explicit)
        reason = unavailable_reason(target)
        if reason is not None:
            source = "" if spec else " (from ACCEL_TARGET)"
            raise TargetUnavailable(f"target {target}{source} is not available here: {reason}")
        return target
    for candidate in PROBE_ORDER:
        target = parse(candidate)
        if unavailable_reason(target) is None:
            return target
    raise TargetUnavailable("no target is available here: torch cannot be imported; pip install torch")


def open_target(spec: str | None = None, policy: Mapping[str, str] | None = None) -> Any:
    """A ready backend instance for the selected target, its ops routed by `policy` (default: the
    ACCEL_OPS environment variable)."""
    from accel.routing import policy_from_env

    target = select(spec)
    cls = registry.load(target.backend)
    return cls(target.device, policy if policy is not None else policy_from_env())


@dataclass
class TargetInfo:
    target: str
    available: bool
    reason: str | None
    backend: Any = None  # the opened backend, when available


def discover() -> list[TargetInfo]:
    """Every known target (each backend's device kinds), with availability and, when available, the
    opened backend for its capabilities."""
    out = []
    for entry in registry.entries().values():
        kinds = entry.device_kinds
        if not kinds:
            try:
                kinds = registry.load(entry.name).device_kinds
            except BackendUnavailable as e:
                out.append(TargetInfo(f"{entry.name}:?", False, str(e)))
                continue
        for kind in kinds:
            target = Target(entry.name, kind)
            reason = unavailable_reason(target)
            backend = None
            if reason is None:
                try:
                    backend = registry.load(entry.name)(kind, {})
                except Exception as e:  # a backend that probes fine but fails to open is unavailable
                    reason = f"opening failed: {e}"
            out.append(TargetInfo(str(target), reason is None, reason, backend))
    return out
