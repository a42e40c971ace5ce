"""Golden records: the inputs, the float64 expected outputs, one device's outputs and its errors, so
that a machine that never shares an environment with it (an Ascend box, a CUDA box) is judged against
it later: `accel conformance --write-golden DIR` on one, `accel conformance --golden DIR` on the other.

A record is a directory with `arrays.safetensors` (every array, keyed "CASE_ID|kind|name") and
`manifest.json` (format, creation time, the recording target, versions, seeds and per-case metrics).
Workers write parts; the runner merges them and renames the directory into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from accel.checkpoint import safetensors
from accel.errors import ConformanceError
from accel.inputs import read_json_object

FORMAT = "accel-golden/2"  # 2: msprobe's metrics beside accel's (accel_cosine, accel_rmse)


def _storable(a: Any) -> np.ndarray:
    a = np.asarray(a)
    return np.ascontiguousarray(a.astype(np.int64) if a.dtype.kind in "iub" else a)


class Recorder:
    """Collects one worker's inputs and outputs; `flush` writes them as a part of the record."""

    def __init__(self, staging: Path):
        self.staging = staging
        self.arrays: dict[str, np.ndarray] = {}
        self.cases: dict[str, dict[str, Any]] = {}
        self.models: set[str] = set()

    def add(self, case_id: str, inputs: dict[str, np.ndarray], expected: Any, actual: Any,
            metrics: dict[str, float]) -> None:
        for name, a in inputs.items():
            self.arrays[f"{case_id}|input|{name}"] = _storable(a)
        self.arrays[f"{case_id}|expected"] = _storable(expected)
        self.arrays[f"{case_id}|actual"] = _storable(actual)
        self.cases[case_id] = {"metrics": metrics, "inputs": sorted(inputs)}

    def add_model(self, name: str, params: dict[str, np.ndarray], inputs: list[np.ndarray]) -> None:
        """A model's inputs: a preset's weights with its token ids; of a checkpoint directory, the ids
        only (its identity goes into the manifest, its weights stay where they are). One batch of ids is
        `input_ids`, several prompts `input_ids.0`, `input_ids.1`, ..."""
        from accel.conformance.cases import CHECKPOINTS

        if name in self.models:
            return
        self.models.add(name)
        weights = {} if name in CHECKPOINTS else {f"param.{k}": v for k, v in params.items()}
        ids = {"input_ids": inputs[0]} if len(inputs) == 1 else {f"input_ids.{i}": x for i, x in enumerate(inputs)}
        self.add(f"models/{name}", {**ids, **weights}, np.zeros(0), np.zeros(0), {})

    def flush(self) -> None:
        if not self.cases:
            return
        part = self.staging / "parts" / uuid.uuid4().hex
        part.parent.mkdir(parents=True, exist_ok=True)
        safetensors.write(f"{part}.safetensors", self.arrays)
        Path(f"{part}.json").write_text(json.dumps(self.cases, default=float))
        self.arrays, self.cases = {}, {}


def staging_dir(final: Path) -> Path:
    if final.exists():
        raise ConformanceError(f"golden record {final} already exists; remove it or choose another directory")
    if not final.parent.exists():
        raise ConformanceError(f"directory {final.parent} does not exist")
    tmp = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def finish(staging: Path, final: Path, target: str, environment: dict[str, Any],
           checkpoints: dict[str, dict[str, str]] | None = None) -> None:
    """Merges the workers' parts into one record and renames it into place. `checkpoints`: the identity
    (tensor name -> SHA-256) of each checkpoint directory the record was written from, by model name."""
    arrays: dict[str, np.ndarray] = {}
    cases: dict[str, Any] = {}
    for part in sorted((staging / "parts").glob("*.json")):
        cases |= json.loads(part.read_text())
        f = safetensors.SafetensorsFile(part.with_suffix(".safetensors"))
        arrays |= {k: np.array(v) for k, v in f.items()}
    if not cases:
        shutil.rmtree(staging)
        raise ConformanceError("no case produced output; nothing to record")
    safetensors.write(staging / "arrays.safetensors", arrays)
    manifest = {"format": FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "target": target, "environment": environment, "checkpoints": checkpoints or {}, "cases": cases}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1, default=float))
    shutil.rmtree(staging / "parts")
    os.replace(staging, final)


class GoldenRecord:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        manifest = self.directory / "manifest.json"
        if not manifest.is_file():
            raise ConformanceError(f"{self.directory} is not a golden record (no manifest.json)")
        self.manifest = read_json_object(manifest, ConformanceError, "a golden record's manifest")
        if self.manifest.get("format") != FORMAT:
            raise ConformanceError(f"{manifest}: format {str(self.manifest.get('format'))[:40]!r}, expected {FORMAT}: "
                                  "record it again with this version (--write-golden)")
        cases, target = self.manifest.get("cases"), self.manifest.get("target")
        checkpoints = self.manifest.get("checkpoints") or {}
        if not (isinstance(cases, dict) and all(isinstance(c, dict) and isinstance(c.get("inputs", []), list)
                                                for c in cases.values())):
            raise ConformanceError(f"{manifest}: 'cases' must be an object of case objects; the record is damaged")
        if not isinstance(target, str):
            raise ConformanceError(f"{manifest}: 'target' must be a string; the record is damaged")
        if not (isinstance(checkpoints, dict) and all(isinstance(d, dict) for d in checkpoints.values())):
            raise ConformanceError(f"{manifest}: 'checkpoints' must be an object of digest tables; the record is "
                                   "damaged")
        self.arrays = safetensors.SafetensorsFile(self.directory / "arrays.safetensors")
        self.keys = set(self.arrays.keys())
        self.cases: dict[str, Any] = cases
        self.target: str = target
        self.checkpoints: dict[str, dict[str, str]] = checkpoints

    def check_checkpoints(self, directories: dict[str, str]) -> None:
        """Refuses, before anything runs, a record written from checkpoint directories unless each one is
        given (by name -> path) and holds the very weights it was written from."""
        from accel.checkpoint.identity import check_same

        for name, digests in self.checkpoints.items():
            if name not in directories:
                raise ConformanceError(f"golden record {self.directory} was written from the checkpoint directory "
                                       f"{name}: give that directory with --models")
            check_same(digests, directories[name], f"golden record {self.directory}")

    def _get(self, key: str) -> np.ndarray:
        if key not in self.keys:
            raise ConformanceError(f"golden record {self.directory} lacks {key}")
        return np.array(self.arrays.get(key))

    def inputs(self, case_id: str) -> dict[str, np.ndarray]:
        return {name: self._get(f"{case_id}|input|{name}") for name in self.cases[case_id]["inputs"]}

    def expected(self, case_id: str) -> np.ndarray:
        return self._get(f"{case_id}|expected")

    def actual(self, case_id: str) -> np.ndarray:
        return self._get(f"{case_id}|actual")

    def metrics(self, case_id: str) -> dict[str, float]:
        return self.cases[case_id]["metrics"]

    def jobs(self) -> list[tuple[str, str, str]]:
        """(case kind, item, dtype) of every recorded case."""
        out = []
        for case_id in self.cases:
            kind, _, rest = case_id.partition("/")
            if kind == "models":
                continue
            item, _, dtype = rest.rpartition("/")
            out.append((kind, item, dtype))
        return out
