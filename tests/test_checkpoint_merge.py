"""Distributed MindSpore checkpoints (rank_*/ shards plus the parallel strategy file) merged by `accel
convert` into one checkpoint, against MindSpore's own `transform_checkpoints` on the same shards.

MindSpore 2.10 refuses semi-auto parallel on CPU ("Invalid communication backend: CPU for
semi_auto_parallel/auto_parallel mode, currently only support Ascend/GPU backend"), so it cannot shard a
run here: the shards are sliced by hand and saved with MindSpore's `save_checkpoint`, and the strategy
file is its `ParallelStrategyMap` protobuf, in the layout a tensor-parallel Qwen2 run writes (q/k/v and
gate/up split by output rows, o_proj and down_proj by input columns, norms and embeddings replicated,
a data-parallel axis holding copies)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from accel.checkpoint.convert import convert
from accel.checkpoint.safetensors import SafetensorsFile
from accel.cli import main

ms = pytest.importorskip("mindspore")

# dev matrix [dp=2, tp=2]: tensor map entries count device axes from the right, so 0 = tp, 1 = dp
LAYOUT = {"q.weight": [0, -1], "q.bias": [0], "o.weight": [-1, 0], "norm.weight": None, "both.weight": [1, 0]}


def _full() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {"q.weight": rng.standard_normal((8, 6)).astype(np.float32),
            "q.bias": rng.standard_normal(8).astype(np.float32),
            "o.weight": rng.standard_normal((6, 8)).astype(np.float32),
            "norm.weight": rng.standard_normal(6).astype(np.float32),
            "both.weight": rng.standard_normal((4, 10)).astype(np.float16)}


def _slice(a: np.ndarray, tmap: list[int] | None, coord: tuple[int, int]) -> np.ndarray:
    if tmap is None:
        return a
    dev = (2, 2)
    for axis, m in enumerate(tmap):
        if m >= 0:
            d = len(dev) - 1 - m
            a = np.split(a, dev[d], axis=axis)[coord[d]]
    return a


def _distributed(root: Path, full: dict[str, np.ndarray], tamper: bool = False) -> Path:
    from mindspore.train import node_strategy_pb2 as pb

    m = pb.ParallelStrategyMap()
    m.current_stage = 1
    for name, tmap in LAYOUT.items():
        if tmap is None:
            continue
        item = m.parallel_layout_item.add()
        item.param_name = name
        lay = item.parallel_layouts
        lay.dev_matrix.add().dim.extend([2, 2])
        lay.tensor_map.add().dim.extend(tmap)
        lay.param_split_shape.add()
        lay.indices_offset.add()
        lay.field, lay.opt_weight_shard_step, lay.opt_weight_shard_size = 0, 0, 0  # required: no optimizer sharding
    src = root / "run"
    src.mkdir(parents=True)
    (src / "ckpt_strategy.ckpt").write_bytes(m.SerializeToString())
    for rank in range(4):
        coord = (rank // 2, rank % 2)
        parts = {n: _slice(a, LAYOUT[n], coord).copy() for n, a in full.items()}
        if tamper and rank == 3:
            parts["q.weight"][0, 0] += 1  # a data-parallel copy that differs from rank 1's
        (src / f"rank_{rank}").mkdir()
        ms.save_checkpoint([{"name": n, "data": ms.Tensor(a)} for n, a in parts.items()],
                           str(src / f"rank_{rank}" / f"qwen2_rank_{rank}-1_2.ckpt"))
    return src


def test_merged_as_mindspores_transform_checkpoints_merges_it(tmp_path):
    full = _full()
    src = _distributed(tmp_path, full)
    convert(f"mindspore-ckpt:{src}", f"safetensors:{tmp_path / 'merged.safetensors'}", keymap="keep")
    ours = SafetensorsFile(tmp_path / "merged.safetensors")
    assert sorted(ours.keys()) == sorted(full)
    for name, a in full.items():
        np.testing.assert_array_equal(ours.get(name), a, err_msg=name)
        assert ours.get(name).dtype == a.dtype

    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)  # MindSpore writes its logs beside the process
        ms.parallel.transform_checkpoints(str(src), str(tmp_path / "theirs"), "merged",
                                          str(src / "ckpt_strategy.ckpt"), None)
    finally:
        os.chdir(cwd)
    theirs = ms.load_checkpoint(str(tmp_path / "theirs" / "rank_0" / "merged0.ckpt"))
    assert sorted(theirs) == sorted(full)
    for name, p in theirs.items():
        np.testing.assert_array_equal(ours.get(name), p.asnumpy(), err_msg=name)


def test_copies_that_differ_and_missing_strategies_are_refused(tmp_path, capsys):
    src = _distributed(tmp_path, _full(), tamper=True)
    assert main(["convert", "--from", f"mindspore-ckpt:{src}", "--to", f"safetensors:{tmp_path / 'm.safetensors'}",
                 "--keymap", "keep"]) == 2
    err = capsys.readouterr().err
    assert "q.weight: rank_3's copy differs from rank_1's" in err and "Traceback" not in err
    assert not (tmp_path / "m.safetensors").exists() and not list(tmp_path.glob(".m.safetensors*"))
    (src / "ckpt_strategy.ckpt").rename(tmp_path / "elsewhere.ckpt")
    assert main(["convert", "--from", f"mindspore-ckpt:{src}", "--to", f"safetensors:{tmp_path / 'm.safetensors'}",
                 "--keymap", "keep"]) == 2
    assert "holds no parallel strategy file" in capsys.readouterr().err
    # given with --strategy, where it lies; the untampered layers merge, the tampered copy still refused
    assert main(["convert", "--from", f"mindspore-ckpt:{src}", "--to", f"safetensors:{tmp_path / 'm.safetensors'}",
                 "--keymap", "keep", "--strategy", str(tmp_path / "elsewhere.ckpt")]) == 2
    assert "rank_3's copy differs" in capsys.readouterr().err
    (tmp_path / "junk.ckpt").write_bytes(b"\x08\x01junk")
    assert main(["convert", "--from", f"mindspore-ckpt:{src}", "--to", f"safetensors:{tmp_path / 'm.safetensors'}",
                 "--keymap", "keep", "--strategy", str(tmp_path / "junk.ckpt")]) == 2
    assert "is not a MindSpore parallel strategy file" in capsys.readouterr().err
    assert main(["convert", "--from", f"mindspore-ckpt:{src / 'rank_0' / 'qwen2_rank_0-1_2.ckpt'}", "--to",
                 f"safetensors:{tmp_path / 'm.safetensors'}", "--strategy", str(tmp_path / "elsewhere.ckpt")]) == 2
    assert "--strategy merges a distributed MindSpore checkpoint" in capsys.readouterr().err


def test_a_tensor_parallel_qwen2_run_merges_back_to_the_hf_checkpoint_it_started_from(tmp_path, capsys):
    """HF Qwen2 -> MindFormers 2.x names (fused linear_qkv/linear_fc1) -> 2 tensor-parallel shards as a
    Megatron-style run holds them (fused rows, embeddings and output rows split; linear_proj/linear_fc2
    columns; norms replicated) -> accel convert merges and maps back -> the same tensors and logits."""
    from mindspore.train import node_strategy_pb2 as pb

    from accel.checkpoint.mindspore_ckpt import MindSporeCkptFile
    from tests.conftest import save_hf_qwen2

    src = save_hf_qwen2(tmp_path / "hf")
    whole = tmp_path / "whole.ckpt"
    convert(f"safetensors:{src / 'model.safetensors'}", f"mindspore-ckpt:{whole}", keymap="mindformers:megatron")
    tensors = {k: MindSporeCkptFile(whole).get(k) for k in MindSporeCkptFile(whole).keys()}
    rows = ("linear_qkv", "linear_fc1", "word_embeddings", "output_layer")
    columns = ("linear_proj", "linear_fc2")
    tmaps = {k: ([0] + [-1] * (a.ndim - 1) if any(r in k for r in rows) else
                 [-1, 0] if any(c in k for c in columns) else None) for k, a in tensors.items()}
    m = pb.ParallelStrategyMap()
    m.current_stage = 1
    for name, tmap in tmaps.items():
        if tmap is not None:
            item = m.parallel_layout_item.add()
            item.param_name = name
            lay = item.parallel_layouts
            lay.dev_matrix.add().dim.extend([2])
            lay.tensor_map.add().dim.extend(tmap)
            lay.param_split_shape.add()
            lay.indices_offset.add()
            lay.field, lay.opt_weight_shard_step, lay.opt_weight_shard_size = 0, 0, 0
    run = tmp_path / "run"
    (run / "strategy").mkdir(parents=True)
    (run / "strategy" / "ckpt_strategy_rank_0.ckpt").write_bytes(m.SerializeToString())
    for rank in range(2):
        (run / f"rank_{rank}").mkdir()
        parts = {k: a if (t := tmaps[k]) is None else np.split(a, 2, axis=t.index(0))[rank] for k, a in tensors.items()}
        ms.save_checkpoint([{"name": k, "data": ms.Tensor(np.ascontiguousarray(a))} for k, a in parts.items()],
                           str(run / f"rank_{rank}" / "qwen2.ckpt"))
    out = tmp_path / "back.safetensors"
    assert main(["convert", "--from", f"mindspore-ckpt:{run}", "--to", f"safetensors:{out}",
                 "--config", str(src / "config.json")]) == 0
    assert main(["verify", f"safetensors:{src / 'model.safetensors'}", f"safetensors:{out}", "--logits",
                 "--config", str(src / "config.json")]) == 0
    said = capsys.readouterr().out
    assert "equal: 27 tensors" in said and "max abs diff 0," in said, said
