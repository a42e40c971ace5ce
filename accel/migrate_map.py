"""How accel.migrate maps one call: a CUDA device, index or backend name to the target's, and the
wrappers that apply that mapping to a function's arguments (accel/migrate.py decides which functions)."""

from __future__ import annotations

import functools
import inspect
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch  # framework-import-ok: accel.migrate's runtime, imported by it after its torch autoload switch

from accel.errors import AccelError


class Refused(AccelError):
    """A CUDA call that the target has nothing for (a `refuse:` row of migrate_table.yaml)."""


COLLECTIVE = {"cpu": "gloo", "npu": "hccl", "cuda": "nccl"}

CUDA_STR = re.compile(r"cuda(?::(\d+))?")


@dataclass(frozen=True)
class Target:
    kind: str  # "cpu" | "npu" | "cuda"
    index: int | None  # the device a bare "cuda" means, when the target names one

    def map_str(self, s: str) -> str:
        m = CUDA_STR.fullmatch(s)
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


# --- wrappers ------------------------------------------------------------------------------------------


def distinct(name: str, fn: Any) -> Any:
    """A new function object calling fn. torch._dynamo keys its trace rules by object identity and
    asserts when one object sits under two torch.cuda names with different rules."""
    if isinstance(fn, type) or not callable(fn):
        return fn

    @functools.wraps(fn)
    def stand_in(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    stand_in.__name__ = name
    return stand_in


def map_args(fn: Callable[..., Any], target: Target, ints: bool, positional: bool = True,
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


def map_params(fn: Callable[..., Any], **mappers: Callable[[Any], Any]) -> Callable[..., Any]:
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


def refuse(name: str, target: Target, why: str) -> Callable[..., Any]:
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise Refused(f"{name} has no equivalent on {target.name}: {why}")

    refused.__name__ = name.rsplit(".", 1)[-1]
    return refused


def generator_class(target: Target) -> type:
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


class Hf32Matmul:
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


def for_scripts(new: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
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


def map_location(target: Target, location: Any) -> Any:
    if location is None:  # tensors saved on CUDA come back on the target; everything else as saved
        from torch.serialization import default_restore_location  # framework-import-ok: lazy, torch.load's

        def restore(storage: Any, saved_at: str) -> Any:
            if CUDA_STR.fullmatch(saved_at):
                return default_restore_location(storage, target.map_str(saved_at))
            return None

        return restore
    if isinstance(location, dict):
        return {k: target.map(v) for k, v in location.items()}
    return target.map(location)


