"""mindspore:cpu: every op against the NumPy oracle at each dtype it claims (and only those), every tiny
preset's logits and greedy tokens against torch:cpu, value_and_grad against torch's autograd, routing of
the Ascend fused kernels, graph mode, honest unavailability of gpu/ascend, and a quiet import."""

from __future__ import annotations

import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from accel.conformance.cases import run_op_case
from accel.conformance.op_cases import CASES
from accel.errors import RoutingError, TargetUnavailable
from accel.models import from_preset
from accel.runtime import generate, infer, place
from accel.targets import open_target
from tests.conftest import TINY, run_cli


@pytest.fixture(scope="module")
def ms_cpu():
    return open_target("mindspore:cpu", policy={})



def test_every_op_matches_the_oracle_at_each_claimed_dtype(ms_cpu):
    dtypes = ms_cpu.capabilities().dtypes
    assert dtypes[0] == "float32" and "float16" in dtypes
    from accel.conformance.runner import apply_known_failures

    rows = apply_known_failures([run_op_case(ms_cpu, case, dtype) for dtype in dtypes for case in CASES])
    failures = [f"{row.model}/{row.dtype}: {row.status} {row.detail}" for row in rows
                if row.status not in ("pass", "known-failure")]
    assert not failures, failures
    # the reviewed known failures (conformance/known_failures/mindspore_cpu.yaml) still fail as reviewed
    assert all("now passes" not in row.detail for row in rows)


def test_unclaimed_dtypes_really_lack_kernels(ms_cpu):
    """bfloat16 is left out on CPU because MindSpore 2.10 has no CPU MatMul for it, not by a name check."""
    import mindspore as ms

    assert "bfloat16" not in ms_cpu.capabilities().dtypes
    x = ms_cpu.asarray(np.ones((2, 3), np.float32), "bfloat16")
    with pytest.raises((RuntimeError, TypeError), match="MatMul"):
        ms.ops.matmul(x, ms.ops.transpose(x, (1, 0))).asnumpy()


@pytest.mark.parametrize("preset", TINY)
def test_logits_and_greedy_tokens_match_torch(preset, ms_cpu, torch_cpu):
    model, params = from_preset(preset, seed=0)
    ids = np.random.default_rng(7).integers(0, model.vocab_size, (2, 11))
    ours = infer(model, ms_cpu, place(ms_cpu, params, "float32"), ids)
    ref = infer(model, torch_cpu, place(torch_cpu, params, "float32"), ids)
    assert ours.shape == (2, 11, model.vocab_size)
    assert np.abs(ours - ref).max() <= 1e-4
    assert np.abs(ref).max() > 0.1  # not two near-zero tensors
    new_ms = generate(model, ms_cpu, place(ms_cpu, params, "float32"), ids[:1], 8)
    new_torch = generate(model, torch_cpu, place(torch_cpu, params, "float32"), ids[:1], 8)
    np.testing.assert_array_equal(new_ms, new_torch)


def test_asarray_to_numpy_round_trips_bit_exact(ms_cpu):
    rng = np.random.default_rng(0)
    for a in (rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16), rng.standard_normal(7).astype(np.float16),
              rng.integers(-5, 5, (4,)).astype(np.int64), rng.standard_normal((2, 2)).astype(np.float32)):
        back = ms_cpu.to_numpy(ms_cpu.asarray(a))
        assert back.dtype == a.dtype
        np.testing.assert_array_equal(back.view(np.uint8), a.view(np.uint8))
    # float32 -> bfloat16 rounds to nearest even, as `cast` does
    x = np.array([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8], np.float32)
    np.testing.assert_array_equal(ms_cpu.to_numpy(ms_cpu.asarray(x, "bfloat16")).astype(np.float32),
                                  np.array([1.0, 1.0 + 4 * 2.0**-8], np.float32))
    # a read-only buffer (a memory-mapped checkpoint tensor) is copied, not aliased
    ro = np.arange(4, dtype=np.float32)
    ro.flags.writeable = False
    np.testing.assert_array_equal(ms_cpu.to_numpy(ms_cpu.asarray(ro)), ro)


def test_value_and_grad_matches_torch_autograd(ms_cpu, torch_cpu):
    rng = np.random.default_rng(1)
    host = {"w": rng.standard_normal((6, 4)).astype(np.float32), "b": rng.standard_normal(6).astype(np.float32),
            "unused": rng.standard_normal(3).astype(np.float32)}
    x = rng.standard_normal((2, 5, 4)).astype(np.float32)

    def fn(ops):
        def loss(params, inputs, scale):
            h = ops.silu(ops.linear(inputs, params["w"], params["b"]))
            return ops.mul(ops.mean(ops.mul(h, h)), scale)
        return loss

    results = {}
    for backend in (ms_cpu, torch_cpu):
        params = {k: backend.asarray(v) for k, v in host.items()}
        value, grads = backend.value_and_grad(fn(backend.ops))(params, backend.asarray(x), 3.0)
        results[backend.name] = (float(backend.to_numpy(value)), {k: backend.to_numpy(g) for k, g in grads.items()})
    (v_ms, g_ms), (v_t, g_t) = results["mindspore"], results["torch"]
    assert abs(v_ms - v_t) <= 1e-6 * abs(v_t)
    assert set(g_ms) == set(host)
    for k in ("w", "b"):
        assert np.abs(g_ms[k] - g_t[k]).max() <= 1e-6 * np.abs(g_t[k]).max() + 1e-9
        assert np.abs(g_t[k]).max() > 1e-3
    np.testing.assert_array_equal(g_ms["unused"], np.zeros(3, np.float32))


def test_fused_kernels_are_offered_only_on_ascend(ms_cpu):
    assert set(ms_cpu.ops.routes.values()) == {"composite"}
    assert ms_cpu.capabilities().fused_ops == ()
    table = ms_cpu.implementations()
    for op in ("rms_norm", "rope", "attention", "swiglu"):
        fused = table[op][0]
        assert fused.variant == "fused" and "Ascend" in fused.unavailable
    with pytest.raises(RoutingError, match="rms_norm=fused cannot run on mindspore:cpu: .*Ascend"):
        open_target("mindspore:cpu", policy={"rms_norm": "fused"})
    explicit = open_target("mindspore:cpu", policy={"attention": "composite"})
    assert explicit.ops.routes["attention"] == "composite"


def test_gpu_and_ascend_report_why_they_are_unavailable():
    from accel.backends.mindspore import MindSporeBackend

    ascend = MindSporeBackend.probe("ascend")
    assert ascend is not None and "Ascend" in ascend and "CANN" in ascend
    assert "GPU" in (MindSporeBackend.probe("gpu") or "")
    assert "no device index" in MindSporeBackend.probe("cpu:1")
    with pytest.raises(TargetUnavailable, match=r"mindspore:ascend is not available here: .*Ascend plugin"):
        open_target("mindspore:ascend")


def test_graph_mode_matches_pynative():
    """ACCEL_MINDSPORE_MODE=graph: forward and training steps through mindspore.jit give the PyNative
    numbers; a call with a KV cache (Python state) still runs, op by op."""
    from accel.backends.mindspore import MindSporeBackend
    from accel.models.qwen import Qwen2
    from accel.train import train

    graph, eager = MindSporeBackend("cpu", {}, mode="graph"), MindSporeBackend("cpu", {}, mode="pynative")
    assert graph.capabilities().compiled and not eager.capabilities().compiled
    # one layer: tracing a graph costs seconds per layer on this machine
    model = Qwen2(name="qwen2-1layer", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                  num_heads=2, num_kv_heads=1)
    params = model.init_params(seed=0)
    ids = np.random.default_rng(3).integers(0, model.vocab_size, (2, 9))
    np.testing.assert_allclose(infer(model, graph, place(graph, params, "float32"), ids),
                               infer(model, eager, place(eager, params, "float32"), ids), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(generate(model, graph, place(graph, params, "float32"), ids[:1], 3),
                                  generate(model, eager, place(eager, params, "float32"), ids[:1], 3))
    rng = np.random.default_rng(4)
    batches = [{"input_ids": rng.integers(0, 64, (2, 8)), "labels": rng.integers(0, 64, (2, 8))} for _ in range(3)]
    losses = {b.mode: [r.loss for r in train(model, b, params, batches, 3, 1e-2)] for b in (graph, eager)}
    np.testing.assert_allclose(losses["graph"], losses["pynative"], rtol=1e-5)
    assert losses["graph"][2] != losses["graph"][0]  # the steps moved the weights


def test_unknown_mode_is_an_error():
    from accel.backends.mindspore import MindSporeBackend
    from accel.errors import UsageError

    with pytest.raises(UsageError, match="ACCEL_MINDSPORE_MODE"):
        MindSporeBackend("cpu", {}, mode="eager-ish")


def test_import_and_open_print_nothing():
    code = ("from accel.targets import open_target; b = open_target('mindspore:cpu', policy={}); "
            "b.capabilities(); b.probe('ascend'); b.probe('gpu')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)


def test_cli_asking_for_ascend_is_a_one_line_error():
    r = run_cli("generate", "--model", "qwen2-tiny", "--input-ids", "1,2", "--target", "mindspore:ascend")
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "mindspore:ascend is not available here" in lines[0], r.stderr
