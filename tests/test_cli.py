"""The CLI: the listing commands, and bad input as one-line errors with exit code 2 and no traceback."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from accel.checkpoint import safetensors
from tests.conftest import run_cli


def assert_one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_targets_lists_availability_and_reasons():
    r = run_cli("targets", "--json")
    assert r.returncode == 0, r.stderr
    by_name = {t["target"]: t for t in json.loads(r.stdout)["targets"]}
    assert by_name["torch:cpu"]["available"] and "float32" in by_name["torch:cpu"]["dtypes"]
    assert not by_name["torch:cuda"]["available"] and by_name["torch:cuda"]["reason"]
    table = run_cli("targets").stdout
    assert "torch:npu" in table and "torch_npu is not installed" in table


def test_models_lists_presets_with_counts():
    r = run_cli("models", "--json")
    rows = {m["preset"]: m for m in json.loads(r.stdout)["models"]}
    assert rows["qwen2-7b"]["parameters"] > 7e9 and "qwen2-tiny" in rows


def test_preset_model_runs(tmp_path):
    r = run_cli("generate", "--model", "qwen2-tiny", "--input-ids", "1,2,3", "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["new_tokens"]) == 4


@pytest.fixture
def broken(qwen2_dir, tmp_path):
    """A copy of the tiny checkpoint to damage."""
    d = tmp_path / "ckpt"
    shutil.copytree(qwen2_dir, d)
    return d


def _rewrite(directory, edit):
    f = safetensors.SafetensorsFile(directory / "model.safetensors")
    tensors = {k: np.array(v) for k, v in f.items()}
    edit(tensors)
    safetensors.write(directory / "model.safetensors", tensors)


def test_missing_model_dir(tmp_path):
    r = run_cli("infer", "--model", str(tmp_path / "nope"), "--input-ids", "1,2", "--out", str(tmp_path / "o.npy"))
    assert_one_line_error(r, "does not exist")
    assert not (tmp_path / "o.npy").exists()


def test_unknown_model_type(broken, tmp_path):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (broken / "config.json").write_text(json.dumps(cfg))
    r = run_cli("infer", "--model", str(broken), "--input-ids", "1", "--out", str(tmp_path / "o.npy"))
    assert_one_line_error(r, "gpt_neox", "supported")


def test_missing_tensor(broken, tmp_path):
    _rewrite(broken, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    r = run_cli("infer", "--model", str(broken), "--input-ids", "1", "--out", str(tmp_path / "o.npy"))
    assert_one_line_error(r, "model.layers.1.mlp.up_proj.weight", "missing")


def test_wrong_shape(broken, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:16]
    _rewrite(broken, edit)
    r = run_cli("infer", "--model", str(broken), "--input-ids", "1", "--out", str(tmp_path / "o.npy"))
    assert_one_line_error(r, "model.layers.0.self_attn.k_proj.weight", "[16, 64]", "[32, 64]")


def test_truncated_safetensors(broken, tmp_path):
    f = broken / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    r = run_cli("infer", "--model", str(broken), "--input-ids", "1", "--out", str(tmp_path / "o.npy"))
    assert_one_line_error(r, "model.safetensors")


@pytest.mark.parametrize("ids", ["5,x,7", "", "1;2", "3,,4"])
def test_malformed_input_ids(ids, tmp_path):
    r = run_cli("infer", "--model", "qwen2-tiny", "--input-ids", ids, "--out", str(tmp_path / "o.npy"))
    assert_one_line_error(r, "--input-ids")


def test_input_ids_parse_strictly():
    from accel.commands._common import parse_ids
    from accel.errors import UsageError

    assert parse_ids(" 5, 17,33 ").tolist() == [[5, 17, 33]]
    for bad in ["1 2", "99999999999999999999", "-3", "5,x,7", "", "1;2", "3,,4", "١٢"]:
        with pytest.raises(UsageError, match="--input-ids"):
            parse_ids(bad)


def test_out_of_vocabulary_id(tmp_path):
    r = run_cli("generate", "--model", "qwen2-tiny", "--input-ids", "1,999")
    assert_one_line_error(r, "999", "vocabulary")


@pytest.mark.parametrize("target, why", [("torch:cuda", "CUDA"), ("torch:npu", "torch_npu"), ("tpu:0", "backend")])
def test_unavailable_or_unknown_target(target, why):
    r = run_cli("generate", "--model", "qwen2-tiny", "--input-ids", "1,2", "--target", target)
    assert_one_line_error(r, why)


def test_unsupported_dtype():
    r = run_cli("generate", "--model", "qwen2-tiny", "--input-ids", "1,2", "--target", "numpy:cpu",
                "--dtype", "float16")
    assert_one_line_error(r, "numpy:cpu", "float16")


def test_pickle_that_would_execute_code_is_refused(tmp_path):
    import pickle

    d = tmp_path / "evil"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 8, "hidden_size": 8,
                                               "intermediate_size": 8, "num_hidden_layers": 1,
                                               "num_attention_heads": 2}))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import torch

    torch.save({"x": Evil()}, d / "pytorch_model.bin", _use_new_zipfile_serialization=True, pickle_module=pickle)
    r = run_cli("infer", "--model", str(d), "--input-ids", "1", "--out", str(tmp_path / "o.npy"))
    assert_one_line_error(r, "pytorch_model.bin", "safe")
    assert not marker.exists()


def test_numbers_from_outside_are_bounded(monkeypatch):
    """Environment and CLI numbers past what the code can hold are one-line errors, not OverflowError or
    MemoryError from deep inside."""
    from accel.checkpoint.convert import parse_size
    from accel.data.mindrecord import convert
    from accel.dist import CollectiveError, default_timeout
    from accel.errors import AccelError, UsageError

    for text in ["inf", "nan", "1e400", "-1", "0", "x", "1e9"]:
        monkeypatch.setenv("ACCEL_DIST_TIMEOUT", text)
        with pytest.raises(CollectiveError, match="ACCEL_DIST_TIMEOUT"):
            default_timeout()
    monkeypatch.setenv("ACCEL_DIST_TIMEOUT", "2.5")
    assert default_timeout() == 2.5
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1.5 KiB") == 1536
    for text in ["1" + "0" * 400 + "GB", "0", "0.1", "2PB", "", "1e3"]:
        with pytest.raises(UsageError, match="--max-shard-size"):
            parse_size(text)
    with pytest.raises(AccelError, match="seq_length must be from 1 to"):
        convert("unused.jsonl", "unused.mindrecord", None, 100_000_000_000)


@pytest.mark.parametrize("option, value, words", [("--max-new-tokens", "0", "--max-new-tokens must be 1 or more"),
                                                  ("--input-ids", "1 2", "is not a comma-separated list")])
def test_generate_refuses_nothing_to_generate_and_ids_that_are_not_a_list(option, value, words, capsys):
    from accel.cli import main

    args = {"--max-new-tokens": "4", "--input-ids": "1,2"} | {option: value}
    code = main(["generate", "--model", "qwen2-tiny", *[x for kv in args.items() for x in kv]])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and words in err, err
