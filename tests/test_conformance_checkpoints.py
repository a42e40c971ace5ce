"""Conformance of a team's own checkpoint directory: `accel conformance --models DIR` on each family, golden
records written from a directory and refused for other weights, and the weights' identity."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tests import hf_fixtures as hf
from tests.conftest import run_cli, save_hf_qwen2


def _family_dir(root: Path, family: str) -> Path:
    if family == "qwen2":
        return save_hf_qwen2(root / "team-qwen2")
    config, tensors = {
        "chatglm": lambda: (c := hf.chatglm_config(), hf.chatglm_tensors(c)),
        "qwen": lambda: (c := hf.qwen_config(), hf.qwen_tensors(c)),
        "baichuan": lambda: (c := hf.baichuan_config("13b"), hf.baichuan_tensors(c)),
    }[family]()
    return hf.write_checkpoint(root / f"team-{family}", config, tensors)


def _rows(report_dir: Path) -> list[dict]:
    return json.loads((report_dir / "latest" / "report.json").read_text())["rows"]


def test_golden_record_from_a_directory_compares_elsewhere_and_refuses_other_weights(tmp_path):
    """The record keeps the built-in prompts as transformers' AutoTokenizer encodes them, replays them on
    another target, and refuses the same directory with one tensor changed."""
    from safetensors.numpy import load_file, save_file
    from transformers import AutoTokenizer

    from accel.data.prompts import BUILTIN_PROMPTS
    from tests.tokenizer_fixtures import checkpoint

    directory = checkpoint(tmp_path / "team-qwen2", "qwen2")  # context: max_position_embeddings 128
    record = tmp_path / "golden"
    r = run_cli("conformance", "--models", str(directory), "--cases", "inference,generation", "--dtypes", "float32",
                "--targets", "torch:cpu", "--write-golden", str(record), "--report-dir", str(tmp_path / "r"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    manifest = json.loads((record / "manifest.json").read_text())
    weights = load_file(str(directory / "model.safetensors"))
    # the record keeps the weights' digests (those of the bytes as stored), never the weights themselves
    assert manifest["checkpoints"]["team-qwen2"] == {
        n: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for n, a in weights.items()}
    stored = load_file(str(record / "arrays.safetensors"))
    assert not any("|input|param." in k for k in stored)
    ref = AutoTokenizer.from_pretrained(directory)
    want = [ref.encode(p.text, add_special_tokens=False) if p.text else
            list(ref.apply_chat_template(list(p.messages), add_generation_prompt=True, tokenize=True,
                                         return_dict=False)) for p in BUILTIN_PROMPTS]
    want = [ids[:128 - 8] for ids in want]  # the long probe is cut to the context, less the generated tokens
    assert any(len(ids) == 120 for ids in want)
    assert [stored[f"models/team-qwen2|input|input_ids.{i}"].ravel().tolist() for i in range(len(want))] == want

    r = run_cli("conformance", "--models", str(directory), "--targets", "mindspore:cpu", "--golden", str(record),
                "--report-dir", str(tmp_path / "r"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = _rows(tmp_path / "r")
    assert {(row["case"], row["status"], row["metrics"]["prompts"]) for row in rows} == {
        ("inference", "pass", 6.0), ("generation", "pass", 6.0)}

    changed = tmp_path / "elsewhere" / "team-qwen2"  # same name, one tensor changed in its last bit
    changed.mkdir(parents=True)
    for f in directory.iterdir():
        (changed / f.name).write_bytes(f.read_bytes())
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name].view(np.uint32)[0, 0] ^= 1
    save_file(weights, str(changed / "model.safetensors"), metadata={"format": "pt"})
    r = run_cli("conformance", "--models", str(changed), "--targets", "mindspore:cpu", "--golden", str(record),
                "--report-dir", str(tmp_path / "r2"))
    assert r.returncode == 2 and not r.stdout.count("\n") > 1
    assert len(r.stderr.strip().splitlines()) == 1 and name in r.stderr and "differs" in r.stderr
    assert not (tmp_path / "r2").exists()  # refused before any case ran

    r = run_cli("conformance", "--targets", "mindspore:cpu", "--golden", str(record),
                "--report-dir", str(tmp_path / "r"))
    assert r.returncode == 2 and "give that directory with --models" in r.stderr


def test_full_training_of_a_directory_only_when_asked(tmp_path):
    from accel.conformance.runner import plan_jobs, resolve_models

    directory = save_hf_qwen2(tmp_path / "team-qwen2", torch_dtype="bfloat16")
    names, dirs = resolve_models([str(directory), "qwen2-tiny"])
    assert names == ["team-qwen2", "qwen2-tiny"] and dirs == {"team-qwen2": str(directory.resolve())}
    jobs = plan_jobs(["training"], names, ["float32", "bfloat16"], dirs)
    assert sorted(jobs) == [("training", "qwen2-tiny", "float32"), ("training", "qwen2-tiny+lora", "bfloat16"),
                            ("training", "team-qwen2+lora", "float32")]  # stored as float32 by save_pretrained
    full = plan_jobs(["training"], names, ["float32", "bfloat16"], dirs, full_training=True)
    assert ("training", "team-qwen2", "float32") in full
    assert plan_jobs(["checkpoints"], ["team-qwen2"], ["float32"], dirs) == []


def test_stored_bfloat16_directory_trains_lora_at_bfloat16(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from accel.conformance.runner import plan_jobs, resolve_models

    directory = save_hf_qwen2(tmp_path / "bf16-qwen2")
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(directory / "model.safetensors").items()}
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    names, dirs = resolve_models([str(directory)])
    assert plan_jobs(["training"], names, ["float32", "float16", "bfloat16"], dirs) == [
        ("training", "bf16-qwen2+lora", "bfloat16")]
    # by default a directory runs at the dtype it is stored in (another would copy the weights), its
    # generation too; a preset's inference at every dtype, its generation at float32
    jobs = plan_jobs(["inference", "generation", "training"], [*names, "qwen2-tiny"], None, dirs)
    assert sorted(j for j in jobs if j[1].startswith("bf16-qwen2")) == [
        ("generation", "bf16-qwen2", "bfloat16"), ("inference", "bf16-qwen2", "bfloat16"),
        ("training", "bf16-qwen2+lora", "bfloat16")]
    assert sorted(j for j in jobs if not j[1].startswith("bf16-qwen2")) == [
        ("generation", "qwen2-tiny", "float32"), *(("inference", "qwen2-tiny", d) for d in
                                                   ("bfloat16", "float16", "float32")),
        ("training", "qwen2-tiny", "float32"), ("training", "qwen2-tiny+lora", "bfloat16")]


def test_bad_model_directories_are_one_line_errors(tmp_path):
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    empty = tmp_path / "nothing"
    empty.mkdir()
    for spec, words in [(str(other), "unknown model_type 'llama'"), (str(empty), "no config.json"),
                        ("no-such-preset", "neither a model preset nor a checkpoint directory")]:
        r = run_cli("conformance", "--models", spec, "--targets", "torch:cpu", "--report-dir", str(tmp_path / "r"))
        assert r.returncode == 2 and words in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_identity_comes_from_a_convert_manifest_or_is_computed_and_cached(tmp_path, monkeypatch):
    from accel.checkpoint import identity

    monkeypatch.setenv("ACCEL_CACHE_DIR", str(tmp_path / "cache"))
    directory = save_hf_qwen2(tmp_path / "team-qwen2")
    computed = identity.tensor_digests(directory)
    assert len(list((tmp_path / "cache" / "identity").iterdir())) == 1
    out = tmp_path / "converted"
    r = run_cli("convert", "--from", f"safetensors:{directory}", "--to", f"safetensors:{out}")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "converted.manifest.json").read_text())["tensors"]
    assert {n: t["sha256"] for n, t in manifest.items()} == computed  # the same definition as convert's
    seen = []
    digest = identity._digest
    monkeypatch.setattr(identity, "_digest", lambda *a: seen.append(1) or digest(*a))
    assert identity.tensor_digests(out) == computed and not seen  # taken from the manifest
    assert identity.tensor_digests(directory) == computed and not seen  # taken from the cache
    (directory / "model.safetensors").touch()  # a weight file newer than the cache entry's stamp
    identity.tensor_digests(directory)
    assert seen


def _lm_head_fault(vocab: int, token: int, delta: float):
    """torch:cpu with a planted fault: `delta` added to one token's logit wherever the lm_head computes."""
    import torch

    from accel.backends import torch_eager as te
    from accel.targets import open_target

    backend = open_target("torch:cpu", policy={})

    def linear(x, weight, bias=None):
        out = te.linear(x, weight, bias)
        if out.shape[-1] == vocab:
            out = out + delta * torch.nn.functional.one_hot(torch.tensor(token), vocab).to(out.dtype)
        return out

    backend.ops.__dict__["linear"] = linear
    backend.name = "faulty"  # not torch:cpu, the reference device, any more
    return backend


@pytest.fixture
def tied_checkpoint(tmp_path, monkeypatch):
    """qwen2-tiny weights with the lm_head rows of the first greedy token and its neighbour made equal:
    an exact tie of the reference's top-1 and top-2 at the first generated position."""
    from accel.checkpoint import hf as hf_ckpt
    from accel.checkpoint.base import entries_of
    from accel.conformance import cases
    from accel.models import from_preset
    from accel.runtime import generate, place
    from accel.targets import open_target

    model, params = from_preset("qwen2-tiny")
    directory = tmp_path / "tied-qwen2"
    directory.mkdir()
    save_hf_qwen2(tmp_path / "cfg")
    (directory / "config.json").write_text((tmp_path / "cfg" / "config.json").read_text())
    hf_ckpt.write_directory(directory, "safetensors", entries_of(params), 1 << 30)
    monkeypatch.setitem(cases.CHECKPOINTS, "tied-qwen2", str(directory))
    cases.model_inputs.cache_clear()
    ids = cases.model_inputs("tied-qwen2")[2]  # the prompt the case will use
    ref = open_target("numpy:cpu", policy={})
    first = int(generate(model, ref, place(ref, params, "float64"), ids[:1], 1, use_cache=False)[0, 0])
    lo, hi = (first, first + 1) if first + 1 < model.vocab_size else (first - 1, first)
    head = params["lm_head.weight"].copy()
    head[hi] = head[lo]  # the reference (np.argmax: the first of equal logits) keeps choosing `lo`
    (directory / "model.safetensors").unlink()
    hf_ckpt.write_directory(directory, "safetensors", entries_of(params | {"lm_head.weight": head}), 1 << 30)
    cases.model_inputs.cache_clear()
    yield model.vocab_size, lo, hi
    cases.model_inputs.cache_clear()


def test_a_flip_at_a_near_tie_is_reported_and_passes(tied_checkpoint):
    from accel.conformance.cases import run_generation_case

    vocab, lo, hi = tied_checkpoint
    row = run_generation_case(_lm_head_fault(vocab, hi, 1e-7), "tied-qwen2", "float32")
    assert row.status == "pass", row.detail
    assert row.metrics["near_ties"] >= 1 and row.metrics["token_agreement"] < 1
    assert f"near-tie at position 0: token {hi} for token {lo}" in row.detail
    assert row.series["top1_agrees"][0] == 0 and all(row.series["top1_agrees"][1:])  # teacher forced: no cascade


def test_a_flip_with_a_wide_margin_fails_naming_position_tokens_and_margin(tied_checkpoint):
    from accel.conformance.cases import run_generation_case

    vocab, lo, hi = tied_checkpoint
    other = (hi + 7) % vocab
    row = run_generation_case(_lm_head_fault(vocab, other, 50.0), "tied-qwen2", "float32")
    assert row.status == "fail"
    # position 0 is the planted tie, so the flip there is still a near-tie; position 1 is a real divergence
    assert row.detail.startswith(f"position 1: token {other} instead of token "), row.detail
    assert f"near-tie at position 0: token {other} for token {lo}" in row.detail
    assert row.metrics["kl_max"] > 1.0


def test_layer_isolation_names_the_layer_that_makes_the_error(tmp_path, monkeypatch):
    """A wrong RMSNorm eps in layer 2 of 4: every later layer's propagated error is out of tolerance,
    but on the reference's own input only layer 2 is, and the report says so."""
    from safetensors.torch import load_file, save_file

    from accel.backends import torch_eager as te
    from accel.conformance import cases
    from accel.targets import open_target

    directory = save_hf_qwen2(tmp_path / "deep-qwen2", num_hidden_layers=4)
    weights = load_file(directory / "model.safetensors")
    marked = "model.layers.2.input_layernorm.weight"
    weights[marked][0] = 1.2345  # marks the one norm the planted fault acts on
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setitem(cases.CHECKPOINTS, "deep-qwen2", str(directory))
    cases.model_inputs.cache_clear()

    backend = open_target("torch:cpu", policy={})

    def rms_norm(x, w, eps):
        wrong = abs(float(w.reshape(-1)[0]) - 1.2345) < 1e-6
        return te.rms_norm(x, w, eps * 1e4 if wrong else eps)

    backend.ops.__dict__["rms_norm"] = rms_norm
    backend.name = "faulty"
    try:
        assert cases.run_inference_case(open_target("torch:cpu", policy={}), "deep-qwen2", "float32").status == "pass"
        row = cases.run_inference_case(backend, "deep-qwen2", "float32")
    finally:
        cases.model_inputs.cache_clear()
    assert row.status == "fail"
    assert row.first_divergence["first_local_layer"] == 2, row.first_divergence
    assert "layer 2 is the first out of tolerance on its own input" in row.detail
    local, propagated = row.series["layer_local_max_abs"], row.series["layer_max_abs"]
    assert local[3] < propagated[3] / 100  # layer 3 is right: its error flows in from layer 2
    assert max(local[:2]) < local[2] / 100



def test_layer_isolation_finds_an_error_that_massive_activations_hide_until_the_logits(tmp_path, monkeypatch):
    """Channel 0 of the residual stream carries 1000 (the embedding's column 0; the lm_head ignores it),
    as real checkpoints carry massive activations. A fault in layer 2's residual add of its MLP output
    (10% too much of it) stays within tolerance at every tap, measured against outputs of magnitude
    1000, until the logits: the propagated errors name the logits. On the reference's own input, what
    layer 2 adds is 10% off, and isolation names layer 2."""
    from safetensors.torch import load_file, save_file

    from accel.backends import torch_eager as te
    from accel.conformance import cases
    from accel.targets import open_target

    directory = save_hf_qwen2(tmp_path / "massive-qwen2", num_hidden_layers=4)
    weights = load_file(directory / "model.safetensors")
    weights["model.embed_tokens.weight"][:, 0] = 1000.0
    weights["lm_head.weight"] *= 1000.0  # logits of order 0.3, so that the tolerance is not all atol
    weights["lm_head.weight"][:, 0] = 0.0
    weights["model.layers.2.mlp.down_proj.weight"][0, 0] = 1.2345  # marks the MLP output the fault acts on
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setitem(cases.CHECKPOINTS, "massive-qwen2", str(directory))
    cases.model_inputs.cache_clear()

    backend = open_target("torch:cpu", policy={})
    marked: dict[int, object] = {}

    def linear(x, weight, bias=None):
        out = te.linear(x, weight, bias)
        if abs(float(weight.reshape(-1)[0]) - 1.2345) < 1e-6:
            marked[id(out)] = out  # held, so that the id stays its own
        return out

    def add(a, b):
        return te.add(a, b) + 0.1 * b if id(b) in marked else te.add(a, b)

    backend.ops.__dict__["linear"] = linear
    backend.ops.__dict__["add"] = add
    backend.name = "faulty"
    try:
        healthy = cases.run_inference_case(open_target("torch:cpu", policy={}), "massive-qwen2", "float32")
        row = cases.run_inference_case(backend, "massive-qwen2", "float32")
    finally:
        cases.model_inputs.cache_clear()
    assert healthy.status == "pass" and row.status == "fail"
    assert row.first_divergence["tap"] == "logits", row.first_divergence  # propagated: a later place
    assert row.first_divergence["first_local_layer"] == 2, row.first_divergence
    assert "layer 2 is the first out of tolerance on its own input" in row.detail
    local = row.series["layer_local_max_abs"]
    assert max(local[:2] + local[3:]) < local[2] / 10

# --- text prompts through the checkpoint's own tokenizer ---------------------------------------------


def test_directories_of_each_family_run_on_the_builtin_prompts_through_their_own_tokenizers(tmp_path):
    """`accel conformance --models DIR,...` on torch:cpu and mindspore:cpu: inference and generation over the
    built-in prompts, and training with LoRA only (full fine-tuning of a directory is asked for)."""
    from tests.tokenizer_fixtures import checkpoint

    dirs = [checkpoint(tmp_path / f"team-{f}", f) for f in ("qwen2", "qwen", "chatglm", "baichuan")]
    r = run_cli("conformance", "--models", ",".join(map(str, dirs)), "--cases", "inference,generation,training",
                "--dtypes", "float32", "--targets", "torch:cpu,mindspore:cpu", "--report-dir", str(tmp_path / "r"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = _rows(tmp_path / "r")
    assert {(row["target"], row["case"], row["model"]) for row in rows} == {
        (t, c, f"team-{f}{'+lora' if c == 'training' else ''}") for t in ("torch:cpu", "mindspore:cpu")
        for c in ("inference", "generation", "training") for f in ("qwen2", "qwen", "chatglm", "baichuan")}
    assert all(row["status"] == "pass" for row in rows), [(r["case"], r["model"], r["detail"]) for r in rows]
    assert {row["metrics"]["prompts"] for row in rows if row["case"] != "training"} == {6.0}
    # Qwen v1's generation stays within seq_length 16 (dynamic NTK): the built-in prompts are cut to 8 tokens
    assert "team-qwen: 6 of the 6 built-in prompts are cut to 8 tokens, its context of 16 less 8 generated" in r.stdout


def test_a_prompts_file_in_conformance_and_bad_prompt_input_are_one_line_errors(tmp_path, capsys):
    from accel.cli import main
    from tests.tokenizer_fixtures import checkpoint

    def cli(*args):
        code = main(["conformance", *args, "--report-dir", str(tmp_path / "r"), "--targets", "torch:cpu"])
        out, err = capsys.readouterr()
        return code, out, err

    def one_line_error(result, needle):
        code, _, err = result
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0], (code, err)

    directory = checkpoint(tmp_path / "team-chatglm", "chatglm", seq_length=32)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "你好"}\n{"messages": [{"role": "user", "content": "Hello"}]}\n')
    code, out, err = cli("--models", str(directory), "--prompts", str(prompts), "--cases", "inference,generation",
                         "--dtypes", "float32")
    assert code == 0, out + err
    assert {(row["status"], row["metrics"]["prompts"]) for row in _rows(tmp_path / "r")} == {("pass", 2.0)}

    one_line_error(cli("--models", "qwen2-tiny", "--prompt", "hi"), "need a checkpoint directory in --models")
    one_line_error(cli("--models", str(directory), "--prompt", "The quick brown fox jumps. " * 3),
                   "and the 8 tokens generated after it pass the model's context is 32")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    one_line_error(cli("--models", str(directory), "--prompts", str(empty)), "holds no prompts")
    one_line_error(cli("--models", str(directory), "--golden", str(tmp_path), "--prompt", "hi"),
                   "a golden record replays its own prompts")
    (directory / "tokenizer.model").write_bytes(b"\x00 not a model")
    one_line_error(cli("--models", str(directory), "--cases", "inference"), "not a valid SentencePiece model")
    (directory / "tokenizer.model").unlink()
    one_line_error(cli("--models", str(directory), "--prompt", "hi"), "holds no tokenizer")
    code, out, _ = cli("--models", str(directory), "--cases", "inference", "--dtypes", "float32")
    assert code == 0 and "team-chatglm has no tokenizer files: its cases run on seeded random token ids" in out
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    code, _, err = cli("--models", str(directory))
    assert code == 2 and "llama" in err and len(err.strip().splitlines()) == 1, err


def test_a_wide_flip_names_both_tokens_as_the_tokenizer_decodes_them(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from accel.conformance import cases
    from accel.data import prompts as P
    from accel.data.tokenizer import load_tokenizer
    from tests.tokenizer_fixtures import MODEL_VOCAB, checkpoint

    directory = checkpoint(tmp_path / "team-qwen2", "qwen2")
    tok = load_tokenizer(directory)
    ids = P.encode_prompts(directory, tok, [P.Prompt(text="The capital of France is"),
                                            P.Prompt(messages=({"role": "user", "content": "你好"},))])
    monkeypatch.setitem(cases.CHECKPOINTS, "team-qwen2", str(directory))
    monkeypatch.setitem(cases.PROMPTS, "team-qwen2", ids)
    cases.model_inputs.cache_clear()
    ref = AutoTokenizer.from_pretrained(directory)
    boosted = ref.convert_tokens_to_ids(ref.tokenize(" Paris"))[0]
    try:
        row = cases.run_generation_case(_lm_head_fault(MODEL_VOCAB, boosted, 50.0), "team-qwen2", "float32")
    finally:
        cases.model_inputs.cache_clear()
    assert row.status == "fail" and row.metrics["prompts"] == 2 and row.metrics["token_agreement"] < 0.5
    reference = int(row.detail.split(" instead of token ")[1].split()[0])
    assert reference != boosted
    assert row.detail.startswith(f"prompt 1 position 0: token {boosted} {ref.decode([boosted])!r} instead of "
                                 f"token {reference} {ref.decode([reference])!r}, reference margin "), row.detail
    assert row.first_divergence is not None and row.first_divergence["prompt"] == 1


def test_a_damaged_golden_manifest_is_a_one_line_error(tmp_path):
    from accel.conformance.golden import FORMAT, GoldenRecord
    from accel.errors import ConformanceError

    record = tmp_path / "golden"
    record.mkdir()
    for manifest, words in [([1, 2], "does not hold a JSON object"),
                            ({"format": FORMAT, "target": "torch:cpu"}, "'cases' must be an object"),
                            ({"format": FORMAT, "target": "torch:cpu", "cases": []}, "'cases' must be an object"),
                            ({"format": FORMAT, "target": 3, "cases": {}}, "'target' must be a string"),
                            ({"format": FORMAT, "target": "t", "cases": {}, "checkpoints": ["x"]}, "'checkpoints'"),
                            ({"format": "other"}, "expected")]:
        (record / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ConformanceError, match=words):
            GoldenRecord(record)
