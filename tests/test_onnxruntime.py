"""onnxruntime:cpu: every tiny preset exported to ONNX (prefill and decode-step graphs, dynamic lengths)
and run by ORT against torch:cpu; the export cache (a second run exports nothing and rewrites no
file; the key covers the weights); a prompt outside an exported graph's shape range gets its own
graph; op-level calls run through ORT."""

from __future__ import annotations

import json

import numpy as np
import pytest

from accel.conformance.cases import run_op_case
from accel.conformance.op_cases import CASES
from accel.errors import AccelError
from accel.models import from_preset
from accel.runtime import forward_fn, place
from accel.targets import open_target
from tests.conftest import TINY, assert_generates_like, prefill_and_tokens

pytest.importorskip("onnxruntime")



pytestmark = pytest.mark.usefixtures("export_cache")


@pytest.fixture(scope="module")
def ort_cpu():
    return open_target("onnxruntime:cpu", policy={})




def exports():
    from accel.backends.graph_export import EXPORTS

    return EXPORTS["onnx"]


@pytest.mark.parametrize("preset", TINY)
def test_model_through_ort_matches_torch_cpu(ort_cpu, torch_cpu, preset):
    assert_generates_like(ort_cpu, torch_cpu, preset)


def test_second_run_reuses_the_cached_export(export_cache, torch_cpu):
    model, params = from_preset("qwen2-tiny")
    ids = np.random.default_rng(7).integers(0, model.vocab_size, (1, 9))
    first = prefill_and_tokens(open_target("onnxruntime:cpu", policy={}), model, params, ids)
    files = {p: p.stat().st_mtime_ns for p in (export_cache / "onnx").rglob("*") if p.is_file()}
    indexed = [e["file"] for index in (export_cache / "onnx").rglob("index.json")
               for e in json.loads(index.read_text())]
    assert any(p.suffix == ".onnx" for p in files) and {p.name for p in files} >= set(indexed)
    before = exports()
    # a new backend and a new compiled forward: nothing in memory, so the graphs come from disk
    again = prefill_and_tokens(open_target("onnxruntime:cpu", policy={}), model, params, ids)
    assert exports() == before
    assert {p: p.stat().st_mtime_ns for p in (export_cache / "onnx").rglob("*") if p.is_file()} == files
    np.testing.assert_array_equal(again[0], first[0])
    assert again[1] == first[1]


def test_cache_key_covers_the_weights(ort_cpu):
    from accel.backends.graph_export import GraphCompiler, _Call

    model, params = from_preset("qwen2-tiny")
    forward = forward_fn(model, ort_cpu).__wrapped__  # the function compile() was given
    ids = ort_cpu.asarray(np.array([[1, 2, 3]]), "int64")
    keys = []
    for weights in (params, {**params, "model.norm.weight": params["model.norm.weight"] * 1.01}):
        p = place(ort_cpu, weights, "float32")
        keys.append(GraphCompiler(forward, ort_cpu.lowering)._key(_Call(forward, (p, ids), {})))
    assert keys[0] is not None and keys[0] != keys[1]


def test_prompt_outside_a_graphs_range_gets_its_own(ort_cpu, torch_cpu):
    # Qwen v1 scales queries past its training length (8 here) by a Python branch on the length:
    # the 9-token graph is exported for lengths > 8 only, and a 5-token prompt must not reuse it
    model, params = from_preset("qwen-tiny")
    forward = forward_fn(model, ort_cpu)
    p = place(ort_cpu, params, "float32")
    for n in (9, 5):
        ids = np.random.default_rng(n).integers(0, model.vocab_size, (1, n))
        before = exports()
        got = ort_cpu.to_numpy(forward(p, ort_cpu.asarray(ids, "int64"), model.new_cache()))
        want, _, _ = prefill_and_tokens(torch_cpu, model, params, ids, new_tokens=1)
        assert np.abs(got - want).max() <= 1e-4, n
    assert exports() == before + 1  # the 5-token prompt was not served by the 9-token graph


@pytest.mark.parametrize("name", ["rms_norm[odd]", "attention[gqa-odd]", "split[odd]", "rope_cache[small]"])
def test_op_runs_through_ort(ort_cpu, name):
    case = next(c for c in CASES if f"{c.op}[{c.shape}]" == name)
    before = exports()
    row = run_op_case(ort_cpu, case, "float32")
    assert row.status == "pass", row.detail
    assert exports() == before + 1  # exported as its own graph and run by ORT, not by torch


def test_inference_only(ort_cpu):
    assert not ort_cpu.capabilities().training and ort_cpu.capabilities().dtypes == ("float32",)
    with pytest.raises(AccelError, match="cannot train"):
        ort_cpu.value_and_grad(lambda p: p)


def test_missing_provider_is_reported():
    from accel.backends.onnxruntime import OnnxRuntimeBackend

    for kind, provider in (("cuda", "CUDAExecutionProvider"), ("cann", "CANNExecutionProvider")):
        reason = OnnxRuntimeBackend.probe(kind)
        if reason is not None:
            assert provider in reason and "\n" not in reason
