"""accel-port: port LLMs between accelerators and prove they still compute the same thing.

Importing `accel` loads no framework; each backend imports its own lazily when its target is opened.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def cache_dir() -> Path:
    """accel-port's cache (compiled graphs, checkpoint digests): $ACCEL_CACHE_DIR, else ~/.cache/accel-port."""
    import os

    return Path(os.environ.get("ACCEL_CACHE_DIR") or Path.home() / ".cache" / "accel-port")
