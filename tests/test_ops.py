"""The op set: the NumPy oracle against independent formulations, and every op on torch:cpu against
the oracle at every dtype, within the tolerances of conformance/tolerances.yaml."""

from __future__ import annotations

import math

import numpy as np
import pytest

from accel import ops
from accel.conformance.cases import run_op_case
from accel.conformance.op_cases import CASES
from accel.targets import open_target


@pytest.fixture(scope="module")
def torch_cpu():
    return open_target("torch:cpu", policy={})


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}[{c.shape}]")
def test_torch_cpu_matches_oracle(torch_cpu, case, dtype):
    row = run_op_case(torch_cpu, case, dtype)
    assert row.status == "pass", row.detail


@pytest.mark.parametrize("variant", ["sdpa", "composite"])
def test_both_attention_routes_match_oracle(variant):
    backend = open_target("torch:cpu", policy={"attention": variant})
    assert backend.ops.routes["attention"] == variant
    for case in (c for c in CASES if c.op == "attention"):
        assert run_op_case(backend, case, "float32").status == "pass", case.shape


# --- the oracle itself, against independent formulations -----------------------------------------


def test_rope_interleaved_is_complex_rotation():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 5, 2, 8))
    theta = rng.standard_normal((5, 4))
    out = ops.rope(x, np.cos(theta), np.sin(theta), "interleaved")
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * theta)[None, :, None, :]
    np.testing.assert_allclose(out[..., 0::2], z.real, atol=1e-12)
    np.testing.assert_allclose(out[..., 1::2], z.imag, atol=1e-12)


def test_rope_half_is_complex_rotation_of_halves_and_leaves_rest():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 1, 10))
    theta = rng.standard_normal((3, 3))  # rotary dim 6 of 10
    out = ops.rope(x, np.cos(theta), np.sin(theta), "half")
    z = (x[..., :3] + 1j * x[..., 3:6]) * np.exp(1j * theta)[None, :, None, :]
    np.testing.assert_allclose(out[..., :3], z.real, atol=1e-12)
    np.testing.assert_allclose(out[..., 3:6], z.imag, atol=1e-12)
    np.testing.assert_array_equal(out[..., 6:], x[..., 6:])


def test_rope_preserves_norm_and_relative_positions():
    # q.k after RoPE depends only on the position difference
    rng = np.random.default_rng(2)
    q, k = rng.standard_normal((1, 1, 1, 16)), rng.standard_normal((1, 1, 1, 16))
    inv = 10000.0 ** (-np.arange(0, 16, 2) / 16)

    def at(x, pos):
        cos, sin = ops.rope_cache(np.array([pos]), inv)
        return ops.rope(x, cos, sin, "half")

    assert np.dot(at(q, 3).ravel(), at(k, 1).ravel()) == pytest.approx(np.dot(at(q, 12).ravel(), at(k, 10).ravel()))


def test_attention_matches_loop_formulation_with_cache_offset():
    rng = np.random.default_rng(3)
    b, sq, skv, hq, hkv, d = 1, 2, 5, 4, 2, 3
    q = rng.standard_normal((b, sq, hq, d))
    k, v = rng.standard_normal((b, skv, hkv, d)), rng.standard_normal((b, skv, hkv, d))
    out = ops.attention(q, k, v, scale=0.7, causal=True)
    for i in range(sq):
        pos = skv - sq + i
        for h in range(hq):
            g = h // (hq // hkv)
            s = np.array([q[0, i, h] @ k[0, j, g] * 0.7 for j in range(pos + 1)])
            p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            np.testing.assert_allclose(out[0, i, h], p @ v[0, : pos + 1, g], atol=1e-12)


def test_cross_entropy_ignores_masked_labels():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]))
    labels = np.array([0, -100, 2])
    assert ops.cross_entropy(logits, labels) == pytest.approx((math.log(2) + math.log(3)) / 2)
    assert ops.cross_entropy(logits, np.array([-100, -100, -100])) == 0.0


def test_norms_and_activations_by_definition():
    x = np.array([[3.0, 4.0]])
    assert ops.rms_norm(x, np.array([1.0, 2.0]), 0.0) == pytest.approx(np.array([[3, 8]]) / math.sqrt(12.5))
    assert ops.l2_normalize(x) == pytest.approx(np.array([[0.6, 0.8]]))
    np.testing.assert_allclose(ops.layer_norm(x, np.ones(2), np.zeros(2), 0.0), [[-1.0, 1.0]])
    assert ops.silu(np.array([0.0, 1.0])) == pytest.approx([0.0, 1 / (1 + math.exp(-1))])
    assert ops.gelu(np.array([1.0])) == pytest.approx([0.8413447460685429])  # Phi(1)
    assert ops.swiglu(np.array([1.0, 2.0, 3.0, 5.0])) == pytest.approx([3 * 0.7310585786, 5 * 2 * 0.8807970780])
    assert ops.alibi_bias(np.array([0.5, 0.25]), 3)[:, 0, :] == pytest.approx(np.array([[0, 0.5, 1], [0, 0.25, 0.5]]))


def test_op_list_is_documented_once():
    needed = {"attention", "rope", "rms_norm", "swiglu", "alibi_bias", "cross_entropy", "l2_normalize"}
    assert set(ops.OP_NAMES) >= needed
    assert all(spec.doc for spec in ops.OPS.values())
