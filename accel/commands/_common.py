"""Options and helpers shared by several commands."""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from accel.errors import AccelError, UsageError


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR|PRESET",
                   help="HF checkpoint directory (config.json + weights) or a preset name (see `accel models`)")
    p.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights (default 0)")


def add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", metavar="BACKEND:DEVICE",
                   help="where to run (default: $ACCEL_TARGET, else the first of torch:npu, torch:cuda, torch:cpu)")
    p.add_argument("--dtype", metavar="DTYPE",
                   help="compute dtype: float32, float16, bfloat16, float64 (default: the target's first, "
                        "float32 on torch, float64 on numpy:cpu)")


def parse_ids(text: str) -> np.ndarray:
    """Comma-separated token ids ("5, 17,33"); "1 2" is refused, never read as 12."""
    parts = [t.strip() for t in text.split(",")]
    if not all(t.isascii() and t.isdigit() and len(t) <= 18 for t in parts):  # < 10**18 fits int64
        raise UsageError(f"--input-ids {text[:80]!r} is not a comma-separated list of token ids (0 or more, "
                         "below 10**18), e.g. 5,17,33")
    return np.asarray([[int(t) for t in parts]], dtype=np.int64)


def open_run(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any], str]:
    """(model, backend, params on device, dtype) for --model/--target/--dtype."""
    from accel.models import load
    from accel.runtime import place
    from accel.targets import open_target

    backend = open_target(args.target)
    dtype = args.dtype or backend.capabilities().dtypes[0]
    backend.check_dtype(dtype)
    model, params = load(args.model, seed=args.seed)
    # consumed as placed: the checkpoint's arrays (mappings of its file) and a cast copy of them are
    # never both held whole
    return model, backend, place(backend, params, dtype, consume=True), dtype


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a temporary file beside `path`, renamed over it only on success."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a directory; give a file name")
    if not path.parent.exists():
        raise UsageError(f"directory {path.parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise AccelError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise AccelError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
