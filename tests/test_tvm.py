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
from accel.models import from_preset, presets
from accel.runtime import forward_fn, place
from accel.targets import open_target

pytest.importorskip("tvm")

TINY = sorted(name for name in presets() if name.endswith("-tiny"))


@pytest.fixture(scope="module", autouse=True)
def export_cache(tmp_path_factory):
    """One export cache for the session's ORT, TVM and compare tests, so they share artifacts."""
    path = tmp_path_factory.getbasetemp() / "accel-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCEL_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def tvm_llvm():
    return open_target("tvm:llvm", policy={})


@pytest.fixture(scope="module")
def torch_cpu():
    return open_target("torch:cpu", policy={})


def prefill_and_tokens(backend, model, params, ids, new_tokens=8):
    """Prefill logits (float32) and greedy tokens, through one compiled forward and the KV cache."""
    p = place(backend, params, "float32")
    forward = forward_fn(model, backend)
    cache = model.new_cache()
    logits = forward(p, backend.asarray(ids, "int64"), cache)
    first, tokens = np.asarray(backend.to_numpy(logits), np.float32), []
    for step in range(new_tokens):
        nxt = np.argmax(np.asarray(backend.to_numpy(logits), np.float32)[:, -1], axis=-1)
        tokens.append(int(nxt[0]))
        if step + 1 < new_tokens:
            logits = forward(p, backend.asarray(nxt[:, None].astype(np.int64), "int64"), cache)
    return first, tokens


def compiles():
    from accel.backends.torch_compile import EXPORTS

    return EXPORTS["tvm"]


@pytest.mark.parametrize("preset", TINY)
def test_model_through_tvm_matches_torch_cpu(tvm_llvm, torch_cpu, preset):
    model, params = from_preset(preset)
    ids = np.random.default_rng(7).integers(0, model.vocab_size, (1, 9))
    got, got_tokens = prefill_and_tokens(tvm_llvm, model, params, ids)
    want, want_tokens = prefill_and_tokens(torch_cpu, model, params, ids)
    assert np.abs(want).max() > 0.1
    assert np.abs(got - want).max() <= 1e-4
    assert got_tokens == want_tokens and len(set(want_tokens)) > 1


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
    got, got_tokens = prefill_and_tokens(open_target("tvm:llvm", policy={}), model, other, ids)
    assert compiles() == before
    assert {p: p.stat().st_mtime_ns for p in (export_cache / "tvm").rglob("*") if p.is_file()} == files
    want, want_tokens = prefill_and_tokens(torch_cpu, model, other, ids)
    assert np.abs(got - want).max() <= 1e-4 and got_tokens == want_tokens


@pytest.mark.parametrize("name", ["layer_norm[odd]", "attention[mqa-cached]"])
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
