"""Tensor parallelism: the shard layouts of every family (fused QKV blocks split separately, MQA groups,
[gate | up], ALiBi slopes), and real multi-rank forwards (gloo) against the single-process logits."""

from __future__ import annotations

import numpy as np
import pytest

from accel import parallel
from accel.errors import ModelError
from accel.models import from_preset
from accel.models._layers import alibi_slopes
from tests.dist_scripts.launches import TINY, torch_four_ranks, torch_two_ranks


def reference_logits(preset: str, ids: np.ndarray) -> np.ndarray:
    from accel.runtime import infer, place
    from accel.targets import open_target

    model, params = from_preset(preset, seed=0)
    backend = open_target("torch:cpu", policy={})
    return infer(model, backend, place(backend, params, "float32"), ids)


@pytest.mark.parametrize("preset", TINY)
def test_tp2_forward_equals_the_single_process_logits(preset):
    outputs = torch_two_ranks()
    for rank, o in enumerate(outputs):
        got = o["tp"][preset]
        assert (got["tp"], got["dp"]) == (2, 1)
        ref = reference_logits(preset, got["ids"])
        assert got["logits"].shape == ref.shape
        assert np.abs(got["logits"] - ref).max() <= 1e-5, (preset, rank)


@pytest.mark.parametrize("preset, grid", [("qwen2-tiny", (4, 1)), ("chatglm3-tiny", (4, 1)),
                                          ("baichuan2-13b-tiny", (2, 2))])
def test_four_ranks_replicated_kv_heads_and_a_tp_dp_grid(preset, grid):
    """qwen2-tiny's 2 KV heads and chatglm3-tiny's 2 groups on 4 ranks are replicated in pairs;
    baichuan2-13b-tiny's 6 heads split 2 ways, so 4 ranks are tp=2 x dp=2 with the batch split."""
    outputs = torch_four_ranks()
    ids = np.concatenate([outputs[d * grid[0]]["tp"][preset]["ids"] for d in range(grid[1])])
    ref = reference_logits(preset, ids)
    for rank, o in enumerate(outputs):
        got = o["tp"][preset]
        assert (got["tp"], got["dp"]) == grid
        d = rank // grid[0]
        np.testing.assert_array_equal(got["ids"], ids[2 * d: 2 * d + 2])
        assert np.abs(got["logits"] - ref[2 * d: 2 * d + 2]).max() <= 1e-5, (preset, rank)


def test_the_conformance_judge_passes_these_ranks_and_fails_a_planted_error():
    import copy

    from accel.conformance.collectives import judge_tp
    from accel.targets import open_target

    backend = open_target("torch:cpu", policy={})
    outputs = torch_two_ranks()
    assert judge_tp(backend, "qwen-tiny", outputs)[0] == "pass"
    broken = copy.deepcopy(outputs)
    broken[1]["tp"]["qwen-tiny"]["logits"][0, 3, 7] += 5e-5  # one logit of one rank, 5x the bound
    status, metrics, detail = judge_tp(backend, "qwen-tiny", broken)
    assert status == "fail" and metrics["max_abs"] > 4e-5 and "max abs" in detail


# --- shard layouts (single process) -------------------------------------------------------------------


def shards(preset: str, tp: int) -> tuple[object, dict, list[parallel.TPShard]]:
    model, params = from_preset(preset, seed=0)
    return model, params, [parallel.shard(model, params, tp, r) for r in range(tp)]


@pytest.mark.parametrize("preset, name", [("qwen-tiny", "transformer.h.1.attn.c_attn.weight"),
                                          ("qwen-tiny", "transformer.h.0.attn.c_attn.bias"),
                                          ("baichuan2-7b-tiny", "model.layers.1.self_attn.W_pack.weight")])
def test_fused_qkv_is_split_block_by_block_and_refused(preset, name):
    model, params, ranks = shards(preset, 2)
    D = model.hidden_size
    full = params[name]
    for r, s in enumerate(ranks):
        half = slice(r * D // 2, (r + 1) * D // 2)
        want = np.concatenate([full[:D][half], full[D:2 * D][half], full[2 * D:][half]])  # [Q_r | K_r | V_r]
        np.testing.assert_array_equal(s.params[name], want)
    assert ranks[0].fused_splits.get(name.replace("bias", "weight")) == (D // 2,) * 3


def test_chatglm_query_key_value_with_multi_query_groups():
    model, params, ranks = shards("chatglm3-tiny", 2)
    h, g, d = model.num_heads, model.num_groups, model.head_dim
    full = params["transformer.encoder.layers.0.self_attention.query_key_value.weight"]
    q, k, v = full[: h * d], full[h * d: (h + g) * d], full[(h + g) * d:]
    for r, s in enumerate(ranks):
        got = s.params["transformer.encoder.layers.0.self_attention.query_key_value.weight"]
        np.testing.assert_array_equal(got, np.concatenate([q[r * 2 * d:(r + 1) * 2 * d], k[r * d:(r + 1) * d],
                                                           v[r * d:(r + 1) * d]]))
        assert (s.model.num_heads, s.model.num_groups, s.model.ffn_hidden_size) == (2, 1, model.ffn_hidden_size // 2)
    # dense_h_to_4h [gate | up]: gate and up split separately
    F = model.ffn_hidden_size
    full = params["transformer.encoder.layers.1.mlp.dense_h_to_4h.weight"]
    got = ranks[1].params["transformer.encoder.layers.1.mlp.dense_h_to_4h.weight"]
    np.testing.assert_array_equal(got, np.concatenate([full[F // 2: F], full[F + F // 2:]]))


def test_fewer_groups_than_ranks_replicates_the_kv_head_each_rank_reads():
    model, params, ranks = shards("chatglm3-tiny", 4)  # 4 heads, 2 groups: query heads 0,1 read group 0
    h, d = model.num_heads, model.head_dim
    full = params["transformer.encoder.layers.0.self_attention.query_key_value.weight"]
    for r, s in enumerate(ranks):
        got = s.params["transformer.encoder.layers.0.self_attention.query_key_value.weight"]
        group = r // 2
        np.testing.assert_array_equal(got[d: 2 * d], full[(h + group) * d: (h + group + 1) * d])
        assert (s.model.num_heads, s.model.num_groups) == (1, 1)


def test_heads_that_do_not_split_are_an_error():
    model, params = from_preset("baichuan2-13b-tiny")
    with pytest.raises(ModelError, match="its 6 heads do not split over 4 tensor-parallel ranks"):
        parallel.shard(model, params, 4, 0)
    assert "6 heads" in parallel.feasible(model, 4)
    assert parallel.feasible(model, 2) is None and parallel.feasible(from_preset("qwen2-tiny")[0], 4) is None


def test_alibi_slopes_are_the_global_heads_slopes_of_the_rank():
    model, _, ranks = shards("baichuan2-13b-tiny", 2)
    full = alibi_slopes(model.num_heads)
    for r, s in enumerate(ranks):
        np.testing.assert_array_equal(s.alibi_slopes, full[3 * r: 3 * r + 3])
    assert not np.allclose(ranks[0].alibi_slopes, alibi_slopes(3))  # not a 3-head model's slopes


def test_the_rank_model_is_the_family_class_with_the_global_head_dim():
    model, _, ranks = shards("qwen2-tiny", 2)
    local = ranks[0].model
    assert isinstance(local, type(model)) and type(local).forward is type(model).forward
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (2, 1, model.intermediate_size // 2)
    assert local.head_dim == model.head_dim == 16 and local.hidden_size == model.hidden_size
    assert ranks[0].row_parallel == {f"model.layers.{i}.{n}" for i in range(2)
                                     for n in ("self_attn.o_proj.weight", "mlp.down_proj.weight")}


def test_one_rank_is_the_plain_model():
    """tp=1 through the proxy: the same ops in the same order, so the logits are bit-identical."""
    from accel.runtime import place
    from accel.targets import open_target

    backend = open_target("torch:cpu", policy={})
    ops = backend.ops
    for preset in ("qwen-tiny", "baichuan2-13b-tiny"):
        model, params = from_preset(preset, seed=0)
        one = parallel.shard(model, params, 1, 0)
        ids = backend.asarray(np.arange(10)[None] % model.vocab_size, "int64")
        p = place(backend, one.params, "float32")
        calls: list[str] = []

        def record(t, op, calls=calls):
            calls.append(op)
            return t

        got = backend.compile(lambda p, x, one=one, record=record: parallel.forward(one, ops, p, x, record))(p, ids)
        want = backend.compile(lambda p, x, model=model: model.forward(ops, p, x))(p, ids)
        np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(want))
        assert calls == ["sum"] * 2 * model.num_layers  # after attention and after the MLP, every layer
