"""Shared fixtures: tiny checkpoints written in the exact HF layout by the original implementations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
os.environ.pop("ACCEL_TARGET", None)
os.environ.pop("ACCEL_OPS", None)

QWEN2_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=128, rms_norm_eps=1e-6)


def save_hf_qwen2(path: Path, seed: int = 0, **overrides) -> Path:
    """A random Qwen2ForCausalLM saved with save_pretrained (float32, safetensors)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    max_shard_size = overrides.pop("max_shard_size", "2GB")
    bin_shards = overrides.pop("bin_shards", 0)
    torch.manual_seed(seed)
    cfg = Qwen2Config(**(QWEN2_TINY | overrides))
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises biases and norms to 0/1; randomise so that mistakes show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, max_shard_size=max_shard_size)
    if bin_shards:
        to_torch_bin(path, bin_shards)
    return path


def to_torch_bin(directory: Path, shards: int = 1) -> None:
    """Rewrite an HF checkpoint's safetensors as pytorch_model.bin in the layout transformers 4 wrote
    (sharded: pytorch_model-0000i-of-0000n.bin plus pytorch_model.bin.index.json)."""
    import json

    import torch
    from safetensors.torch import load_file

    state = {}
    for f in sorted(directory.glob("*.safetensors")):
        state |= load_file(f)
        f.unlink()
    (directory / "model.safetensors.index.json").unlink(missing_ok=True)
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return
    names = list(state)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: state[n] for n in part}, directory / file)
        weight_map |= dict.fromkeys(part, file)
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> Path:
    return save_hf_qwen2(tmp_path_factory.mktemp("qwen2") / "qwen2-hf")


TINY = sorted(name for name in __import__("accel.models", fromlist=["presets"]).presets() if name.endswith("-tiny"))


@pytest.fixture(scope="session")
def torch_cpu():
    from accel.targets import open_target

    return open_target("torch:cpu", policy={})


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory):
    """One export cache for the session's ORT, TVM and compare tests, so they share artifacts."""
    path = tmp_path_factory.getbasetemp() / "accel-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCEL_CACHE_DIR", str(path))
        yield path


def prefill_and_tokens(backend, model, params, ids, new_tokens=8):
    """(prefill logits as float32, greedy tokens, the KV cache) through one compiled forward."""
    import numpy as np

    from accel.runtime import forward_fn, place

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
    return first, tokens, cache


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`accel ARGS` in a fresh interpreter, as a user runs it. The limit only stops a hang: the slowest
    command a test runs takes ~70 s on a quiet 2-core machine, and must pass at 4x that under load."""
    return subprocess.run([sys.executable, "-m", "accel.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=1800)


def assert_generates_like(backend, reference, preset):
    """Prefill logits within 1e-4 of the reference's and the same 8 greedy tokens, float32; returns the
    backend's KV cache."""
    from accel.models import from_preset

    model, params = from_preset(preset)
    ids = np.random.default_rng(7).integers(0, model.vocab_size, (1, 9))
    got, got_tokens, cache = prefill_and_tokens(backend, model, params, ids)
    want, want_tokens, _ = prefill_and_tokens(reference, model, params, ids)
    assert np.abs(want).max() > 0.1
    assert np.abs(got - want).max() <= 1e-4
    assert got_tokens == want_tokens and len(set(want_tokens)) > 1
    return cache


def assert_trains_like(backend, reference, steps=10):
    """`steps` training steps of qwen2-tiny on prompt-masked batches: per-step loss within 1e-4 relative."""
    from accel.models import from_preset
    from accel.train import train

    model, params = from_preset("qwen2-tiny")
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(steps):
        tokens = rng.integers(0, model.vocab_size, (2, 17))
        labels = tokens[:, 1:].copy()
        labels[:, :4] = -100  # a prompt's labels
        batches.append({"input_ids": tokens[:, :-1], "labels": labels})
    want, got = (np.array([r.loss for r in train(model, b, params, batches, steps, 1e-3)])
                 for b in (reference, backend))
    assert len(got) == steps and want[-1] != want[0]  # the weights moved
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=0)
