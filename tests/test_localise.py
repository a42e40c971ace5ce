"""msprobe's dumps, both ways. `accel localise` reads what msprobe's own PrecisionDebugger dumped while
transformers' Qwen2 ran with a fault planted in one layer's MLP, and names that module; `accel conformance
--dump` writes a faulty target's taps as an msprobe dump that `msprobe compare` reads, and msprobe's first
error row is the module accel names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from accel.msprobe_dump import first_error_row
from tests.conftest import QWEN2_TINY
from tests.msprobe_fixtures import dump_script, run_together

pytest.importorskip("msprobe")

IDS = [5, 17, 33, 2, 200, 91, 7]
FAULTY = "Module.model.layers.1.mlp.Qwen2MLP.forward.0"

# One PrecisionDebugger dump per process (its debugger is a singleton): a seeded random Qwen2, saved with
# save_pretrained, its layer 1 MLP's output scaled by FACTOR (1 = healthy) while msprobe dumps.
SETUP = r"""
task, factor, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
model.save_pretrained(out + "/hf")
mlp = model.model.layers[1].mlp
forward = mlp.forward
mlp.forward = lambda x: forward(x) * factor
"""

RUNS = {"healthy": ("tensor", 1.0), "faulty": ("tensor", 1.5), "statistics": ("statistics", 3.0)}


@pytest.fixture(scope="module")
def dumps(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("msprobe-dumps")
    script = dump_script(QWEN2_TINY | {"num_hidden_layers": 3}, IDS, SETUP)
    for name in RUNS:
        (base / name).mkdir()
    run_together([[sys.executable, "-c", script, task, str(factor), str(base / name)]
                  for name, (task, factor) in RUNS.items()], base)
    return {name: base / name for name in RUNS}


def localise(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "accel.cli", "localise", *args], capture_output=True, text=True,
                          timeout=600)


def test_localise_names_the_faulty_module_of_msprobes_own_dump(dumps, tmp_path):
    r = localise("--dump", str(dumps["faulty"] / "dump"), "--model", str(dumps["faulty"] / "hf"), "--all",
                 "--json", str(tmp_path / "out.json"))
    assert r.returncode == 1, r.stdout + r.stderr
    first = next(line for line in r.stdout.splitlines() if line.startswith("first divergence:"))
    assert first.startswith(f"first divergence: {FAULTY} (layer 1, accel tap layers.1.mlp_out"), r.stdout
    assert "called at modeling_qwen2.py:" in r.stdout and "self.mlp(hidden_states)" in r.stdout, r.stdout
    assert "isolating" in r.stderr  # progress
    result = json.loads((tmp_path / "out.json").read_text())
    by = {m["entry"]: m for m in result["modules"]}
    assert result["first"]["entry"] == FAULTY and result["dtype"] == "float32" and result["tokens"] == len(IDS)
    # its own error, on its dumped input, is the 1.5x; the down projection inside it is exact on its own
    down = by["Module.model.layers.1.mlp.down_proj.Linear.forward.0"]
    assert down["isolated_problem"] is None and down["isolated"]["max_abs"] < 1e-5
    assert by[FAULTY]["isolated"]["max_relative_err"] == pytest.approx(0.5, rel=1e-3)  # |1.5 y - y| / |y|
    # layers before it are right on their own input and propagated; after it, wrong only propagated
    assert by["Module.model.layers.0.Qwen2DecoderLayer.forward.0"]["isolated_problem"] is None
    assert by["Module.model.layers.0.Qwen2DecoderLayer.forward.0"]["propagated_problem"] is None
    for after in ("Module.model.layers.2.Qwen2DecoderLayer.forward.0", "Module.model.norm.Qwen2RMSNorm.forward.0",
                  "Module.lm_head.Linear.forward.0"):
        assert by[after]["propagated_problem"] is not None and by[after]["isolated_problem"] is None, after


def test_msprobe_compare_of_msprobes_dump_against_accels_reference_flags_the_same_module(dumps, tmp_path):
    r = localise("--dump", str(dumps["faulty"] / "dump"), "--model", str(dumps["faulty"] / "hf"),
                 "--write-reference", str(tmp_path / "reference"))
    assert r.returncode == 1 and f"first divergence: {FAULTY}" in r.stdout, r.stdout + r.stderr
    (target,) = (dumps["faulty"] / "dump").glob("step0/proc*/dump.json")
    msprobe = str(Path(sys.executable).with_name("msprobe"))
    golden = tmp_path / "reference/step0/rank0/dump.json"
    c = subprocess.run([msprobe, "compare", "-tp", str(target), "-gp", str(golden), "-o", str(tmp_path / "cmp")],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert c.returncode == 0, c.stdout[-3000:] + c.stderr[-3000:]
    row = first_error_row(tmp_path / "cmp")
    assert row is not None and row["NPU Name"] == f"{FAULTY}.output.0", row
    r = localise("--dump", str(dumps["faulty"] / "dump"), "--model", str(dumps["faulty"] / "hf"),
                 "--write-reference", str(tmp_path / "reference"))
    assert r.returncode == 2 and "exists and is not empty" in r.stderr


def test_localise_finds_no_divergence_in_a_healthy_dump(dumps):
    r = localise("--dump", str(dumps["healthy"] / "dump"), "--model", str(dumps["healthy"] / "hf"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("no module diverges")


def test_localise_judges_a_statistics_dump_by_msprobes_statistics_rule(dumps):
    model = str(dumps["statistics"] / "hf")
    r = localise("--dump", str(dumps["statistics"] / "dump"), "--model", model)
    assert r.returncode == 2 and "--input-ids" in r.stderr and "Traceback" not in r.stderr
    r = localise("--dump", str(dumps["statistics"] / "dump"), "--model", model,
                 "--input-ids", ",".join(map(str, IDS)))
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"first divergence: {FAULTY}" in r.stdout and "output norm 200.0% off" in r.stdout, r.stdout


def test_localise_refuses_what_is_not_a_dump_of_this_model(dumps, tmp_path):
    r = localise("--dump", str(tmp_path), "--model", str(dumps["healthy"] / "hf"))
    assert r.returncode == 2 and "not an msprobe dump" in r.stderr and "Traceback" not in r.stderr
    r = localise("--dump", str(dumps["healthy"] / "dump"), "--model", "chatglm3-tiny")
    assert r.returncode == 2 and "has no module of a chatglm model" in r.stderr, r.stderr


FAULT = '''
from accel.backends.torch_eager import TorchBackend, attention_sdpa
from accel.routing import Impl


class UnscaledBackend(TorchBackend):
    name = "unscaled"
    def implementations(self):
        table = super().implementations()
        table["attention"] = [Impl("composite", lambda q, k, v, *, scale, causal=True, mask=None:
                                   attention_sdpa(q, k, v, scale=1.0, causal=causal, mask=mask))]
        return table
'''


def test_msprobe_compare_of_accels_dumps_flags_the_module_accel_names(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "accel_unscaled.py").write_text(textwrap.dedent(FAULT))
    dist = site / "accel_unscaled-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: accel-unscaled\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[accel.backends]\nunscaled = accel_unscaled:UnscaledBackend\n")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    (tmp_path / "dumps").mkdir()  # empty: taken
    r = subprocess.run([sys.executable, "-m", "accel.cli", "conformance", "--targets", "unscaled:cpu,torch:cpu",
                        "--cases", "inference", "--models", "qwen2-tiny", "--dtypes", "float32", "--dump",
                        str(tmp_path / "dumps"), "--report-dir", str(tmp_path / "reports")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {row["target"]: row for row in json.loads((tmp_path / "reports/latest/report.json").read_text())["rows"]}
    named = rows["unscaled:cpu"]["first_divergence"]["module"]
    assert named == "Module.model.layers.0.self_attn.Qwen2Attention.forward.0", rows["unscaled:cpu"]
    target, golden = (tmp_path / "dumps" / t / "qwen2-tiny/float32/step0/rank0/dump.json"
                      for t in ("unscaled_cpu", "torch_cpu"))
    msprobe = str(Path(sys.executable).with_name("msprobe"))
    c = subprocess.run([msprobe, "compare", "-tp", str(target), "-gp", str(golden), "-o", str(tmp_path / "cmp")],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert c.returncode == 0, c.stdout[-3000:] + c.stderr[-3000:]
    row = first_error_row(tmp_path / "cmp")
    assert row is not None and row["NPU Name"] == f"{named}.output.0", row
    # a dump directory that is not empty is refused before anything runs
    r = subprocess.run([sys.executable, "-m", "accel.cli", "conformance", "--targets", "torch:cpu", "--cases",
                        "inference", "--dump", str(tmp_path / "dumps")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "exists and is not empty" in r.stderr
