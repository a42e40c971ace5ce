"""`accel verify --logits`: a conversion proven by the model's output. Each family's checkpoint, converted
to MindFormers' names in a MindSpore .ckpt and read back through the key map, gives the same logits as its
source; q and k rows permuted within each head (MindFormers' rearranged rope, read back without it) give
different logits although every tensor keeps its name and shape."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from accel.checkpoint import mindspore_ckpt
from accel.checkpoint.convert import convert
from accel.checkpoint.mindspore_ckpt import MindSporeCkptFile
from accel.checkpoint.safetensors import SafetensorsFile
from accel.cli import main
from tests.conftest import save_hf_qwen2
from tests.hf_fixtures import (
    baichuan_config,
    baichuan_tensors,
    chatglm_config,
    chatglm_tensors,
    qwen_config,
    qwen_tensors,
    write_checkpoint,
)


def _source(family: str, directory: Path) -> Path:
    if family == "qwen2":
        return save_hf_qwen2(directory)
    cfg = {"chatglm": chatglm_config, "qwen": qwen_config,
           "baichuan": lambda: baichuan_config("7b")}[family]()
    tensors = {"chatglm": chatglm_tensors, "qwen": qwen_tensors, "baichuan": baichuan_tensors}[family](cfg)
    return write_checkpoint(directory, cfg, tensors)


def _halves_to_pairs(rows: int, head_dim: int) -> np.ndarray:
    """Row order of each head's rotary dims rearranged (even dims first, then odd)."""
    one = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    return np.concatenate([h * head_dim + one for h in range(rows // head_dim)])


@pytest.mark.parametrize("family", ["qwen2", "chatglm", "qwen", "baichuan"])
def test_a_mindformers_conversion_gives_the_same_logits(family, tmp_path, capsys):
    src = _source(family, tmp_path / "hf")
    ckpt = tmp_path / "model.ckpt"
    convert(f"safetensors:{src / 'model.safetensors'}", f"mindspore-ckpt:{ckpt}")
    assert set(MindSporeCkptFile(ckpt).keys()) != set(SafetensorsFile(src / "model.safetensors").keys())  # renamed
    code = main(["verify", f"safetensors:{src / 'model.safetensors'}", f"mindspore-ckpt:{ckpt}", "--logits",
                 "--config", str(src / "config.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "logits on 16 tokens (torch:cpu, float32): max abs diff 0," in out and "agree" in out


def test_permuted_q_and_k_rows_keep_every_name_and_shape_but_not_the_logits(tmp_path, capsys):
    """ChatGLM3 in MindFormers' split form, wq and wk rows rearranged within each head."""
    src = _source("chatglm", tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text())
    ckpt = tmp_path / "model.ckpt"
    convert(f"safetensors:{src / 'model.safetensors'}", f"mindspore-ckpt:{ckpt}")
    tensors = {k: MindSporeCkptFile(ckpt).get(k).copy() for k in MindSporeCkptFile(ckpt).keys()}
    planted = 0
    for name in list(tensors):
        if name.endswith(("self_attention.wq.weight", "self_attention.wk.weight",
                          "self_attention.wq.bias", "self_attention.wk.bias")):
            tensors[name] = tensors[name][_halves_to_pairs(len(tensors[name]), cfg["kv_channels"])]
            planted += 1
    assert planted == 8, sorted(tensors)
    bad = tmp_path / "permuted.ckpt"
    mindspore_ckpt.write(bad, tensors)
    code = main(["verify", f"safetensors:{src / 'model.safetensors'}", f"mindspore-ckpt:{bad}", "--logits",
                 "--config", str(src / "config.json")])
    out = capsys.readouterr().out
    assert code == 1 and "differ: 4 of 18 tensors" in out and "differ: max abs error" in out, out
    # tensor equality alone says the same; the logits say how much it matters (here: at all)
    assert main(["verify", f"safetensors:{src / 'model.safetensors'}", f"mindspore-ckpt:{ckpt}", "--logits",
                 "--input-ids", "3,1,4,1,5", "--config", str(src / "config.json")]) == 0
    assert "logits on 5 tokens" in capsys.readouterr().out


def test_logits_need_a_config(tmp_path, capsys):
    src = _source("qwen2", tmp_path / "hf")
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    assert main(["verify", f"safetensors:{lone / 'model.safetensors'}", f"safetensors:{lone / 'model.safetensors'}",
                 "--logits"]) == 2
    assert "--logits needs the model's config.json" in capsys.readouterr().err
