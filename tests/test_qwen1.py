"""Qwen (v1) end to end: a checkpoint in Qwen/Qwen-7B's layout loads with no key map and computes what a
float64 NumPy forward written from the published math (qwen1.md) computes, dynamic NTK and logn scaling
past seq_length included; the NTK factor is picked at prefill and kept with the KV cache; torch:cpu
equals numpy:cpu."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from accel.errors import ModelError
from accel.models import from_preset, from_pretrained, presets
from accel.models._layers import Taps
from accel.models.qwen import ntk_alpha
from accel.runtime import generate, infer, place
from accel.targets import open_target
from tests.conftest import run_cli
from tests.hf_fixtures import (
    causal_attention,
    f64,
    qwen_config,
    qwen_tensors,
    rms_norm,
    rope_half,
    silu,
    write_checkpoint,
)

S = 16  # seq_length of the test config
PROMPT = [5, 17, 33, 2, 200, 91, 7, 64, 128, 3, 250, 19, 8, 77, 140, 41, 99, 23, 180, 11, 60, 72, 6, 31]  # 24 > S


def reference(cfg: dict, tensors: dict, ids, alpha: float, logn: bool | None = None) -> np.ndarray:
    """Logits (n, vocab) of one sequence: qwen1.md sections 2.1-2.6, NTK factor given."""
    w, n = f64(tensors), len(ids)
    D, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_epsilon"]
    d, rot = D // heads, int(cfg["kv_channels"] * cfg["rotary_pct"])
    pos = np.arange(n, dtype=np.float64)
    base = cfg["rotary_emb_base"] * alpha ** (rot / (rot - 2))
    inv_freq = 1.0 / base ** (np.arange(0, rot, 2) / rot)
    use_logn = cfg["use_logn_attn"] if logn is None else logn
    q_scale = np.where(pos + 1 > cfg["seq_length"], np.log(pos + 1) / np.log(cfg["seq_length"]), 1.0)
    x = w["transformer.wte.weight"][np.asarray(ids)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        y = rms_norm(x, w[p + "ln_1.weight"], eps) @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"]
        q, k, v = (y[:, j * D:(j + 1) * D].reshape(n, heads, d) for j in range(3))
        q, k = rope_half(q, pos, inv_freq), rope_half(k, pos, inv_freq)
        if use_logn:
            q = q * q_scale[:, None, None]
        x = x + causal_attention(q, k, v).reshape(n, D) @ w[p + "attn.c_proj.weight"].T
        h = rms_norm(x, w[p + "ln_2.weight"], eps)
        x = x + (h @ w[p + "mlp.w1.weight"].T * silu(h @ w[p + "mlp.w2.weight"].T)) @ w[p + "mlp.c_proj.weight"].T
    return rms_norm(x, w["transformer.ln_f.weight"], eps) @ w["lm_head.weight"].T


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    cfg = qwen_config()
    return write_checkpoint(tmp_path_factory.mktemp("qwen") / "qwen-hf", cfg, qwen_tensors(cfg, seed=2))


@pytest.fixture(scope="module")
def loaded(qwen_dir):
    model, params = from_pretrained(qwen_dir)
    torch_cpu = open_target("torch:cpu", policy={})
    return model, torch_cpu, place(torch_cpu, params, "float32")


def run(model, backend, params, ids, taps=None):
    return np.asarray(backend.to_numpy(model.forward(backend.ops, params, backend.asarray(np.array([ids]), "int64"),
                                                     taps=taps)))[0]


@pytest.mark.parametrize("layout", ["safetensors", "bin-sharded"])
def test_checkpoint_loads_as_stored_and_equals_reference(tmp_path, layout):
    cfg = qwen_config()
    tensors = qwen_tensors(cfg, seed=2)
    directory = write_checkpoint(tmp_path / layout, cfg, tensors, layout)
    model, params = from_pretrained(directory)
    assert set(params) == set(tensors)
    # 24 tokens, seq_length 16: NTK factor 3 (published: 3 for S < L <= 2S), logn on positions 16..23
    expected = reference(cfg, tensors, PROMPT, alpha=3)
    for target, dtype in (("torch:cpu", "float32"), ("numpy:cpu", "float64")):
        backend = open_target(target, policy={})
        got = infer(model, backend, place(backend, params, dtype), np.array([PROMPT]))[0]
        assert np.abs(got - expected).max() <= 1e-4, target
    assert np.abs(expected).max() > 1.0


def test_ntk_alpha_follows_the_published_steps():
    # qwen1.md 2.5: 1 up to S, then 3 up to 2S, 7 up to 4S, 15 up to 8S
    steps = {1: 1, S: 1, S + 1: 3, 2 * S: 3, 2 * S + 1: 7, 4 * S: 7, 4 * S + 1: 15, 8 * S: 15}
    assert {n: ntk_alpha(n, S) for n in steps} == steps
    # and the bases it gives Qwen-7B (d = 128, base 1e4), as published
    for alpha, base in ((3, 30527.74), (7, 72195.86), (15, 156588.32)):
        assert 10000 * alpha ** (128 / 126) == pytest.approx(base, abs=0.01)


def test_dynamic_ntk_rotates_with_the_stretched_base(loaded):
    model, torch_cpu, params = loaded
    taps = Taps()
    with_ntk = run(model, torch_cpu, params, PROMPT, taps)
    without = run(dataclasses.replace(model, use_dynamic_ntk=False), torch_cpu, params, PROMPT)
    assert np.abs(with_ntk - without).max() > 1e-2
    # head 0 of layer 0 by hand: RoPE of the split q, k with base 10000 * 3 ** (d / (d - 2)), d = 16
    q, k = (np.asarray(taps[f"layers.0.{n}"], np.float64)[0, :, 0] for n in "qk")  # (n, d)
    base = 10000 * 3 ** (16 / 14)
    theta = np.arange(len(PROMPT))[:, None] * base ** (-np.arange(0, 16, 2) / 16)[None, :]  # (n, 8)

    def rotate(x):
        a, b = x[:, :8], x[:, 8:]
        return np.concatenate([a * np.cos(theta) - b * np.sin(theta), b * np.cos(theta) + a * np.sin(theta)], 1)

    scores = rotate(q) @ rotate(k).T
    ours = np.asarray(taps["layers.0.q_rope"], np.float64)[0, :, 0] @ np.asarray(taps["layers.0.k_rope"])[0, :, 0].T
    np.testing.assert_allclose(ours, scores, atol=1e-4)


def test_ntk_factor_is_kept_from_prefill_for_decode(loaded, qwen_dir):
    """A 12-token prompt (<= S) prefills with factor 1; decoding on its cache past S keeps 1, while a
    forward without cache over the same 24 tokens picks 3."""
    model, torch_cpu, params = loaded
    cfg = json.loads((qwen_dir / "config.json").read_text())
    tensors = qwen_tensors(cfg, seed=2)
    cache = model.new_cache()
    step = model.forward(torch_cpu.ops, params, torch_cpu.asarray(np.array([PROMPT[:12]]), "int64"), cache)
    decoded = [np.asarray(step)[0, -1]]
    for token in PROMPT[12:]:
        step = model.forward(torch_cpu.ops, params, torch_cpu.asarray(np.array([[token]]), "int64"), cache)
        decoded.append(np.asarray(step)[0, -1])
    decoded = np.stack(decoded)  # logits at positions 11 .. 23
    kept = reference(cfg, tensors, PROMPT, alpha=1)[11:]
    assert np.abs(decoded - kept).max() <= 1e-4
    recomputed = run(model, torch_cpu, params, PROMPT)[11:]
    assert np.abs(recomputed - reference(cfg, tensors, PROMPT, alpha=3)[11:]).max() <= 1e-4
    assert np.abs(recomputed - decoded).max() > 1e-2


def test_logn_scales_queries_past_seq_length_only(loaded, qwen_dir):
    model, torch_cpu, params = loaded
    model = dataclasses.replace(model, use_dynamic_ntk=False)
    cfg = json.loads((qwen_dir / "config.json").read_text())
    scaled = run(model, torch_cpu, params, PROMPT)
    plain = run(dataclasses.replace(model, use_logn_attn=False), torch_cpu, params, PROMPT)
    np.testing.assert_allclose(scaled[:S], plain[:S], atol=1e-6)  # positions 0..15: log_S(p + 1) <= 1
    assert np.abs(scaled[S:] - plain[S:]).max(axis=-1).min() > 1e-3  # every later position changes
    tensors = qwen_tensors(cfg, seed=2)
    assert np.abs(scaled - reference(cfg, tensors, PROMPT, alpha=1, logn=True)).max() <= 1e-4
    assert np.abs(plain - reference(cfg, tensors, PROMPT, alpha=1, logn=False)).max() <= 1e-4
    assert math.log(24) / math.log(S) > 1.1  # the factor at the last position is far from 1


def test_kv_cache_generation_equals_full_recomputation(loaded):
    model, torch_cpu, params = loaded
    # prompt 20 > S: factor 3 at prefill, and still 3 for every recomputed length up to 29 <= 2S
    cached = generate(model, torch_cpu, params, np.array([PROMPT[:20]]), 10, use_cache=True)
    full = generate(model, torch_cpu, params, np.array([PROMPT[:20]]), 10, use_cache=False)
    np.testing.assert_array_equal(cached, full)
    assert len(set(cached[0].tolist())) > 1


def test_accel_generate_json_equals_reference_greedy(qwen_dir):
    prompt = PROMPT[:20]
    r = run_cli("generate", "--model", str(qwen_dir), "--input-ids", ",".join(map(str, prompt)),
                "--max-new-tokens", "6", "--target", "torch:cpu", "--dtype", "float32", "--json")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((qwen_dir / "config.json").read_text())
    tensors = qwen_tensors(cfg, seed=2)
    seq = list(prompt)
    for _ in range(6):  # lengths 20..25: factor 3 throughout
        seq.append(int(np.argmax(reference(cfg, tensors, seq, alpha=3)[-1])))
    assert json.loads(r.stdout)["new_tokens"] == seq[len(prompt):]


def test_torch_cpu_equals_numpy_reference_on_the_tiny_preset():
    model, params = from_preset("qwen-tiny")
    ids = np.array([PROMPT[:12], PROMPT[12:]])  # past the preset's seq_length 8: logn acts
    ref, torch_cpu = open_target("numpy:cpu"), open_target("torch:cpu", policy={})
    expected = infer(model, ref, place(ref, params, "float64"), ids)
    for dtype, tol in (("float32", 1e-4), ("bfloat16", 5e-2)):
        assert np.abs(infer(model, torch_cpu, place(torch_cpu, params, dtype), ids) - expected).max() <= tol, dtype


@pytest.mark.parametrize("overrides, needle", [(dict(use_cache_quantization=True), "use_cache_quantization"),
                                               (dict(kv_channels=8), "kv_channels"),
                                               (dict(no_bias=False), "no_bias")])
def test_unsupported_variants_are_refused(tmp_path, overrides, needle):
    directory = write_checkpoint(tmp_path / needle, qwen_config(**overrides), {})
    with pytest.raises(ModelError, match=needle):
        from_pretrained(directory)


def test_preset_parameter_counts_match_published_totals():
    # qwen1.md section 4; 72B confirmed by its index: total_size 144,575,840,256 bytes / 2
    counts = {n: presets()[n].preset(n).num_parameters() for n in ("qwen-7b", "qwen-14b", "qwen-72b")}
    assert counts == {"qwen-7b": 7_721_324_544, "qwen-14b": 14_167_290_880, "qwen-72b": 72_287_920_128}


def test_training_stretches_nothing_past_seq_length(loaded, qwen_dir):
    """The original applies dynamic NTK and logn scaling only when not training (`self.training`): the
    training loss of a sequence past seq_length is that of the plain model, while inference stretches."""
    from accel.train import lm_loss

    model, torch_cpu, params = loaded
    cfg = json.loads((qwen_dir / "config.json").read_text())
    ids = np.array([PROMPT[:-1]])
    labels = np.array([PROMPT[1:]])
    loss = float(torch_cpu.to_numpy(lm_loss(model, torch_cpu.ops, params, torch_cpu.asarray(ids, "int64"),
                                            torch_cpu.asarray(labels, "int64"))))
    plain = reference(cfg, qwen_tensors(cfg, seed=2), PROMPT[:-1], alpha=1, logn=False).astype(np.float64)
    logp = plain - plain.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want = -np.mean(logp[np.arange(len(PROMPT) - 1), labels[0]])
    assert abs(loss - want) <= 1e-5 * abs(want)
    stretched = run(model, torch_cpu, params, PROMPT[:-1])  # inference: NTK and logn past seq_length
    assert np.abs(stretched - plain).max() > 1e-3
