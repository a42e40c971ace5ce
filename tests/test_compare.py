"""`accel compare`: the same model on several compiler stacks, each in its own process, judged against
the numpy:cpu float64 reference; a compiler that lacks an op is a row with that compiler's own reason
while the other targets run; a crashing target is a row too; bad input is a one-line error."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass

import numpy as np
import pytest

from accel.compare import compare
from accel.models.qwen import Qwen2
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("export_cache")


@dataclass(frozen=True)
class BesselQwen2(Qwen2):
    """Qwen2 whose logits go through the modified Bessel function I0: an op outside the op set that
    torch and NumPy have and that TVM's and ONNX's torch importers lack. A test model only."""

    def forward(self, ops, params, input_ids, cache=None, taps=None):
        import torch

        logits = super().forward(ops, params, input_ids, cache, taps)
        return torch.special.i0(logits) if isinstance(logits, torch.Tensor) else np.i0(logits)


@dataclass(frozen=True)
class SegfaultingQwen2(Qwen2):
    """Qwen2 that kills its process with SIGSEGV when run on torch: a crashing target. A test model only."""

    def forward(self, ops, params, input_ids, cache=None, taps=None):
        if ops.backend.name == "torch":
            os.kill(os.getpid(), signal.SIGSEGV)
        return super().forward(ops, params, input_ids, cache, taps)


def tiny(cls):
    model = cls(name=f"{cls.__name__}-tiny", **Qwen2.PRESETS["qwen2-tiny"])
    return model, model.init_params(0)


def test_cli_compares_targets_side_by_side(tmp_path):
    targets = ["torch:cpu", "torch-compile:cpu", "onnxruntime:cpu", "tvm:llvm", "xla:cpu"]
    r = run_cli("compare", "--model", "qwen2-tiny", "--targets", ",".join(targets), "--prompt-len", "9",
                "--new-tokens", "4", "--report-dir", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    for t in targets:
        assert any(line.startswith(t + " ") and " ok " in line for line in r.stdout.splitlines()), t
    assert "[reference] numpy:cpu" in r.stderr  # progress, one line per target start and end
    (report,) = tmp_path.glob("compare-*")
    assert {p.name for p in report.iterdir()} == {"report.json", "report.md", "chart.png"}
    doc = json.loads((report / "report.json").read_text())
    assert doc["reference"]["target"] == "numpy:cpu" and doc["reference"]["dtype"] == "float64"
    rows = {row["target"]: row for row in doc["results"]}
    assert list(rows) == targets
    for row in rows.values():
        assert row["status"] == "ok" and row["dtype"] == "float32"
        # float32 against the float64 reference: rounding-level error, same greedy tokens
        assert row["max_abs"] < 1e-4 and row["cosine"] > 0.999999 and row["token_agreement"] == 1.0
        assert row["prefill_ms"] > 0 and row["decode_tok_s"] > 0 and row["peak_rss_mib"] > row["rss_growth_mib"] > 0
        assert len(row["tokens"]) == 4 and row["tokens"] == doc["reference"]["tokens"]
    assert all(row["compile_s"] >= 0 for row in rows.values())  # times are measured, never compared in a test
    md = (report / "report.md").read_text()
    assert all(f"| {t} | ok |" in md for t in targets)
    assert (report / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_op_a_compiler_lacks_is_a_row_with_its_reason():
    model, params = tiny(BesselQwen2)
    # in this process (the isolated path is the CLI test's): the failure must not stop the loop either
    result = compare(model, params, ["tvm:llvm", "torch:cpu", "onnxruntime:cpu"], prompt_len=6, new_tokens=2,
                     isolate=False)
    rows = {r.target: r for r in result.results}
    assert result.reference.status == "ok"
    tvm, ort, eager = rows["tvm:llvm"], rows["onnxruntime:cpu"], rows["torch:cpu"]
    # each compiler's own words, on one line
    assert tvm.status == "failed" and "Unsupported function types ['i0.default']" in tvm.reason
    assert ort.status == "failed" and "i0" in ort.reason
    assert all("\n" not in r.reason and len(r.reason) <= 400 for r in (tvm, ort))
    # the target after the failing one still ran, and measured
    assert eager.status == "ok" and eager.max_abs < 1e-4 and eager.token_agreement == 1.0


def test_crashing_target_is_a_row_and_the_others_run():
    model, params = tiny(SegfaultingQwen2)
    result = compare(model, params, ["torch:cpu", "numpy:cpu"], dtype="float64", prompt_len=4, new_tokens=2)
    crashed, ok = result.results
    assert crashed.status == "crashed" and "SIGSEGV" in crashed.reason
    assert ok.status == "ok" and ok.max_abs == 0.0 and ok.token_agreement == 1.0


@pytest.mark.parametrize("args, message", [
    (["--targets", "torch:cpu,nosuch:cpu"], "no backend named 'nosuch'"),
    (["--targets", "torch:cpu", "--prompt-len", "0"], "--prompt-len"),
    (["--targets", "torch:cpu", "--dtype", "int8"], "not a float dtype"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    r = run_cli("compare", "--model", "qwen2-tiny", *args, "--report-dir", str(tmp_path / "out"))
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_compares_a_checkpoint_directory(tmp_path):
    from tests.conftest import save_hf_qwen2

    directory = save_hf_qwen2(tmp_path / "team-qwen2")
    r = run_cli("compare", "--model", str(directory), "--targets", "torch:cpu,mindspore:cpu", "--prompt-len", "9",
                "--new-tokens", "4", "--report-dir", str(tmp_path / "out"))
    assert r.returncode == 0, r.stdout + r.stderr
    (report,) = (tmp_path / "out").glob("compare-*")
    doc = json.loads((report / "report.json").read_text())
    assert doc["model"] == "team-qwen2"
    for row in doc["results"]:
        assert row["status"] == "ok" and row["max_abs"] < 1e-4 and row["token_agreement"] == 1.0
