"""msprobe's own PrecisionDebugger run on transformers' Qwen2 in a subprocess of its own (the debugger is
a singleton per process): the scripts the msprobe tests share."""

from __future__ import annotations

import subprocess
from pathlib import Path

# A seeded random Qwen2; `model` is left for SETUP (which parses sys.argv: `task` and `out` at least).
_MODEL = r"""
import json, sys
import numpy as np, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from msprobe.pytorch import PrecisionDebugger

torch.manual_seed(0)
model = Qwen2ForCausalLM(Qwen2Config(**CONFIG)).eval()
with torch.no_grad():  # HF initialises biases and norms to 0 and 1: randomised, so that mistakes show
    for name, p in model.named_parameters():
        if name.endswith("bias") or "norm" in name:
            p.add_(0.1 * torch.randn_like(p))
"""

# One forward of `model` on IDS under the debugger, dumped to OUT/dump with task `task`, level mix.
_DUMP = r"""
config = {"task": task, "dump_path": out + "/dump", "rank": [], "step": [], "level": "mix",
          task: {"scope": [], "list": [], "data_mode": ["all"]}}
json.dump(config, open(out + "/config.json", "w"))
debugger = PrecisionDebugger(config_path=out + "/config.json")
debugger.start(model=model)
with torch.no_grad():
    model(torch.tensor([IDS]))
debugger.stop()
debugger.step()
"""


def dump_script(config: dict, ids: list[int], setup: str, after: str = "") -> str:
    return (_MODEL + setup + _DUMP + after).replace("CONFIG", repr(config)).replace("IDS", repr(ids))


def run_together(commands: list[list[str]], cwd: Path) -> None:
    """The commands side by side, each asserted to succeed."""
    procs = [subprocess.Popen(c, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in commands]
    for c, p in zip(commands, procs):
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, f"{' '.join(c[:3])}: {out[-3000:]}"
