"""torch-compile:cpu: every tiny preset through inductor against eager torch:cpu (prefill logits, greedy
tokens through the KV cache, in two graphs), 10 compiled training steps against torch:cpu, and the
reason given where the device's compile backend is missing."""

from __future__ import annotations

import numpy as np
import pytest

from accel.models import from_preset
from accel.targets import open_target
from tests.conftest import TINY, assert_generates_like, assert_trains_like, prefill_and_tokens

torch = pytest.importorskip("torch")



@pytest.fixture(scope="module")
def compiled():
    return open_target("torch-compile:cpu", policy={})




@pytest.mark.parametrize("preset", TINY)
def test_model_through_inductor_matches_torch_cpu(compiled, torch_cpu, preset):
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    assert_generates_like(compiled, torch_cpu, preset)
    # one graph for the prefill, one for every decode step: the cached length is a dynamic dim
    # (torch:cpu's eager run adds none)
    assert counters["stats"]["unique_graphs"] - graphs == 2


def test_a_model_keeps_its_dims_static_after_another_model(compiled):
    """The conformance worker runs every model through one backend: a model's head count or width must
    not turn dynamic because an earlier model had another one. (Symbolic heads broke baichuan2-13b's
    graph at SDPA's enable_gqa; its extra graphs then used up dynamo's recompile limit.)"""
    from torch._dynamo.utils import counters

    for preset in ("qwen2-tiny", "baichuan2-7b-tiny", "baichuan2-13b-tiny"):
        model, params = from_preset(preset)
        ids = np.random.default_rng(3).integers(0, model.vocab_size, (1, 6))
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        prefill_and_tokens(compiled, model, params, ids)
        assert counters["stats"]["unique_graphs"] - graphs == 2, preset
        assert sum(counters["graph_break"].values()) == breaks, (preset, dict(counters["graph_break"]))


def test_infer_again_with_other_weights_reuses_the_graph(compiled, torch_cpu):
    from torch._dynamo.utils import counters

    from accel.runtime import infer, place

    model, params = from_preset("qwen-tiny")
    other = from_preset("qwen-tiny", seed=1)[1]
    ids = np.arange(7)[None] % model.vocab_size
    first = infer(model, compiled, place(compiled, params, "float32"), ids)
    graphs = counters["stats"]["unique_graphs"]
    second = infer(model, compiled, place(compiled, other, "float32"), ids)
    assert counters["stats"]["unique_graphs"] == graphs  # the same compiled forward, no new graph
    want = infer(model, torch_cpu, place(torch_cpu, other, "float32"), ids)
    assert np.abs(second - first).max() > 0.1 and np.abs(second - want).max() <= 1e-4  # the new weights


def test_training_matches_torch_cpu(compiled, torch_cpu):
    assert_trains_like(compiled, torch_cpu)


def test_capabilities(compiled):
    caps = compiled.capabilities()
    assert caps.compiled and caps.training and "float32" in caps.dtypes


def test_npu_without_torchair_is_unavailable_with_reason():
    from accel.backends.torch_compile import TorchCompileBackend

    reason = TorchCompileBackend.probe("npu")
    assert reason is not None and "torch_npu" in reason  # torch_npu is never installed here
