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


@pytest.mark.parametrize("family", ["qwen2", "chatglm", "qwen", "baichuan"])
def test_conformance_runs_a_checkpoint_directory_on_torch_and_mindspore(tmp_path, family):
    directory = _family_dir(tmp_path, family)
    r = run_cli("conformance", "--models", str(directory), "--cases", "inference,generation,training",
                "--dtypes", "float32", "--targets", "torch:cpu,mindspore:cpu", "--report-dir", str(tmp_path / "r"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = _rows(tmp_path / "r")
    assert {row["model"] for row in rows} == {directory.name, f"{directory.name}+lora"}
    # a directory trains with LoRA only unless full fine-tuning is asked for
    assert {(row["target"], row["case"]) for row in rows if row["status"] == "pass"} == {
        (t, c) for t in ("torch:cpu", "mindspore:cpu") for c in ("inference", "generation", "training")}
    assert not any(row["case"] == "training" and row["model"] == directory.name for row in rows)


def test_golden_record_from_a_directory_compares_elsewhere_and_refuses_other_weights(tmp_path):
    from safetensors.numpy import load_file, save_file

    directory = save_hf_qwen2(tmp_path / "team-qwen2")
    record = tmp_path / "golden"
    r = run_cli("conformance", "--models", str(directory), "--cases", "inference,generation", "--dtypes", "float32",
                "--targets", "torch:cpu", "--write-golden", str(record), "--report-dir", str(tmp_path / "r"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    manifest = json.loads((record / "manifest.json").read_text())
    weights = load_file(str(directory / "model.safetensors"))
    # the record keeps the weights' digests (those of the bytes as stored), never the weights themselves
    assert manifest["checkpoints"]["team-qwen2"] == {
        n: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for n, a in weights.items()}
    assert (record / "arrays.safetensors").stat().st_size < (directory / "model.safetensors").stat().st_size / 4

    r = run_cli("conformance", "--models", str(directory), "--targets", "mindspore:cpu", "--golden", str(record),
                "--report-dir", str(tmp_path / "r"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = _rows(tmp_path / "r")
    assert {(row["case"], row["status"]) for row in rows} == {("inference", "pass"), ("generation", "pass")}

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
    assert jobs == [("training", "qwen2-tiny", "float32"), ("training", "team-qwen2+lora", "float32"),
                    ("training", "qwen2-tiny+lora", "bfloat16")]  # stored as float32 by save_pretrained
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
