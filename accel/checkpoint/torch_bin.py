"""HF `pytorch_model.bin`: a torch.save zip archive, read with `weights_only=True` (torch's restricted
unpickler: tensors and plain containers only, never arbitrary code) and memory-mapped, so tensors are
paged in one at a time as they are converted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from accel.errors import CheckpointError


def _to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class TorchBinFile:
    def __init__(self, path: str | Path):
        import torch

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # UnpicklingError for a forbidden global, RuntimeError for a damaged zip
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{self.path}: not loadable as a safe PyTorch checkpoint ({first})") from None
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise CheckpointError(f"{self.path}: does not hold a flat dict of named tensors")
        self.state = state

    def keys(self) -> list[str]:
        return list(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def get(self, name: str) -> np.ndarray:
        return _to_numpy(self.state[name])

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.state:
            yield name, self.get(name)
