"""Loading maps the checkpoint: a tensor whose dtype already matches reaches torch:cpu as a view of a
copy-on-write mapping of the user's file (no copy), a cast goes tensor by tensor, and the file is
never written. Each test fails on a loader that copies tensors into fresh arrays."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import weakref
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from accel.checkpoint import safetensors
from accel.models import from_pretrained
from accel.runtime import place, place_lazily

torch = pytest.importorskip("torch")

BF16 = np.dtype(ml_dtypes.bfloat16)


def qwen2_config(**sizes: int) -> dict:
    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)
    return dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rms_norm_eps=1e-6, rope_theta=10000.0,
                tie_word_embeddings=False, torch_dtype="bfloat16") | cfg | sizes


def write_bf16_checkpoint(directory: Path, cfg: dict, seed: int = 0) -> int:
    """A Qwen2 checkpoint of random bfloat16 weights; returns the weights' bytes."""
    from accel.models.qwen import Qwen2

    rng = np.random.default_rng(seed)
    spec = Qwen2.from_hf_config(cfg, name=directory.name).param_spec()
    tensors = {n: (0.02 * rng.standard_normal(p.shape, np.float32)).astype(BF16) for n, p in spec.items()}
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(cfg))
    safetensors.write(directory / "model.safetensors", tensors, {"format": "pt"})
    return sum(t.nbytes for t in tensors.values())


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    write_bf16_checkpoint(tmp_path / "ckpt", qwen2_config())
    return tmp_path / "ckpt"


def torch_cpu():
    from accel.targets import open_target

    return open_target("torch:cpu")


def mapping_of(a: np.ndarray) -> object:
    """What an array's memory belongs to, past the views in between."""
    owner: object = a
    while isinstance(owner, np.ndarray | memoryview):
        owner = owner.base if isinstance(owner, np.ndarray) else owner.obj
    return owner


def test_matching_dtype_is_placed_as_a_view_of_the_file_mapping(checkpoint: Path) -> None:
    _, params = from_pretrained(checkpoint)
    for name, a in params.items():
        assert isinstance(mapping_of(a), mmap.mmap), f"{name} was copied out of the file"
    placed = place(torch_cpu(), params, "bfloat16")
    for name, a in params.items():
        t = placed[name]
        assert t.dtype == torch.bfloat16 and t.data_ptr() == a.ctypes.data, f"{name} was copied on placing"


def test_a_write_to_a_placed_tensor_never_reaches_the_file(checkpoint: Path) -> None:
    path = checkpoint / "model.safetensors"
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    model, params = from_pretrained(checkpoint)
    placed = place(torch_cpu(), params, "bfloat16")
    t = placed["model.embed_tokens.weight"]
    t.add_(1.0)  # the tensor aliases the mapping: copy-on-write keeps this in private pages
    assert float(np.asarray(params["model.embed_tokens.weight"], np.float32).min()) > 0.5
    del placed, params, t
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime
    _, again = from_pretrained(checkpoint)  # a fresh mapping sees the file's bytes, not the write
    assert float(np.abs(np.asarray(again["model.embed_tokens.weight"], np.float32)).max()) < 0.5


def test_a_cast_goes_tensor_by_tensor(checkpoint: Path) -> None:
    _, params = from_pretrained(checkpoint)
    backend = torch_cpu()
    given: list[weakref.ref] = []
    alive_at_call: list[int] = []
    asarray = backend.asarray

    def counting(a, dtype=None):
        alive_at_call.append(sum(r() is not None for r in given))
        given.append(weakref.ref(a))
        return asarray(a, dtype)

    backend.asarray = counting
    n = len(params)
    placed = place(backend, params, "float32", consume=True)
    assert not params and len(placed) == n
    assert all(t.dtype == torch.float32 for t in placed.values())
    # each source tensor (and with it its mapping) is gone by the time the next one is cast
    assert max(alive_at_call) == 0, alive_at_call


def test_cast_values_match_the_file(checkpoint: Path) -> None:
    expected = safetensors.SafetensorsFile(checkpoint / "model.safetensors")
    _, params = from_pretrained(checkpoint)
    placed = place(torch_cpu(), params, "float32", consume=True)
    for name, t in placed.items():
        np.testing.assert_array_equal(t.numpy(), np.asarray(expected.get(name), np.float32))


RSS_CHILD = """
import argparse, sys
from pathlib import Path

def anon():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

from accel.commands._common import open_run
from accel.runtime import infer
import numpy as np
import torch  # imported before the first reading, so that only loading and the forward are counted
base = anon()
args = argparse.Namespace(model=sys.argv[1], seed=0, target="torch:cpu", dtype="bfloat16")
model, backend, params, dtype = open_run(args)
infer(model, backend, params, np.arange(8)[None])
print(anon() - base)
"""


def test_anonymous_memory_stays_far_below_the_weights(tmp_path: Path) -> None:
    """About 200 MB of bfloat16 weights through open_run and a forward: the growth of anonymous (not
    file-backed) memory must stay under half the weights; a loader that copies them doubles it."""
    cfg = qwen2_config(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=5,
                       num_attention_heads=16, num_key_value_heads=2)
    nbytes = write_bf16_checkpoint(tmp_path / "ckpt", cfg)
    assert nbytes > 150e6
    env = dict(os.environ, ACCEL_TARGET="torch:cpu")
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(tmp_path / "ckpt")], capture_output=True,
                         text=True, timeout=600, env=env, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    grown = int(out.stdout.split()[-1])
    assert grown < 0.5 * nbytes, f"anonymous memory grew {grown / 1e6:.0f} MB for {nbytes / 1e6:.0f} MB of weights"


def test_mindspore_aliases_a_writeable_array() -> None:
    pytest.importorskip("mindspore")
    from accel.targets import open_target

    backend = open_target("mindspore:cpu")
    a = np.arange(6, dtype=np.float32)
    t = backend.asarray(a, "float32")
    a[0] = 42.0  # Tensor.from_numpy shares the buffer; ms.Tensor(ndarray) would have copied it
    assert backend.to_numpy(t)[0] == 42.0
    ro = np.arange(6, dtype=np.float32)
    ro.flags.writeable = False
    t = backend.asarray(ro, "float32")  # a read-only buffer is copied, never handed to kernels
    assert backend.to_numpy(t).tolist() == ro.tolist()


@pytest.mark.parametrize("name", ["chatglm3-tiny", "qwen-tiny", "qwen2-tiny", "baichuan2-13b-tiny"])
def test_reference_on_weights_as_stored_equals_the_float64_copy(monkeypatch, name):
    """The float64 reference fed bfloat16 weights as stored (each op casts them, linear a block of rows
    at a time) computes what it computes on a whole float64 copy of them, to float64 rounding."""
    from accel import ops
    from accel.models import from_preset
    from accel.targets import open_target

    monkeypatch.setattr(ops, "_CAST_BLOCK", 1000)  # every weight of the tiny model takes the blocked path
    ref = open_target("numpy:cpu", policy={})
    model, params = from_preset(name, seed=0)
    stored = {k: v.astype(ml_dtypes.bfloat16) if v.dtype.kind == "f" else v for k, v in params.items()}
    ids = ref.asarray(np.random.default_rng(0).integers(0, model.vocab_size, (2, 9)), "int64")
    whole = model.forward(ref.ops, place(ref, stored, "float64"), ids)
    lazy = model.forward(ref.ops, place_lazily(ref, stored, "float64", as_stored=0), ids)
    assert lazy.dtype == np.float64
    np.testing.assert_allclose(lazy, whole, rtol=0, atol=1e-13 * np.abs(whole).max())
