"""tvm:llvm: every tiny preset through torch.export -> Relax -> tvm.compile (prefill and decode-step
libraries, symbolic lengths) against torch:cpu; compiled libraries cached on disk (a second run
compiles nothing, and another checkpoint of the same configuration reuses them, weights being
inputs); op-level calls run through TVM."""

from __future__ import annotations

import numpy as np
import pytest

from accel.conformance.cases import run_op_case
from accel.conformance.op_cases import CASES
from accel.errors import AccelError
from accel.models import from_preset
from accel.targets import open_target
from tests.conftest import TINY, assert_generates_like, prefill_and_tokens

pytest.importorskip("tvm")



pytestmark = pytest.mark.usefixtures("export_cache")


@pytest.fixture(scope="module")
def tvm_llvm():
    return open_target("tvm:llvm", policy={})




def compiles():
    from accel.backends.graph_export import EXPORTS

    return EXPORTS["tvm"]


@pytest.mark.parametrize("preset", TINY)
def test_model_through_tvm_matches_torch_cpu(tvm_llvm, torch_cpu, preset):
    assert_generates_like(tvm_llvm, torch_cpu, preset)


def test_compiled_library_is_reused_across_runs_and_checkpoints(export_cache, torch_cpu):
    model, params = from_preset("qwen2-tiny")
    ids = np.random.default_rng(7).integers(0, model.vocab_size, (1, 9))
    prefill_and_tokens(open_target("tvm:llvm", policy={}), model, params, ids)
    files = {p: p.stat().st_mtime_ns for p in (export_cache / "tvm").rglob("*") if p.is_file()}
    assert any(p.suffix == ".so" for p in files)
    before = compiles()
    # new weights, a new backend, a new forward: the weights are inputs of the compiled library, so the
    # libraries on disk serve this checkpoint too
    _, other = from_preset("qwen2-tiny", seed=1)
    got, got_tokens, _ = prefill_and_tokens(open_target("tvm:llvm", policy={}), model, other, ids)
    assert compiles() == before
    assert {p: p.stat().st_mtime_ns for p in (export_cache / "tvm").rglob("*") if p.is_file()} == files
    want, want_tokens, _ = prefill_and_tokens(torch_cpu, model, other, ids)
    assert np.abs(got - want).max() <= 1e-4 and got_tokens == want_tokens


@pytest.mark.parametrize("name", ["layer_norm[odd]", "attention[mqa-cached]", "cross_entropy[masked]"])
def test_op_runs_through_tvm(tvm_llvm, name):
    case = next(c for c in CASES if f"{c.op}[{c.shape}]" == name)
    before = compiles()
    row = run_op_case(tvm_llvm, case, "float32")
    assert row.status == "pass", row.detail
    assert compiles() == before + 1  # compiled as its own module and run by TVM's VM


def test_inference_only(tvm_llvm):
    assert not tvm_llvm.capabilities().training
    with pytest.raises(AccelError, match="cannot train"):
        tvm_llvm.value_and_grad(lambda p: p)


def test_missing_cuda_is_reported():
    from accel.backends.tvm import TvmBackend

    reason = TvmBackend.probe("cuda")
    if reason is not None:
        assert "CUDA" in reason and "\n" not in reason
