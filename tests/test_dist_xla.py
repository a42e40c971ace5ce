"""XLA collectives on 4 host devices (one process with XLA_FLAGS=--xla_force_host_platform_device_count=4,
the flag set before jax is imported): every collective against NumPy, the tensor-parallel forward of
every family (tp=4 with replicated KV heads, a tp=2 x dp=2 mesh for 6 heads) and a data-parallel step
on 4 devices, both against torch:cpu single-process references."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

from tests.dist_scripts.launches import TINY
from tests.test_dist import numpy_result

pytest.importorskip("jax")


@cache
def four_devices() -> list[dict]:
    from accel.conformance.collectives import run_xla

    return run_xla({"target": "xla:cpu", "primitives": True, "tp": TINY, "dp": ("qwen2-tiny",), "timeout": 60}, 4)


def test_every_collective_matches_numpy_on_four_devices():
    outputs = four_devices()
    assert [o["rank"] for o in outputs] == [0, 1, 2, 3]
    keys = outputs[0]["primitives"].keys()
    assert {k[1] for k in keys} == {"float32", "int64"}
    checked = set()
    for item, dtype, shape in keys:
        if item == "barrier":  # one SPMD program: there is nothing to wait for
            continue
        runs = [o["primitives"][(item, dtype, shape)] for o in outputs]
        xs = [r["input"] for r in runs]
        if item in ("reduce_scatter", "all_to_all"):  # one shape per device: the split dim divides by 4
            assert xs[0].shape == (4 * shape[0], *shape[1:])
        for rank, run in enumerate(runs):
            got, want = run["output"], numpy_result(item, xs, rank)
            assert got.dtype == np.dtype(dtype) and got.shape == want.shape, (item, dtype, shape)
            if dtype == "int64" or item in ("all_reduce-max", "all_reduce-min") or "reduce" not in item:
                np.testing.assert_array_equal(got, want, err_msg=f"{item} {dtype} {shape} rank {rank}")
            else:
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5, err_msg=f"{item} {shape} rank {rank}")
        checked.add(item)
    assert len(checked) == 9


@pytest.mark.parametrize("preset", TINY)
def test_tensor_parallel_forward_on_a_mesh_equals_torch_single_process(preset):
    from tests.test_tp import reference_logits

    outputs = four_devices()
    first = outputs[0]["tp"][preset]
    tp, dp = first["tp"], first["dp"]
    assert (tp, dp) == ((2, 2) if preset == "baichuan2-13b-tiny" else (4, 1))
    ids = np.concatenate([outputs[d * tp]["tp"][preset]["ids"] for d in range(dp)])
    ref = reference_logits(preset, ids)
    for rank, o in enumerate(outputs):
        d = rank // tp
        assert np.abs(o["tp"][preset]["logits"] - ref[2 * d: 2 * d + 2]).max() <= 1e-5, (preset, rank)


def test_data_parallel_step_on_four_devices_equals_torch_single_process():
    from accel.models import from_preset
    from accel.targets import open_target
    from accel.train import train

    outs = [o["dp"]["qwen2-tiny"] for o in four_devices()]
    model, params = from_preset("qwen2-tiny", seed=0)
    batch = {"input_ids": np.concatenate([o["ids"] for o in outs]),
             "labels": np.concatenate([o["labels"] for o in outs])}
    step = next(train(model, open_target("torch:cpu", policy={}), params, [batch], steps=1, lr=1e-3))
    for o in outs:
        assert abs(o["loss"] - step.loss) <= 1e-5
        assert abs(o["grad_norm"] - step.grad_norm) <= 1e-5 * step.grad_norm
        for k, v in step.trainable.items():
            ref = v.detach().numpy()
            g = o["m"][k] / 0.1  # AdamW's first moment after one step from zero: 0.1 g
            steep = np.abs(g) >= 1e-6  # below, the first AdamW update amplifies float32 noise (see test_dist)
            np.testing.assert_allclose(o["params"][k][steep], ref[steep], rtol=0, atol=1e-5, err_msg=k)
            np.testing.assert_array_equal(o["params"][k], outs[0]["params"][k])
