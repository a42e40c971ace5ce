"""The conformance suite tested by planting faults: each bug, injected into one op of a test backend,
must be caught and localised to the right layer and op; crashing and hanging targets must become rows
while the other targets complete; golden records, known failures, reports and the pytest plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from accel.conformance.cases import Context, run_generation_case, run_inference_case, run_op_case
from accel.conformance.metrics import compare, ulp, ulp_metrics
from accel.conformance.op_cases import CASES
from accel.conformance.tolerances import judge
from accel.targets import open_target

torch = pytest.importorskip("torch")
te = pytest.importorskip("accel.backends.torch_eager")


def faulty(op: str, fn) -> object:
    """torch:cpu with one op replaced: a test backend carrying a planted bug."""
    backend = open_target("torch:cpu", policy={})
    backend.ops.__dict__[op] = fn
    backend.name = "faulty"  # not torch:cpu, the reference device, any more
    return backend


def _causal_off_by_one(q, k, v, *, scale, causal=True, mask=None):
    sq, skv = q.shape[1], k.shape[1]
    visible = torch.ones(sq, skv, dtype=torch.bool).tril(skv - sq + 1)  # sees one key too many
    add = torch.zeros(sq, skv).masked_fill(~visible, float("-inf"))
    return te.attention(q, k, v, scale=scale, causal=False, mask=add if mask is None else mask + add)


def _softmax_fp16(q, k, v, *, scale, causal=True, mask=None):
    hq, hkv = q.shape[2], k.shape[2]
    k, v = k.repeat_interleave(hq // hkv, 2), v.repeat_interleave(hq // hkv, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if mask is not None:
        scores = scores + mask
    if causal:
        scores = scores.masked_fill(~te._visible(q.shape[1], k.shape[1], q.device), float("-inf"))
    probs = torch.softmax(scores.half(), dim=-1).to(q.dtype)  # the bug: softmax in float16
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def _swap_qk(x, sizes, axis):
    parts = te.split(x, sizes, axis)
    if len(parts) == 3 and sizes[0] == sizes[1]:
        parts[0], parts[1] = parts[1], parts[0]
    return parts


def _decode_position_bug(positions, inv_freq):
    if positions.shape[0] == 1:  # decode steps get the position one past the right one
        positions = positions + 1
    return te.rope_cache(positions, inv_freq)


# (model preset, op, faulty implementation, expected first tap, expected op)
FAULTS = {
    "llama-rope-in-chatglm": ("chatglm3-tiny", "rope", lambda x, c, s, style: te.rope(x, c, s, "half"),
                              "layers.0.q_rope", "rope"),
    "missing-attention-scale": ("qwen2-tiny", "attention",
                                lambda q, k, v, *, scale, causal=True, mask=None:
                                te.attention_sdpa(q, k, v, scale=1.0, causal=causal, mask=mask),
                                "layers.0.attn", "attention"),
    "wrong-rmsnorm-eps": ("qwen2-tiny", "rms_norm", lambda x, w, eps: te.rms_norm(x, w, eps * 10),
                          "layers.0.input_norm", "rms_norm"),
    "softmax-in-float16": ("baichuan2-7b-tiny", "attention", _softmax_fp16, "layers.0.attn", "attention"),
    "q-k-swapped-in-fused-qkv": ("qwen-tiny", "split", _swap_qk, "layers.0.q", "split"),
    "wrong-alibi-slopes": ("baichuan2-13b-tiny", "alibi_bias",
                           lambda slopes, kv_len: te.alibi_bias(slopes.flip(0), kv_len), "alibi", "alibi_bias"),
    "causal-mask-off-by-one": ("chatglm3-tiny", "attention", _causal_off_by_one, "layers.0.attn", "attention"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_planted_fault_is_caught_and_localised(fault):
    preset, op, fn, tap, tap_op = FAULTS[fault]
    assert run_inference_case(open_target("torch:cpu", policy={}), preset, "float32").status == "pass"
    row = run_inference_case(faulty(op, fn), preset, "float32")
    assert row.status == "fail", row.metrics
    assert row.first_divergence is not None
    assert (row.first_divergence["tap"], row.first_divergence["op"]) == (tap, tap_op), row.first_divergence


def test_kv_cache_position_bug_is_caught_in_generation_and_localised():
    backend = faulty("rope_cache", _decode_position_bug)
    assert run_inference_case(backend, "qwen2-tiny", "float32").status == "pass"  # prefill is unaffected
    row = run_generation_case(backend, "qwen2-tiny", "float32")
    assert row.status == "fail", row.metrics  # tokens of a tiny random model may survive; logits do not
    fd = row.first_divergence
    assert fd is not None and fd["step"] >= 1
    assert (fd["tap"], fd["op"]) == ("rope", "rope_cache"), fd


def test_op_level_cases_catch_an_op_fault():
    backend = faulty("rope", lambda x, c, s, style: te.rope(x, c, s, "half"))
    rows = [run_op_case(backend, c, "float32") for c in CASES if c.op == "rope"]
    assert {r.model: r.status for r in rows} == {"rope[half]": "pass", "rope[half-partial]": "pass",
                                                 "rope[interleaved]": "fail", "rope[interleaved-partial]": "fail"}


def test_low_precision_is_judged_against_the_reference_device():
    # A bfloat16 linear that accumulates its long reduction in bfloat16 (instead of float32, as torch:cpu
    # does) loses digits with every addition: well past twice the reference device's error and CANN's
    # floors, it must fail; torch:cpu's own kernel passes.
    from accel.conformance.op_cases import OpCase

    case = OpCase("linear", "long", lambda r: ([r.standard_normal((4, 1024)), 0.05 * r.standard_normal((8, 1024))], {}))
    assert run_op_case(open_target("torch:cpu", policy={}), case, "bfloat16", Context()).status == "pass"

    def coarse(x, w, b=None):
        out = torch.zeros(*x.shape[:-1], w.shape[0], dtype=torch.bfloat16)
        for i in range(x.shape[-1]):
            out = out + x[..., i : i + 1] * w[:, i]
        return out if b is None else out + b

    bad = run_op_case(faulty("linear", coarse), case, "bfloat16", Context())
    assert bad.status == "fail" and "reference device" in bad.detail, bad.detail


# --- metrics -------------------------------------------------------------------------------------


def test_metrics_by_hand():
    m = compare(np.array([1.0, 2.0, 3.001]), np.array([1.0, 2.0, 3.0]))
    assert m["max_abs"] == pytest.approx(0.001)
    assert m["max_rel"] == pytest.approx(0.001 / 3)
    assert m["accel_rmse"] == pytest.approx(0.001 / np.sqrt(3))
    assert m["max_abs_err"] == pytest.approx(0.001) and m["one_thousandth_err_ratio"] == 1.0
    assert "rmse" not in m  # msprobe's checker does not judge float64 outputs: none of its metrics
    assert compare(np.array([1.0, -1.0]), np.array([-1.0, 1.0]))["accel_cosine"] == pytest.approx(-1.0)
    assert compare(np.array([np.nan]), np.array([1.0]))["nonfinite_mismatch"] == 1
    assert compare(np.array([np.inf]), np.array([np.inf]))["nonfinite_mismatch"] == 0
    # one unit in the last place of bfloat16 at 1.0 is 2^-7; msprobe's ULP error says so too
    assert ulp(np.array([1.0, 3.0]), "bfloat16") == pytest.approx([2**-7, 2**-6])
    assert ulp_metrics(np.array([1.0 + 2**-7, 2.0]), np.array([1.0, 2.0]), "bfloat16")["max_ulp_error"] == 1.0
    half = compare(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0]), "float16")
    assert half["rmse"] == 0 and half["error_balance"] == 0 and half["accel_cosine"] == 1.0


def test_judge_rules():
    m = compare(np.array([1.0, 2.0]), np.array([1.0, 2.0 + 1e-3]), "float32")
    v = judge("ops", "float32", m)
    assert v.problem and v.problem.startswith("accel: max abs") and "msprobe benchmark" not in v.by
    ref = dict(m)
    both = judge("ops", "float32", m, ref)  # as bad as the reference device: msprobe's benchmark passes
    assert both.by["msprobe benchmark"] is None and both.by["accel"] and both.summary()["msprobe benchmark"] == "pass"
    low = judge("ops", "bfloat16", m, ref)
    assert low.problem is None  # as good as the reference device, by either standard
    worse = {**m, "accel_rmse": 3 * m["accel_rmse"] + 1, "ref_rms": 1.0, "rmse": 3 * m["rmse"] + 1}
    v = judge("ops", "bfloat16", worse, ref)
    assert "rmse" in v.by["accel"] and "rmse" in v.by["msprobe benchmark"]


# --- isolation, golden records, known failures, reports, plugin ---------------------------------

FAULT_BACKENDS = '''
import os, signal, time
from accel.backends.torch_eager import TorchBackend, attention_sdpa
from accel.routing import Impl


def _replace(table, op, fn):
    table[op] = [Impl("composite", fn)]
    return table


class CrashBackend(TorchBackend):
    name = "crashy"
    def implementations(self):
        return _replace(super().implementations(), "rms_norm", lambda x, w, eps: os.kill(os.getpid(), signal.SIGSEGV))


class AbortBackend(TorchBackend):
    name = "aborty"
    def implementations(self):
        return _replace(super().implementations(), "rms_norm", lambda x, w, eps: os.abort())


class HangBackend(TorchBackend):
    name = "hangy"
    def implementations(self):
        return _replace(super().implementations(), "rms_norm", lambda x, w, eps: time.sleep(3600))


class UnscaledBackend(TorchBackend):
    name = "unscaled"
    def implementations(self):
        return _replace(super().implementations(), "attention",
                        lambda q, k, v, *, scale, causal=True, mask=None: attention_sdpa(q, k, v, scale=1.0,
                                                                                         causal=causal, mask=mask))
'''


@pytest.fixture(scope="module")
def fault_env(tmp_path_factory) -> dict[str, str]:
    """A directory on PYTHONPATH with a distribution whose `accel.backends` entry points are faulty
    backends: the real plugin mechanism, in the suite's worker processes too."""
    site = tmp_path_factory.mktemp("site")
    (site / "accel_fault_backends.py").write_text(textwrap.dedent(FAULT_BACKENDS))
    dist = site / "accel_faults-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: accel-faults\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[accel.backends]\ncrashy = accel_fault_backends:CrashBackend\naborty = accel_fault_backends:AbortBackend\n"
        "hangy = accel_fault_backends:HangBackend\nunscaled = accel_fault_backends:UnscaledBackend\n")
    return {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def accel(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "accel.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_crashing_and_hanging_targets_become_rows(fault_env, tmp_path):
    r = accel("conformance", "--targets", "crashy:cpu,torch:cpu,hangy:cpu,aborty:cpu", "--cases", "inference",
              "--models", "qwen2-tiny,chatglm3-tiny", "--dtypes", "float32", "--case-timeout", "12",
              "--report-dir", str(tmp_path), env=fault_env)
    assert r.returncode == 1, r.stderr[-2000:]
    rows = json.loads((tmp_path / "latest" / "report.json").read_text())["rows"]
    by = {(row["target"], row["model"]): row for row in rows}
    for model in ("qwen2-tiny", "chatglm3-tiny"):  # a new worker takes over after each crash
        assert by[("crashy:cpu", model)]["status"] == "crashed"
        assert "SIGSEGV" in by[("crashy:cpu", model)]["detail"]
        assert by[("aborty:cpu", model)]["status"] == "crashed" and "SIGABRT" in by[("aborty:cpu", model)]["detail"]
        assert by[("torch:cpu", model)]["status"] == "pass"
    assert by[("hangy:cpu", "qwen2-tiny")]["status"] == "timeout"
    assert by[("hangy:cpu", "qwen2-tiny")]["detail"] == "timeout after 12 s"
    # two targets ran at a time (the default on this machine), the rows still in the order asked for
    assert [row["target"] for row in rows] == [t for t in ("crashy:cpu", "torch:cpu", "hangy:cpu", "aborty:cpu")
                                               for _ in range(2)]
    assert all(row["seconds"] > 0 for row in rows if row["status"] == "pass")
    for name in ("report.json", "report.md", "report.html"):
        assert (tmp_path / "latest" / name).is_file()
    assert "Seconds per target and case kind: crashy:cpu" in (tmp_path / "latest" / "report.md").read_text()


def test_targets_on_an_accelerator_take_turns(monkeypatch):
    """--jobs runs host targets side by side, but never two targets on the accelerator at once."""
    from accel.conformance import runner
    from accel.conformance.cases import Row

    running: list[str] = []
    overlaps: list[tuple[str, ...]] = []
    lock = threading.Lock()

    def fake_run_target(target, jobs, options, on_row):
        with lock:
            running.append(target)
            overlaps.append(tuple(sorted(running)))
        time.sleep(0.3)
        with lock:
            running.remove(target)
        return [Row(target, "ops", "x", "float32", "pass")]

    monkeypatch.setattr(runner, "run_target", fake_run_target)
    targets = ["torch:cuda", "xla:gpu", "torch:cpu", "tvm:llvm", "torch-compile:cuda:1"]
    rows = runner.run(targets, [("ops", "x", "float32")], runner.Options(jobs=5), progress=False)
    assert [r.target for r in rows] == targets
    on_device = [sum(t not in ("torch:cpu", "tvm:llvm") for t in seen) for seen in overlaps]
    assert max(on_device) == 1
    assert max(len(seen) for seen in overlaps) >= 2  # the host targets did run alongside


def test_golden_record_round_trip(fault_env, tmp_path):
    golden = tmp_path / "golden"
    args = ["--cases", "ops,inference,generation", "--models", "qwen2-tiny", "--dtypes", "float32,bfloat16"]
    r = accel("conformance", "--targets", "torch:cpu", *args, "--write-golden", str(golden),
              "--report-dir", str(tmp_path / "r1"), env=fault_env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    manifest = json.loads((golden / "manifest.json").read_text())
    assert manifest["target"] == "torch:cpu" and "torch" in manifest["environment"]["versions"]
    assert "inference/qwen2-tiny/bfloat16" in manifest["cases"]
    # the same machine against its own record passes, case for case
    r = accel("conformance", "--golden", str(golden), "--targets", "torch:cpu", "--report-dir", str(tmp_path / "r2"),
              env=fault_env)
    assert r.returncode == 0, r.stdout[-3000:]
    rows = json.loads((tmp_path / "r2" / "latest" / "report.json").read_text())["rows"]
    assert len(rows) == len([c for c in manifest["cases"] if not c.startswith("models/")])
    inference = next(x for x in rows if x["case"] == "inference" and x["dtype"] == "bfloat16")
    assert inference["metrics"]["vs_golden_max_abs"] == 0.0
    # a target with a dropped attention scale fails against it
    r = accel("conformance", "--golden", str(golden), "--targets", "unscaled:cpu", "--cases", "inference",
              "--report-dir", str(tmp_path / "r3"), env=fault_env)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads((tmp_path / "r3" / "latest" / "report.json").read_text())["rows"]
    assert {x["status"] for x in rows} == {"fail"}
    # a golden record is never overwritten
    r = accel("conformance", "--targets", "torch:cpu", *args, "--write-golden", str(golden), env=fault_env)
    assert r.returncode == 2 and "already exists" in r.stderr


def test_known_failures_are_applied_and_fixed_ones_reported(fault_env, tmp_path):
    kf = tmp_path / "kf"
    kf.mkdir()
    (kf / "unscaled_cpu.yaml").write_text(
        "- {case: inference, model: qwen2-tiny, reason: 'drops the 1/sqrt(d) scale (vendor bug 123)'}\n"
        "- {case: generation, model: qwen2-tiny, dtype: float32, reason: 'follows from the missing scale'}\n")
    (kf / "torch_cpu.yaml").write_text("- {case: inference, model: qwen2-tiny, reason: 'no longer true'}\n")
    r = accel("conformance", "--targets", "unscaled:cpu,torch:cpu", "--cases", "inference,generation",
              "--models", "qwen2-tiny", "--dtypes", "float32", "--known-failures", str(kf),
              "--report-dir", str(tmp_path / "r"), env=fault_env)
    rows = {(x["target"], x["case"]): x for x in
            json.loads((tmp_path / "r" / "latest" / "report.json").read_text())["rows"]}
    assert rows[("unscaled:cpu", "inference")]["status"] == "known-failure"
    assert "vendor bug 123" in rows[("unscaled:cpu", "inference")]["detail"]
    assert "now passes" in rows[("torch:cpu", "inference")]["detail"]
    assert r.returncode == 0, r.stdout[-2000:]
    assert "known failure(s) now pass" in r.stdout


def test_unavailable_target_and_bad_case_are_errors():
    env = dict(os.environ)
    r = accel("conformance", "--targets", "torch:cuda", env=env)
    assert r.returncode == 2 and "torch:cuda" in r.stderr and "Traceback" not in r.stderr
    r = accel("conformance", "--targets", "torch:cpu", "--cases", "telepathy", env=env)
    assert r.returncode == 2 and "telepathy" in r.stderr


def test_html_report_renders_in_headless_chromium(tmp_path):
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    r = accel("conformance", "--targets", "torch:cpu", "--cases", "inference,ops", "--models", "qwen2-tiny,qwen-tiny",
              "--dtypes", "float32,bfloat16", "--report-dir", str(tmp_path), env=dict(os.environ))
    assert r.returncode == 0
    page = (tmp_path / "latest" / "report.html").resolve()
    html = page.read_text()
    assert 'id="matrix"' in html and html.count("data:image/png;base64,") >= 2
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1800",
                    f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=120)
    from PIL import Image

    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    green = (np.abs(image - [0x2E, 0x7D, 0x32]).sum(axis=-1) < 30).sum()  # "pass" cells of the matrix
    assert image.shape[0] >= 1000 and green > 500


def test_pytest_plugin_runs_cases_with_readable_ids(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--accel-target", "torch:cpu",
                        "--accel-models", "qwen2-tiny", "--accel-cases", "inference,generation", "-rA"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=1800)  # a hang guard only
    assert r.returncode == 0, r.stdout[-2000:]
    assert "test_inference[qwen2-tiny-float32-torch:cpu]" in r.stdout
    assert "2 passed" in r.stdout


def test_training_case_catches_a_loss_that_ignores_the_prompt_mask():
    from accel.conformance.training import run_training_case

    assert run_training_case(open_target("torch:cpu", policy={}), "qwen2-tiny", "float32", Context()).status == "pass"
    unmasked = faulty("cross_entropy", lambda logits, labels, ignore_index=-100:
                      te.cross_entropy(logits, labels.clamp(min=0), ignore_index))
    row = run_training_case(unmasked, "qwen2-tiny", "float32", Context())
    assert row.status == "fail" and "loss rel" in row.detail
    assert len(row.series["loss"]) == len(row.series["reference_loss"]) == 6


def test_checkpoint_case_round_trips_through_mindspore_names():
    from accel.conformance.checkpoints import run_checkpoint_case

    row = run_checkpoint_case(open_target("torch:cpu", policy={}), "chatglm3-tiny:mindspore-ckpt", "bfloat16",
                              Context())
    assert row.status == "pass", row.detail
    assert row.metrics["tensors"] > 10 and row.metrics["max_abs"] == 0.0
