"""What accel.migrate's `torch:cpu` target makes of CUDA: the host's own meaning of each torch.cuda call
(accel/migrate_table.yaml's cpu column says which, in words): one in-order stream, events in host time,
memory statistics as the process's resident memory, the cpu generator as the device's."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch  # framework-import-ok: accel.migrate's cpu stand-ins, imported by it only under torch

from accel.hostmem import host_memory, peak_rss, reset_peak_rss, rss


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


@dataclass(frozen=True)
class _CpuProperties:
    """torch.cuda.get_device_properties() of the host, with the fields scripts read."""

    name: str
    total_memory: int
    major: int
    minor: int
    multi_processor_count: int


def _memory_stats(device: Any = None) -> dict[str, int]:
    now, peak = rss(), peak_rss()
    return {"allocated_bytes.all.current": now, "allocated_bytes.all.peak": peak,
            "reserved_bytes.all.current": now, "reserved_bytes.all.peak": peak,
            "num_alloc_retries": 0, "num_ooms": 0}


def _memory_summary(device: Any = None, abbreviated: bool = False) -> str:
    s = _memory_stats()
    gib = lambda n: f"{n / 2**30:10.3f} GiB"  # noqa: E731
    return ("accel.migrate on torch:cpu: no device allocator; these are the process's resident memory\n"
            f"  allocated, reserved (resident now): {gib(s['allocated_bytes.all.current'])}\n"
            f"  peak (since start or the last reset): {gib(s['allocated_bytes.all.peak'])}\n")


def _memory_fraction(fraction: float, device: Any = None) -> None:
    if not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"invalid memory fraction {fraction!r}: it must be between 0 and 1")


_NVTX_RANGES: list[Any] = []  # what range_push started, innermost last


def _nvtx_push(msg: str) -> int:
    _NVTX_RANGES.append(msg)
    return len(_NVTX_RANGES) - 1  # NVTX returns the zero-based depth of the range it started


def _nvtx_pop() -> int:
    if not _NVTX_RANGES:
        return -1  # as NVTX does for a pop without a push
    _NVTX_RANGES.pop()
    return len(_NVTX_RANGES)


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def host_names() -> dict[str, Any]:
    """accel.migrate's own stand-ins on cpu, by table row (the rows' texts say what each means)."""
    # The device RNG is the cpu generator on this target. Go to the generator itself: torch.manual_seed
    # and torch.seed call torch.cuda.manual_seed_all, which would recurse.
    cpu_rng = torch.default_generator

    def manual_seed(seed: int) -> None:
        cpu_rng.manual_seed(seed)

    def seed() -> None:
        cpu_rng.seed()

    def pin_memory(self: torch.Tensor, device: Any = None) -> torch.Tensor:
        return self

    c = "torch.cuda."
    return {
        "torch.Tensor.pin_memory": pin_memory,
        c + "is_available": lambda: True, c + "is_initialized": lambda: True, c + "init": _nothing,
        c + "device_count": lambda: 1, c + "current_device": lambda: 0, c + "set_device": _nothing,
        c + "device": _CpuDevice, c + "synchronize": _nothing, c + "get_device_name": lambda device=None: "cpu",
        c + "get_device_capability": lambda device=None: (0, 0),
        c + "get_device_properties": lambda device=None: _CpuProperties(
            "cpu", host_memory()[1], 0, 0, os.cpu_count() or 1),
        c + "get_arch_list": lambda: [],
        c + "is_bf16_supported": lambda including_emulation=True: True,
        c + "ipc_collect": _nothing,
        c + "memory_allocated": lambda device=None: rss(), c + "max_memory_allocated": lambda device=None: peak_rss(),
        c + "memory_reserved": lambda device=None: rss(), c + "max_memory_reserved": lambda device=None: peak_rss(),
        c + "memory_stats": _memory_stats, c + "memory_summary": _memory_summary,
        c + "memory_snapshot": lambda: [], c + "mem_get_info": lambda device=None: host_memory(),
        c + "reset_peak_memory_stats": lambda device=None: reset_peak_rss(),
        c + "reset_max_memory_allocated": lambda device=None: reset_peak_rss(),
        c + "empty_cache": _nothing, c + "set_per_process_memory_fraction": _memory_fraction,
        c + "Stream": _CpuStream, c + "Event": _CpuEvent,
        c + "current_stream": lambda device=None: _CPU_STREAMS[-1],
        c + "default_stream": lambda device=None: _CPU_STREAMS[0],
        c + "stream": _CpuStreamContext,
        c + "nvtx.range_push": _nvtx_push, c + "nvtx.range_pop": _nvtx_pop,
        c + "nvtx.range_start": lambda msg: 0, c + "nvtx.range_end": _nothing, c + "nvtx.mark": _nothing,
        c + "manual_seed": manual_seed, c + "manual_seed_all": manual_seed,
        c + "seed": seed, c + "seed_all": seed,
        c + "initial_seed": cpu_rng.initial_seed,
        c + "get_rng_state": lambda device="cuda": cpu_rng.get_state(),
        c + "set_rng_state": lambda new_state, device="cuda": cpu_rng.set_state(new_state),
        c + "get_rng_state_all": lambda: [cpu_rng.get_state()],
        c + "set_rng_state_all": lambda new_states: cpu_rng.set_state(new_states[0]),
        c + "default_generators": (cpu_rng,),
    }
