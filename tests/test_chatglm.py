"""ChatGLM2/3 end to end: a checkpoint in THUDM's layout loads with no key map and computes what
transformers' GlmForCausalLM (the same architecture, its weights converted to Glm's names as
transformers' convert_glm_weights_to_hf does) computes; torch:cpu equals numpy:cpu; the KV cache gives
the tokens of full recomputation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from accel.errors import ModelError
from accel.models import from_pretrained, presets
from accel.models._layers import Taps
from accel.runtime import generate, infer, place
from accel.targets import open_target
from tests.conftest import run_cli
from tests.hf_fixtures import chatglm_config, chatglm_tensors, write_checkpoint

IDS = [5, 17, 33, 2, 200, 91, 7, 64, 128, 3, 250, 19]


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory):
    cfg = chatglm_config()
    return write_checkpoint(tmp_path_factory.mktemp("chatglm") / "chatglm3-hf", cfg, chatglm_tensors(cfg, seed=1))


def glm_reference(cfg: dict, tensors: dict[str, np.ndarray]):
    """transformers' GlmForCausalLM with the ChatGLM weights under Glm's names: query_key_value split by
    rows into q/k/v_proj, dense_h_to_4h copied to gate_up_proj ([gate | up] in both), inv_freq dropped."""
    import torch
    from transformers import GlmConfig, GlmForCausalLM

    H, d = cfg["num_attention_heads"], cfg["kv_channels"]
    G = cfg["multi_query_group_num"]
    config = GlmConfig(
        vocab_size=cfg["padded_vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["ffn_hidden_size"],
        num_hidden_layers=cfg["num_layers"], num_attention_heads=H, num_key_value_heads=G, head_dim=d,
        rms_norm_eps=cfg["layernorm_epsilon"], max_position_embeddings=cfg["seq_length"], attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * cfg.get("rope_ratio", 1),
                         "partial_rotary_factor": 0.5},
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=2)
    sd = {"model.embed_tokens.weight": tensors["transformer.embedding.word_embeddings.weight"],
          "model.norm.weight": tensors["transformer.encoder.final_layernorm.weight"],
          "lm_head.weight": tensors["transformer.output_layer.weight"]}
    for i in range(cfg["num_layers"]):
        src, dst = f"transformer.encoder.layers.{i}.", f"model.layers.{i}."
        for part in ("weight", "bias"):
            fused = tensors[src + f"self_attention.query_key_value.{part}"]
            sd[dst + f"self_attn.q_proj.{part}"] = fused[: H * d]
            sd[dst + f"self_attn.k_proj.{part}"] = fused[H * d: H * d + G * d]
            sd[dst + f"self_attn.v_proj.{part}"] = fused[H * d + G * d:]
        sd |= {dst + "input_layernorm.weight": tensors[src + "input_layernorm.weight"],
               dst + "post_attention_layernorm.weight": tensors[src + "post_attention_layernorm.weight"],
               dst + "self_attn.o_proj.weight": tensors[src + "self_attention.dense.weight"],
               dst + "mlp.gate_up_proj.weight": tensors[src + "mlp.dense_h_to_4h.weight"],
               dst + "mlp.down_proj.weight": tensors[src + "mlp.dense_4h_to_h.weight"]}
    model = GlmForCausalLM(config).eval()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    return model


def glm_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits.numpy()


def ours(directory, ids, target="torch:cpu", dtype="float32") -> np.ndarray:
    model, params = from_pretrained(directory)
    backend = open_target(target, policy={})
    return infer(model, backend, place(backend, params, dtype), np.array([ids]))


def test_checkpoint_loads_as_stored_and_equals_transformers_glm(glm_dir):
    cfg = json.loads((glm_dir / "config.json").read_text())
    tensors = chatglm_tensors(cfg, seed=1)
    model, params = from_pretrained(glm_dir)
    assert set(params) == set(tensors)  # every original tensor, the inv_freq buffer included, by its name
    assert params["transformer.rotary_pos_emb.inv_freq"].dtype == np.float16
    ref = glm_logits(glm_reference(cfg, tensors), IDS)
    got = ours(glm_dir, IDS)
    assert np.abs(ref).max() > 1.0
    assert np.abs(got - ref).max() <= 1e-4
    numpy_ref = ours(glm_dir, IDS, "numpy:cpu", "float64")
    assert np.abs(numpy_ref - ref).max() <= 1e-4


@pytest.mark.parametrize("layout", ["bin", "bin-sharded"])
def test_pytorch_model_bin_layouts(tmp_path, glm_dir, layout):
    cfg = chatglm_config()
    directory = write_checkpoint(tmp_path / layout, cfg, chatglm_tensors(cfg, seed=1), layout)
    assert not (directory / "model.safetensors").exists()
    np.testing.assert_array_equal(ours(directory, IDS), ours(glm_dir, IDS))


def test_rope_ratio_scales_the_rotary_base(tmp_path, glm_dir):
    # ChatGLM3-6B-32k style: base = 10000 * rope_ratio
    cfg = chatglm_config(rope_ratio=50)
    tensors = chatglm_tensors(cfg, seed=1)
    directory = write_checkpoint(tmp_path / "ratio", cfg, tensors)
    got = ours(directory, IDS)
    assert np.abs(got - glm_logits(glm_reference(cfg, tensors), IDS)).max() <= 1e-4
    assert np.abs(got - ours(glm_dir, IDS))[:, 1:].max() > 1e-2  # position 0 does not rotate


def test_torch_cpu_equals_numpy_reference(glm_dir):
    model, params = from_pretrained(glm_dir)
    ids = np.array([IDS, IDS[::-1]])
    ref, torch_cpu = open_target("numpy:cpu"), open_target("torch:cpu", policy={})
    expected = infer(model, ref, place(ref, params, "float64"), ids)
    got = infer(model, torch_cpu, place(torch_cpu, params, "float32"), ids)
    assert np.abs(got - expected).max() <= 1e-4


def test_kv_cache_generation_equals_full_recomputation(glm_dir):
    model, params = from_pretrained(glm_dir)
    torch_cpu = open_target("torch:cpu", policy={})
    p = place(torch_cpu, params, "float32")
    cached = generate(model, torch_cpu, p, np.array([IDS]), 12, use_cache=True)
    full = generate(model, torch_cpu, p, np.array([IDS]), 12, use_cache=False)
    np.testing.assert_array_equal(cached, full)
    assert len(set(cached[0].tolist())) > 1


def test_accel_generate_json_equals_glm_greedy(glm_dir):
    import torch

    r = run_cli("generate", "--model", str(glm_dir), "--input-ids", ",".join(map(str, IDS)),
                "--max-new-tokens", "8", "--target", "torch:cpu", "--dtype", "float32", "--json")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((glm_dir / "config.json").read_text())
    glm = glm_reference(cfg, chatglm_tensors(cfg, seed=1))
    seq = list(IDS)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(glm(torch.tensor([seq])).logits[0, -1].argmax()))
    assert json.loads(r.stdout)["new_tokens"] == seq[len(IDS):]


def test_taps_name_the_split_of_the_fused_projection(glm_dir):
    model, params = from_pretrained(glm_dir)
    ref = open_target("numpy:cpu")
    taps = Taps()
    model.forward(ref.ops, place(ref, params, "float64"), np.array([IDS]), taps=taps)
    assert taps.ops["layers.0.q"] == taps.ops["layers.0.k"] == "split"
    assert taps.ops["layers.1.q_rope"] == "rope" and taps.ops["layers.1.mlp_act"] == "swiglu"
    # Q is the first heads * d rows of query_key_value, K the next groups * d
    w = params["transformer.encoder.layers.0.self_attention.query_key_value.weight"].astype(np.float64)
    b = params["transformer.encoder.layers.0.self_attention.query_key_value.bias"].astype(np.float64)
    y = taps["layers.0.input_norm"][0] @ w.T + b  # (s, 4 * 16 + 2 * 2 * 16)
    np.testing.assert_allclose(taps["layers.0.q"][0], y[:, :64].reshape(len(IDS), 4, 16), atol=1e-12)
    np.testing.assert_allclose(taps["layers.0.k"][0], y[:, 64:96].reshape(len(IDS), 2, 16), atol=1e-12)
    # only the first half of each head rotates
    np.testing.assert_array_equal(taps["layers.0.q_rope"][..., 8:], taps["layers.0.q"][..., 8:])
    assert np.abs(taps["layers.0.q_rope"][0, 1:, :, :8] - taps["layers.0.q"][0, 1:, :, :8]).max() > 1e-3


@pytest.mark.parametrize("field, value", [("quantization_bit", 4), ("rmsnorm", False), ("pre_seq_len", 128)])
def test_unsupported_variants_are_refused(tmp_path, field, value):
    directory = write_checkpoint(tmp_path / field, chatglm_config(**{field: value}), {})
    with pytest.raises(ModelError, match=field):
        from_pretrained(directory)


def test_preset_parameter_counts_match_published_totals():
    # chatglm.md section 4: 6,243,584,000 (index total_size 12,487,168,064 = 2 bytes each + the fp16 inv_freq)
    for name in ("chatglm2-6b", "chatglm3-6b"):
        assert presets()[name].preset(name).num_parameters() == 6_243_584_000
