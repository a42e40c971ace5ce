"""MindSpore collectives on 2 CPU ranks, through `accel launch --backend mindspore` (msrun, with
MindSpore's own CPU collectives, mccl): every collective against NumPy, the tensor-parallel forward of
every family and a data-parallel step against torch:cpu single-process references."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

from tests.dist_scripts.launches import TINY, accel_launch
from tests.test_dist import check_collectives

pytest.importorskip("mindspore")


@cache
def two_ranks() -> list[dict]:
    spec = {"target": "mindspore:cpu", "primitives": True, "tp": TINY, "dp": ("chatglm3-tiny",), "timeout": 120}
    return accel_launch("mindspore", 2, spec, timeout=400)


def test_every_collective_matches_numpy():
    check_collectives(two_ranks(), {(7,), (13, 5)})


@pytest.mark.parametrize("preset", TINY)
def test_tensor_parallel_forward_equals_torch_single_process(preset):
    from tests.test_tp import reference_logits

    for rank, o in enumerate(two_ranks()):
        got = o["tp"][preset]
        assert (got["tp"], got["dp"]) == (2, 1)
        assert np.abs(got["logits"] - reference_logits(preset, got["ids"])).max() <= 1e-5, (preset, rank)


def test_data_parallel_step_equals_torch_single_process():
    from accel.models import from_preset
    from accel.targets import open_target
    from accel.train import train

    outs = [o["dp"]["chatglm3-tiny"] for o in two_ranks()]
    model, params = from_preset("chatglm3-tiny", seed=0)
    batch = {"input_ids": np.concatenate([o["ids"] for o in outs]),
             "labels": np.concatenate([o["labels"] for o in outs])}
    step = next(train(model, open_target("torch:cpu", policy={}), params, [batch], steps=1, lr=1e-3))
    for o in outs:
        assert abs(o["loss"] - step.loss) <= 1e-5
        for k, v in step.trainable.items():
            ref = v.detach().numpy()
            steep = np.abs(o["m"][k] / 0.1) >= 1e-6  # see test_dist: AdamW's first update near g = 0
            np.testing.assert_allclose(o["params"][k][steep], ref[steep], rtol=0, atol=1e-5, err_msg=k)
            np.testing.assert_array_equal(o["params"][k], outs[0]["params"][k])
