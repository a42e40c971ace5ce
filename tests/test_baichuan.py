"""Baichuan2 end to end: checkpoints in the layout of Baichuan2-7B (RoPE) and Baichuan2-13B (ALiBi) load
with no key map and compute what a float64 NumPy forward written from the published math (baichuan.md)
computes: W_pack split, ALiBi slopes with the interleave for head counts that are not powers of two,
NormHead; the variant is told from config.json as the originals' configs differ; torch:cpu equals
numpy:cpu; the KV cache gives the tokens of full recomputation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from accel.errors import ModelError
from accel.models import from_pretrained, presets
from accel.models._layers import Taps, alibi_slopes
from accel.models.baichuan import Baichuan
from accel.runtime import generate, infer, place
from accel.targets import open_target
from tests.conftest import run_cli
from tests.hf_fixtures import (
    baichuan_config,
    baichuan_tensors,
    causal_attention,
    f64,
    rms_norm,
    rope_half,
    silu,
    write_checkpoint,
)

IDS = [5, 17, 33, 2, 200, 91, 7, 64, 128, 3, 250, 19, 8, 77]


def slopes_from_formula(n: int) -> np.ndarray:
    """baichuan.md 2.5 in closed form: with c the largest power of two <= n, 2^(-8(i + 1)/c) for i < c,
    then 2^(-8(2k + 1)/(2c)) (the odd steps of the 2c-head sequence) for k < n - c."""
    c = 2 ** int(math.floor(math.log2(n)))
    return np.array([2.0 ** (-8.0 * (i + 1) / c) for i in range(c)]
                    + [2.0 ** (-8.0 * (2 * k + 1) / (2 * c)) for k in range(n - c)])


def reference(cfg: dict, tensors: dict, ids, alibi: bool) -> np.ndarray:
    """Logits (n, vocab) of one sequence: baichuan.md sections 2.1-2.6 (13B's inference bias slope * j)."""
    w, n = f64(tensors), len(ids)
    D, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["rms_norm_eps"]
    d = D // heads
    pos = np.arange(n, dtype=np.float64)
    inv_freq = 1.0 / 10000 ** (np.arange(0, d, 2) / d)
    slopes = slopes_from_formula(heads).astype(np.float32)  # the original stores them as a float32 tensor
    bias = np.broadcast_to(slopes[:, None, None] * pos[None, None, :], (heads, n, n)) if alibi else None
    x = w["model.embed_tokens.weight"][np.asarray(ids)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.self_attn.", f"model.layers.{i}."
        y = rms_norm(x, w[p[1] + "input_layernorm.weight"], eps) @ w[p[0] + "W_pack.weight"].T
        q, k, v = (y[:, j * D:(j + 1) * D].reshape(n, heads, d) for j in range(3))
        if not alibi:
            q, k = rope_half(q, pos, inv_freq), rope_half(k, pos, inv_freq)
        x = x + causal_attention(q, k, v, bias).reshape(n, D) @ w[p[0] + "o_proj.weight"].T
        h = rms_norm(x, w[p[1] + "post_attention_layernorm.weight"], eps)
        m = silu(h @ w[p[1] + "mlp.gate_proj.weight"].T) * (h @ w[p[1] + "mlp.up_proj.weight"].T)
        x = x + m @ w[p[1] + "mlp.down_proj.weight"].T
    head = w["lm_head.weight"]
    head = head / np.maximum(np.linalg.norm(head, axis=1, keepdims=True), 1e-12)
    return rms_norm(x, w["model.norm.weight"], eps) @ head.T


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("baichuan")
    return {v: write_checkpoint(root / f"baichuan2-{v}", baichuan_config(v), baichuan_tensors(baichuan_config(v), 3),
                                "safetensors" if v == "7b" else "bin")
            for v in ("7b", "13b")}


def load(directory, target="torch:cpu", dtype="float32"):
    model, params = from_pretrained(directory)
    backend = open_target(target, policy={})
    return model, backend, place(backend, params, dtype)


@pytest.mark.parametrize("variant", ["7b", "13b"])
def test_checkpoint_loads_as_stored_and_equals_reference(dirs, variant):
    cfg = baichuan_config(variant)
    tensors = baichuan_tensors(cfg, 3)
    model, params = from_pretrained(dirs[variant])
    assert set(params) == set(tensors)
    assert model.alibi == (variant == "13b")
    expected = reference(cfg, tensors, IDS, alibi=variant == "13b")
    for target, dtype in (("torch:cpu", "float32"), ("numpy:cpu", "float64")):
        backend = open_target(target, policy={})
        got = infer(model, backend, place(backend, params, dtype), np.array([IDS]))[0]
        assert np.abs(got - expected).max() <= 1e-4, target
    # the position encoding matters: the other variant's computes something else
    assert np.abs(expected - reference(cfg, tensors, IDS, alibi=variant != "13b")).max() > 1e-2


def test_alibi_slopes_with_the_interleave():
    ours = alibi_slopes(40)
    np.testing.assert_allclose(ours, slopes_from_formula(40), rtol=1e-7)
    # values listed in baichuan.md for Baichuan2-13B's 40 heads
    published = {0: 0.840896428, 1: 0.707106769, 7: 0.25, 31: 0.00390625, 32: 0.917004049, 33: 0.771105409,
                 38: 0.324209899, 39: 0.272626936}
    for head, value in published.items():
        assert ours[head] == pytest.approx(value, rel=1e-7), head
    np.testing.assert_array_equal(alibi_slopes(6), [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])
    np.testing.assert_allclose(alibi_slopes(32), 2.0 ** (-np.arange(1, 33) / 4), rtol=1e-7)


def test_norm_head_divides_each_row_by_its_norm(dirs):
    model, backend, params = load(dirs["13b"], "numpy:cpu", "float64")
    taps = Taps()
    logits = np.asarray(model.forward(backend.ops, params, np.array([IDS]), taps=taps))[0]
    w = np.asarray(params["lm_head.weight"])
    h = np.asarray(taps["final_norm"])[0, 5]
    np.testing.assert_allclose(logits[5], [h @ row / np.sqrt(row @ row) for row in w], rtol=1e-10)
    # scaling a row of the stored weight leaves the logits as they are
    scaled = dict(params, **{"lm_head.weight": w * np.where(np.arange(len(w)) == 17, 5.0, 1.0)[:, None]})
    np.testing.assert_allclose(np.asarray(model.forward(backend.ops, scaled, np.array([IDS])))[0], logits,
                               rtol=1e-12, atol=1e-12)
    assert np.abs(logits[:, 17]).max() > 0.1


def test_variant_is_told_from_the_config():
    real_7b = baichuan_config("7b", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, vocab_size=125696)
    real_13b = baichuan_config("13b", hidden_size=5120, intermediate_size=13696, num_hidden_layers=40,
                               num_attention_heads=40, vocab_size=125696)
    assert not Baichuan.from_hf_config(real_7b, "7b").alibi
    assert Baichuan.from_hf_config(real_13b, "13b").alibi
    # a 7B config.json written before max_position_embeddings was added: its width tells
    early_7b = {k: v for k, v in real_7b.items() if k != "max_position_embeddings"}
    assert not Baichuan.from_hf_config(early_7b, "7b").alibi
    for name in ("baichuan2-7b", "baichuan2-13b"):
        assert presets()[name].preset(name) == Baichuan.from_hf_config(real_7b if "7b" in name else real_13b, name)
    with pytest.raises(ModelError, match="Baichuan 1"):
        Baichuan.from_hf_config(baichuan_config("13b", vocab_size=64000), "baichuan-13b")


@pytest.mark.parametrize("variant", ["7b", "13b"])
def test_kv_cache_generation_equals_full_recomputation(dirs, variant):
    model, backend, params = load(dirs[variant])
    cached = generate(model, backend, params, np.array([IDS]), 10, use_cache=True)
    full = generate(model, backend, params, np.array([IDS]), 10, use_cache=False)
    np.testing.assert_array_equal(cached, full)
    assert len(set(cached[0].tolist())) > 1


def test_torch_cpu_equals_numpy_reference_in_batches(dirs):
    for directory in dirs.values():
        model, params = from_pretrained(directory)
        ids = np.array([IDS, IDS[::-1]])
        ref, torch_cpu = open_target("numpy:cpu"), open_target("torch:cpu", policy={})
        expected = infer(model, ref, place(ref, params, "float64"), ids)
        assert np.abs(infer(model, torch_cpu, place(torch_cpu, params, "float32"), ids) - expected).max() <= 1e-4


def test_accel_generate_json_equals_reference_greedy(dirs):
    r = run_cli("generate", "--model", str(dirs["13b"]), "--input-ids", ",".join(map(str, IDS)),
                "--max-new-tokens", "6", "--target", "torch:cpu", "--dtype", "float32", "--json")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((dirs["13b"] / "config.json").read_text())
    tensors = baichuan_tensors(cfg, 3)
    seq = list(IDS)
    for _ in range(6):
        seq.append(int(np.argmax(reference(cfg, tensors, seq, alibi=True)[-1])))
    assert json.loads(r.stdout)["new_tokens"] == seq[len(IDS):]


def test_preset_parameter_counts_match_published_totals():
    # baichuan.md section 4 (7B cross-checked by its shard sizes, 2 bytes x 7.506B)
    assert presets()["baichuan2-7b"].preset("baichuan2-7b").num_parameters() == 7_505_973_248
    assert presets()["baichuan2-13b"].preset("baichuan2-13b").num_parameters() == 13_896_668_160
    tiny = presets()["baichuan2-13b-tiny"].preset("baichuan2-13b-tiny")
    assert tiny.alibi and not math.log2(tiny.num_heads).is_integer()
