"""Launches shared by the distributed tests. Each rank imports torch (or MindSpore, or jax), which is
most of a launch's cost on a small machine, so every test reads the outputs of one launch per setting."""

from __future__ import annotations

import pickle
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

TINY = ("qwen2-tiny", "qwen-tiny", "chatglm3-tiny", "baichuan2-7b-tiny", "baichuan2-13b-tiny")
PROBE = Path(__file__).with_name("probe.py")


@cache
def torch_two_ranks() -> list[dict[str, Any]]:
    """2 ranks from torchrun's elastic agent: every collective, TP and DP of every tiny preset."""
    from accel.conformance.collectives import launch_torch

    spec = {"target": "torch:cpu", "primitives": True, "tp": TINY, "dp": TINY, "timeout": 60}
    return launch_torch(spec, 2)


def accel_launch(backend: str, nproc: int, spec: dict[str, Any], timeout: float = 240) -> list[dict[str, Any]]:
    """`accel launch --backend BACKEND --nproc N -- python probe.py`: each rank writes its outputs."""
    with tempfile.TemporaryDirectory(prefix="accel-launch-test-") as tmp:
        work = Path(tmp)
        (work / "spec.pkl").write_bytes(pickle.dumps(spec))
        proc = subprocess.run([sys.executable, "-m", "accel.cli", "launch", "--backend", backend, "--nproc",
                               str(nproc), "--log-dir", str(work / "logs"), "--", "python", str(PROBE),
                               str(work / "spec.pkl"), str(work)], capture_output=True, text=True, timeout=timeout,
                              cwd=work)
        outputs = [work / f"rank_{r}.pkl" for r in range(nproc)]
        missing = [p.name for p in outputs if not p.exists()]
        assert proc.returncode == 0 and not missing, f"launch failed ({proc.returncode}, missing {missing}): " \
            f"{proc.stderr[-2000:]}"
        return [pickle.loads(p.read_bytes()) for p in outputs]


@cache
def torch_four_ranks() -> list[dict[str, Any]]:
    """4 ranks through `accel launch`: every collective; TP where KV heads are fewer than the ranks
    (qwen2, chatglm3: replicated) and on a tp=2 x dp=2 grid (baichuan2-13b's 6 heads); one DP step."""
    spec = {"target": "torch:cpu", "primitives": True, "tp": ("qwen2-tiny", "chatglm3-tiny", "baichuan2-13b-tiny"),
            "dp": ("qwen-tiny",), "timeout": 60}
    return accel_launch("torch", 4, spec)
