"""This process's memory and the host's, as the kernel reports them (/proc on Linux, getrusage and
sysconf elsewhere): for accel.migrate's torch.cuda memory statistics on cpu and `accel compare`'s peaks."""

from __future__ import annotations

import os
import sys


def _proc_kib(path: str, key: str) -> int | None:
    """A `key: N kB` line of a /proc file, in bytes (None where there is no /proc)."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss() -> int:
    """Peak resident bytes. Linux: VmHWM, which starts afresh at exec (ru_maxrss would carry the
    spawning parent's peak into the child) and can be reset."""
    import resource

    peak = _proc_kib("/proc/self/status", "VmHWM")
    if peak is None:  # ru_maxrss is kiB on Linux, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return peak


def rss() -> int:
    """Resident bytes now (the peak where there is no /proc)."""
    now = _proc_kib("/proc/self/status", "VmRSS")
    return peak_rss() if now is None else now


def reset_peak_rss() -> None:
    try:  # Linux >= 4.0: "5" resets VmHWM to the current resident size
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


def host_memory() -> tuple[int, int]:
    """(available, total) bytes of the host."""
    total, available = _proc_kib("/proc/meminfo", "MemTotal"), _proc_kib("/proc/meminfo", "MemAvailable")
    if total is None or available is None:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page
    return available, total
