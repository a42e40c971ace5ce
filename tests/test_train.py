"""Training over the op set: AdamW against torch.optim.AdamW, the masked loss against a NumPy
computation, full and LoRA fine-tuning of every tiny preset matching between mindspore:cpu and torch:cpu,
and `accel train` (per-step losses, checkpoints a loader reads back, one-line errors)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from accel import lora as lora_mod
from accel.cli import main
from accel.errors import UsageError
from accel.models import from_preset, from_pretrained
from accel.runtime import place
from accel.targets import open_target
from accel.train import AdamW, adamw_init, adamw_update, lm_loss, to_host, train
from tests.conftest import TINY

LR = 1e-3


@pytest.fixture(scope="module")
def ms_cpu():
    return open_target("mindspore:cpu", policy={})



def make_batches(vocab: int, n: int, seed: int = 0, b: int = 2, s: int = 16) -> list[dict[str, np.ndarray]]:
    """Shifted batches with the first 4 targets of each row masked, as a prompt would be."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(0, vocab, (b, s + 1))
        labels = tokens[:, 1:].copy()
        labels[:, :4] = -100
        out.append({"input_ids": tokens[:, :-1], "labels": labels})
    return out


def run(backend, model, params, steps, **kwargs):
    results = list(train(model, backend, params, make_batches(model.vocab_size, steps), steps, LR, **kwargs))
    assert [r.step for r in results] == list(range(1, steps + 1))
    return (np.array([r.loss for r in results]), np.array([r.grad_norm for r in results]),
            to_host(backend, results[-1].trainable))


def test_adamw_matches_torch_optim(ms_cpu, torch_cpu):
    import torch

    rng = np.random.default_rng(0)
    w0, b0 = rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    grads = [(rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal(5).astype(np.float32))
             for _ in range(6)]
    tw, tb = torch.tensor(w0, requires_grad=True), torch.tensor(b0, requires_grad=True)
    # decay on matrices only, as accel.train groups parameters
    ref = torch.optim.AdamW([{"params": [tw], "weight_decay": 0.1}, {"params": [tb], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    for gw, gb in grads:
        tw.grad, tb.grad = torch.tensor(gw), torch.tensor(gb)
        ref.step()
    opt = AdamW(1e-2, (0.9, 0.99), 1e-8, weight_decay=0.1)
    for backend in (torch_cpu, ms_cpu):
        ops = backend.ops
        params = {"w": backend.asarray(w0), "b": backend.asarray(b0)}
        state = adamw_init(ops, params)
        for gw, gb in grads:
            params, state = adamw_update(ops, opt, params, {"w": backend.asarray(gw), "b": backend.asarray(gb)}, state)
        np.testing.assert_allclose(backend.to_numpy(params["w"]), tw.detach().numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(backend.to_numpy(params["b"]), tb.detach().numpy(), rtol=1e-6, atol=1e-7)
    assert np.abs(tw.detach().numpy() - w0).max() > 0.03  # six steps of lr 1e-2 moved the weights


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch_optim_over_100_steps_at_the_default_betas(ms_cpu, torch_cpu, weight_decay):
    """At betas (0.9, 0.999) the bias correction 1 - 0.999^t is where float32 hurts: 0.999 is not a float32,
    and 1 - b2^t computed from a float32 b2^t loses 1.3e-5 of it. torch.optim.AdamW computes it in
    Python floats; the updates must agree to float32 rounding."""
    import torch

    rng = np.random.default_rng(1)
    w0 = rng.uniform(0.05, 0.15, (6, 4)).astype(np.float32) * rng.choice([-1, 1], (6, 4)).astype(np.float32)
    grads = [rng.standard_normal((6, 4)).astype(np.float32) for _ in range(100)]
    tw = torch.tensor(w0, requires_grad=True)
    ref = torch.optim.AdamW([tw], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    for g in grads:
        tw.grad = torch.tensor(g)
        ref.step()
    want = tw.detach().numpy()
    opt = AdamW(1e-3, (0.9, 0.999), 1e-8, weight_decay=weight_decay)
    for backend in (torch_cpu, ms_cpu):
        params = {"w": backend.asarray(w0)}
        state = adamw_init(backend.ops, params)
        for g in grads:
            params, state = adamw_update(backend.ops, opt, params, {"w": backend.asarray(g)}, state)
        got = backend.to_numpy(params["w"])
        assert np.max(np.abs(got - want) / np.abs(want)) <= 1e-6, backend.target
    assert np.abs(want - w0).max() > 0.02  # 100 steps of lr 1e-3 moved the weights by a fifth of their size


def test_lm_loss_is_masked_next_token_cross_entropy(torch_cpu):
    model, params = from_preset("qwen2-tiny", seed=0)
    p = place(torch_cpu, params, "float32")
    batch = make_batches(model.vocab_size, 1, seed=5)[0]
    ids, labels = batch["input_ids"], batch["labels"]
    logits = torch_cpu.to_numpy(model.forward(torch_cpu.ops, p, torch_cpu.asarray(ids))).astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    keep = labels != -100
    expected = -np.mean(np.take_along_axis(logp, np.where(keep, labels, 0)[..., None], -1)[..., 0][keep])
    got = float(torch_cpu.to_numpy(lm_loss(model, torch_cpu.ops, p, torch_cpu.asarray(ids), torch_cpu.asarray(labels))))
    assert abs(got - expected) <= 1e-5 * expected
    every_label_ignored = np.full_like(labels, -100)
    assert float(torch_cpu.to_numpy(lm_loss(model, torch_cpu.ops, p, torch_cpu.asarray(ids),
                                            torch_cpu.asarray(every_label_ignored)))) == 0.0


@pytest.mark.parametrize("preset", TINY)
def test_full_training_matches_between_mindspore_and_torch(preset, ms_cpu, torch_cpu):
    """10 steps from the same weights and batches. Losses and gradient norms: within 1e-4 relative
    (measured: < 3e-6). Final weights: AdamW divides each gradient by its own running RMS, so an
    element whose true gradient is zero (a key bias, whose shift every softmax row absorbs; the radial
    part of Baichuan's normalised head) is moved by a step of up to lr driven by float32 rounding noise,
    which differs between the two backends' kernels. So: 99.9% of elements within 1e-5 (measured: < 2e-6),
    and every element within lr / 4 (measured: < 2e-4 = lr / 5.7)."""
    model, params = from_preset(preset, seed=0)
    loss_ms, norm_ms, w_ms = run(ms_cpu, model, params, 10, weight_decay=0.01)
    loss_t, norm_t, w_t = run(torch_cpu, model, params, 10, weight_decay=0.01)
    np.testing.assert_allclose(loss_ms, loss_t, rtol=1e-4)
    np.testing.assert_allclose(norm_ms, norm_t, rtol=1e-4)
    assert set(w_ms) == set(w_t) == {k for k, p in model.param_spec().items() if p.init != "buffer"}
    diff = np.concatenate([np.abs(w_ms[k] - w_t[k]).ravel() for k in w_t])
    assert np.quantile(diff, 0.999) <= 1e-5 and diff.max() <= LR / 4, (np.quantile(diff, 0.999), diff.max())
    moved = max(np.abs(w_t[k] - params[k]).max() for k in w_t)
    assert moved > 5 * LR  # ten steps of lr 1e-3 really trained
    assert len(set(np.round(loss_t, 6))) > 1


@pytest.mark.parametrize("preset", TINY)
def test_lora_trains_only_adapters_and_matches_between_backends(preset, ms_cpu, torch_cpu):
    model, params = from_preset(preset, seed=0)
    config = lora_mod.LoraConfig(rank=4, alpha=8.0)
    adapters = lora_mod.init_adapters(params, config, seed=1)
    targets = lora_mod.target_weights({k: v.shape for k, v in params.items()}, config)
    assert len(targets) == model.num_layers * (2 if preset.startswith("qwen2") else 1)
    assert set(adapters) == {n for t in targets for n in lora_mod.adapter_names(t)}
    loss_ms, _, a_ms = run(ms_cpu, model, params, 5, lora=config, adapters=adapters)
    loss_t, _, a_t = run(torch_cpu, model, params, 5, lora=config, adapters=adapters)
    assert set(a_ms) == set(a_t) == set(adapters)  # nothing but the adapters trains
    np.testing.assert_allclose(loss_ms, loss_t, rtol=1e-4)
    for k in a_t:
        np.testing.assert_allclose(a_ms[k], a_t[k], atol=1e-6, rtol=0)
    assert all(np.abs(a_t[k]).max() > 1e-4 for k in a_t if k.endswith("lora_B.weight"))  # B left zero
    # B starts at zero: the first loss is the base model's
    batch = make_batches(model.vocab_size, 1)[0]
    ops = torch_cpu.ops
    base = lm_loss(model, ops, place(torch_cpu, params, "float32"), ops.asarray(batch["input_ids"]),
                   ops.asarray(batch["labels"]))
    assert abs(loss_t[0] - float(torch_cpu.to_numpy(base))) <= 1e-6 * loss_t[0]
    # the trained adapters act as W + (alpha / r) B A, merged here in NumPy
    merged = dict(params)
    for t in targets:
        a_name, b_name = lora_mod.adapter_names(t)
        merged[t] = params[t] + config.scale * (a_t[b_name].astype(np.float64) @ a_t[a_name]).astype(np.float32)
    via_apply = lm_loss(model, ops, lora_mod.apply(ops, place(torch_cpu, params, "float32"),
                                                  place(torch_cpu, a_t, "float32"), config),
                        ops.asarray(batch["input_ids"]), ops.asarray(batch["labels"]))
    via_merge = lm_loss(model, ops, place(torch_cpu, merged, "float32"), ops.asarray(batch["input_ids"]),
                        ops.asarray(batch["labels"]))
    assert abs(float(torch_cpu.to_numpy(via_apply)) - float(torch_cpu.to_numpy(via_merge))) <= 1e-5
    assert abs(float(torch_cpu.to_numpy(via_merge)) - float(torch_cpu.to_numpy(base))) > 1e-5


def test_float16_training_keeps_float16_weights_and_matches_torch(ms_cpu, torch_cpu):
    """float16 weights train through float32 master copies: without them, g^2 underflows and eps rounds
    to 0 in float16, and the second step's update divides by zero (NaN on both backends)."""
    model, params = from_preset("qwen2-tiny", seed=0)
    results = {}
    for backend in (ms_cpu, torch_cpu):
        steps = list(train(model, backend, params, make_batches(model.vocab_size, 3), 3, LR, dtype="float16"))
        results[backend.name] = ([r.loss for r in steps], to_host(backend, steps[-1].trainable))
    (loss_ms, w_ms), (loss_t, w_t) = results["mindspore"], results["torch"]
    assert np.isfinite(loss_ms).all() and {v.dtype for v in w_ms.values()} == {np.dtype(np.float16)}
    np.testing.assert_allclose(loss_ms, loss_t, rtol=2e-3)  # float16 logits: ~1e-3 relative apart
    moved = [k for k in w_t if np.abs(w_ms[k].astype(np.float32) - params[k]).max() > 1e-3]
    assert len(moved) == len(w_t)


def test_lora_target_patterns():
    model, params = from_preset("qwen2-tiny", seed=0)
    shapes = {k: v.shape for k, v in params.items()}
    names = lora_mod.target_weights(shapes, lora_mod.LoraConfig(2, 4.0, ("q_proj",)))
    assert names == [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(model.num_layers)]
    layer1 = lora_mod.target_weights(shapes, lora_mod.LoraConfig(2, 4.0, ("*.layers.1.*",)))
    assert layer1 and all(".layers.1." in n and len(shapes[n]) == 2 for n in layer1) and len(layer1) == 7
    with pytest.raises(UsageError, match="match no 2-D weight"):
        lora_mod.target_weights(shapes, lora_mod.LoraConfig(2, 4.0, ("query",)))  # no partial-name match


# --- accel train ------------------------------------------------------------------------------------


def write_mindrecord(path, rows: int, vocab: int, width: int = 17, seed: int = 0) -> None:
    """Rows in the layout `accel mindrecord` writes, through MindSpore's FileWriter directly."""
    from mindspore.mindrecord import FileWriter

    rng = np.random.default_rng(seed)
    writer = FileWriter(str(path), shard_num=1)
    writer.add_schema({"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]},
                       "attention_mask": {"type": "int32", "shape": [-1]}, "index": {"type": "int64"}}, "t")
    data = []
    for i in range(rows):
        ids = rng.integers(0, vocab, width).astype(np.int32)
        labels = ids.copy()
        labels[:5] = -100
        data.append({"input_ids": ids, "labels": labels, "attention_mask": np.ones(width, np.int32), "index": i})
    writer.write_raw_data(data)
    writer.commit()


def cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, needle):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], (code, err)


def test_accel_train_full_saves_a_checkpoint_that_loads(qwen2_dir, tmp_path, capsys, torch_cpu):
    from accel.data.mindrecord import batches

    data = tmp_path / "train.mindrecord"
    write_mindrecord(data, rows=6, vocab=256)
    out = tmp_path / "tuned"
    code, stdout, err = cli(capsys, "train", "--model", str(qwen2_dir), "--data", str(data), "--target", "torch:cpu",
                            "--steps", "3", "--lr", "1e-3", "--batch-size", "2", "--save", str(out), "--json")
    assert code == 0, err
    records = [json.loads(line) for line in stdout.splitlines()]
    steps, summary = records[:-1], records[-1]
    assert [r["step"] for r in steps] == [1, 2, 3] and summary["saved"] == str(out)
    model, params = from_pretrained(qwen2_dir)
    api = list(train(model, torch_cpu, params, batches(data, 2), 3, 1e-3))
    np.testing.assert_allclose([r["loss"] for r in steps], [r.loss for r in api], rtol=1e-6)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    _, saved = from_pretrained(out)
    final = to_host(torch_cpu, api[-1].trainable)
    for k, v in final.items():
        np.testing.assert_allclose(saved[k], v, atol=1e-7, rtol=0)
    assert max(np.abs(saved[k] - params[k]).max() for k in saved) > 1e-3


def test_accel_train_lora_on_mindspore_saves_adapters_only(tmp_path, capsys):
    from accel.checkpoint.safetensors import SafetensorsFile

    data = tmp_path / "train.mindrecord"
    write_mindrecord(data, rows=4, vocab=256)
    out = tmp_path / "adapters"
    code, stdout, err = cli(capsys, "train", "--model", "qwen2-tiny", "--data", str(data), "--target", "mindspore:cpu",
                            "--steps", "2", "--lr", "1e-2", "--batch-size", "2", "--lora-rank", "2",
                            "--lora-targets", "q_proj,o_proj", "--save", str(out))
    assert code == 0, err
    lines = stdout.splitlines()
    assert "LoRA rank 2 alpha 4 on 4 weights" in lines[0] and err == ""
    assert lines[1].startswith("step 1/2  [##########..........]  loss ") and lines[2].startswith("step 2/2  [####")
    assert "saved to" in lines[-1]
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = SafetensorsFile(out / "adapter_model.safetensors").keys()
    assert sorted(keys) == sorted(f"base_model.model.model.layers.{i}.self_attn.{m}_proj.lora_{ab}.weight"
                                  for i in range(2) for m in "qo" for ab in "AB")
    adapters, config = lora_mod.load_adapters(out)
    assert config.rank == 2 and config.alpha == 4.0 and len(adapters) == 8
    assert all(np.abs(v).max() > 0 for k, v in adapters.items() if "lora_B" in k)


def test_accel_train_bad_input_is_a_one_line_error(tmp_path, capsys):
    data = tmp_path / "train.mindrecord"
    write_mindrecord(data, rows=2, vocab=256)
    base = ["train", "--model", "qwen2-tiny", "--data", str(data), "--target", "torch:cpu", "--steps", "1"]
    one_line_error(*cli(capsys, *base, "--save", str(tmp_path / "x"))[::2], "is a preset")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    one_line_error(*cli(capsys, *base, "--lora-rank", "2", "--save", str(occupied))[::2], "not an empty directory")
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    one_line_error(*cli(capsys, *base, "--lora-rank", "2", "--lora-targets", "nothing_here")[::2], "match no 2-D")
    one_line_error(*cli(capsys, *base[:4], "data.jsonl", *base[5:])[::2], "accel mindrecord")
    one_line_error(*cli(capsys, *base[:4], str(tmp_path / "missing.mindrecord"), *base[5:])[::2], "does not exist")
    one_line_error(*cli(capsys, *base, "--batch-size", "3")[::2], "fewer than one batch")
    write_mindrecord(data.with_name("big.mindrecord"), rows=2, vocab=10_000)
    one_line_error(*cli(capsys, *base[:4], str(data.with_name("big.mindrecord")), *base[5:])[::2],
                   "outside the vocabulary")
