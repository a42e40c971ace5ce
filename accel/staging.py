"""Temporary output beside its final path: `stage_dir(path)` makes `.NAME.PID.XXXX.tmp` next to `path`
(renamed into place only when complete), first sweeping the ones a process that is gone left behind
(killed with SIGKILL, or the machine lost power). SIGTERM/SIGHUP/Ctrl-C reach the command as exceptions
(accel.cli), so its own `finally` removes what it staged."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from pathlib import Path


def stage_dir(path: Path) -> Path:
    """A fresh temporary directory beside `path`, named for it and for this process."""
    sweep_stale(path)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))


def sweep_stale(path: Path) -> None:
    """Removes the temporaries `stage_dir` made for `path` whose process no longer runs."""
    prefix = f".{path.name}."
    for entry in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = entry.name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or not entry.is_dir() or entry.is_symlink():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:  # another user's live process
            continue


def discard_staged(path: Path) -> None:
    """Removes every temporary this process staged for `path`: for a command's `finally`, so that even a
    signal arriving between the directory's creation and its use leaves nothing behind."""
    prefix = f".{path.name}.{os.getpid()}."
    for entry in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        shutil.rmtree(entry, ignore_errors=True)
