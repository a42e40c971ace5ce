"""xla:cpu: every op against the NumPy oracle at every dtype it claims; every tiny preset under jax.jit
against torch:cpu (prefill logits, greedy tokens through the KV cache); 10 AdamW steps against
torch:cpu; and what jit does with shapes, caches and taps."""

from __future__ import annotations

import numpy as np
import pytest

from accel.conformance.cases import run_inference_case, run_op_case
from accel.conformance.op_cases import CASES
from accel.errors import TargetUnavailable
from accel.models import from_preset
from accel.models._layers import Taps
from accel.runtime import place
from accel.targets import open_target
from tests.conftest import TINY, assert_generates_like, assert_trains_like

jax = pytest.importorskip("jax")

CLAIMED = ("float32", "bfloat16", "float16")


@pytest.fixture(scope="module")
def xla():
    return open_target("xla:cpu", policy={})




def test_claims_no_float64_and_leaves_x64_alone(xla):
    assert xla.capabilities().dtypes == CLAIMED
    assert xla.capabilities().training and xla.capabilities().compiled
    assert not jax.config.jax_enable_x64


@pytest.mark.parametrize("dtype", CLAIMED)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}[{c.shape}]")
def test_op_matches_oracle(xla, case, dtype):
    row = run_op_case(xla, case, dtype)
    assert row.status == "pass", row.detail


@pytest.mark.parametrize("preset", TINY)
def test_model_under_jit_matches_torch_cpu(xla, torch_cpu, preset):
    cache = assert_generates_like(xla, torch_cpu, preset)
    # the caller's cache object carries the state the jitted forward returned
    assert cache.length == 9 + 7
    assert all(isinstance(k, jax.Array) and k.shape[1] == 16 for k, _ in cache.layers)


def test_jit_traces_once_per_shape(xla):
    traces = []

    def f(x, y):
        traces.append(x.shape)  # runs only while tracing
        return xla.ops.add(xla.ops.mul(x, 2.0), y)

    g = xla.compile(f)
    a = xla.asarray(np.ones((2, 3), np.float32))
    np.testing.assert_array_equal(xla.to_numpy(g(a, a)), np.full((2, 3), 3.0))
    g(a, xla.asarray(np.zeros((2, 3), np.float32)))
    assert traces == [(2, 3)]
    g(xla.asarray(np.ones((4, 3), np.float32)), xla.asarray(np.ones((4, 3), np.float32)))
    assert len(traces) == 2


def test_taps_leave_jit_as_arrays(xla):
    # the conformance inference case collects taps through a closure: they must come back as values
    model, params = from_preset("qwen2-tiny")
    taps = Taps()
    p = place(xla, params, "float32")
    run = xla.compile(lambda w, x: model.forward(xla.ops, w, x, taps=taps))
    logits = run(p, xla.asarray(np.array([[3, 1, 4, 1, 5]]), "int64"))
    assert taps["logits"].shape == logits.shape and isinstance(taps["layers.1.attn"], jax.Array)
    assert taps.ops["layers.0.q_rope"] == "rope"
    np.testing.assert_array_equal(xla.to_numpy(taps["logits"]), xla.to_numpy(logits))
    row = run_inference_case(xla, "qwen2-tiny", "float32")
    assert row.status == "pass", row.detail


def test_training_matches_torch_cpu(xla, torch_cpu):
    assert_trains_like(xla, torch_cpu)


def test_missing_platform_is_reported_not_replaced():
    from accel.backends.xla import XlaBackend

    reason = XlaBackend.probe("gpu")
    if reason is None:
        pytest.skip("this machine has a JAX GPU")
    assert "gpu" in reason and "\n" not in reason
    with pytest.raises(TargetUnavailable, match="xla:gpu"):
        open_target("xla:gpu")
