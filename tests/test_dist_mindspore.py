"""MindSpore collectives on 2 CPU ranks, through `accel launch --backend mindspore` (msrun, with
MindSpore's own CPU collectives, mccl): every collective against NumPy, the tensor-parallel forward of
every family and a data-parallel step against torch:cpu single-process references; faults (a hung
rank, a killed rank) as one-line errors within the timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from functools import cache

import numpy as np
import pytest

from accel import dist
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


# --- faults: the ranks started by hand with msrun's environment (msrun itself would kill the survivors) ---


def _ms_job(scenario: str, world: int, timeout: float) -> list[subprocess.Popen]:
    """msrun's scheduler process and `world` workers, each running tests/dist_scripts/fault.py."""
    from tests.test_dist import FAULT, _free_port

    base = {**os.environ, "MS_WORKER_NUM": str(world), "MS_SCHED_HOST": "127.0.0.1",
            "MS_SCHED_PORT": str(_free_port()), "MS_TOPO_TIMEOUT": "120", "ACCEL_DIST_TIMEOUT": str(timeout),
            "GLOG_v": "3", "OMP_NUM_THREADS": "1"}
    roles = [{"MS_ROLE": "MS_SCHED", "RANK_ID": "0"}]
    roles += [{"MS_ROLE": "MS_WORKER", "MS_NODE_ID": str(r), "RANK_ID": str(r), "DEVICE_ID": str(r)}
              for r in range(world)]
    return [subprocess.Popen([sys.executable, str(FAULT), scenario], env={**base, **role}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for role in roles]


FAILS = """import sys, time
from accel import dist
if dist.init().rank == 1:
    sys.exit(3)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def ms_faults(tmp_path_factory):
    """Every scenario at once: [scheduler, rank 0, rank 1, ...] each, and a failing `accel launch`."""
    jobs = {"hang": _ms_job("hang", 2, 5), "dead": _ms_job("dead", 3, 90)}
    cwd = tmp_path_factory.mktemp("msrun")
    (cwd / "fails.py").write_text(FAILS)
    jobs["launch"] = [subprocess.Popen([sys.executable, "-m", "accel.cli", "launch", "--backend", "mindspore",
                                        "--nproc", "2", "--", "python", "fails.py"], cwd=cwd, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)]
    yield jobs
    for procs in jobs.values():
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


def _ended(proc: subprocess.Popen, limit: float) -> tuple[int, str, str, float]:
    out, err = proc.communicate(timeout=limit)
    entered = next((float(ln.split()[-1]) for ln in out.splitlines() if ln.startswith("entering")), None)
    assert entered is not None, out[-2000:] + err[-2000:]
    return proc.returncode, out, err, time.time() - entered


def test_a_hung_rank_ends_the_others_at_the_timeout_with_one_line(ms_faults):
    """MindSpore's all_reduce returns before the peers join: the bound must hold until it completes."""
    code, out, err, took = _ended(ms_faults["hang"][1], 300)
    assert code == dist.TIMEOUT_EXIT_CODE, out[-2000:] + err[-2000:]
    assert err.strip() == ("accel.dist: error: all_reduce(sum) did not complete within 5 s on rank 0 of 2: a peer "
                           "rank died or hangs (see its log); ACCEL_DIST_TIMEOUT sets the limit; ending this rank")
    assert 4.5 < took < 60
    assert ms_faults["hang"][2].poll() is None  # still asleep: it was never going to join


def test_a_rank_killed_mid_collective_is_a_collective_error_on_the_others(ms_faults):
    """The collective's failure is a CollectiveError. MindSpore's scheduler, seeing a node gone, also
    ends the survivors itself ("Callback on exception is called ... Kill this process with SIGTERM", in
    libmindspore_cluster): a rank it reaches before its all_reduce fails ends with SIGTERM, bounded too."""
    procs = ms_faults["dead"]
    for p in procs[1:3]:
        code, out, err, took = _ended(p, 300)
        assert code in (2, -15), out[-2000:] + err[-2000:]
        lines = [ln for ln in out.splitlines() if ln.startswith("accel-error: ")]
        if code == 2 or lines:  # the line comes first; MindSpore's SIGTERM may still end the exit
            assert len(lines) == 1, out[-2000:]
            assert lines[0].startswith("accel-error: CollectiveError: all_reduce(sum) failed on rank "), lines
            assert " of 3: " in lines[0] and "a peer rank may have died" in lines[0], lines
        assert took < 90 and "Traceback" not in out + err
    assert procs[3].wait(timeout=60) == -9


def test_a_failed_msrun_launch_says_which_rank_in_one_line_each(ms_faults):
    proc = ms_faults["launch"][0]
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 3, out[-2000:] + err[-2000:]
    ours = [ln for ln in err.splitlines() if ln.startswith("accel launch: ")]
    assert ours[:2] == ["accel launch: rank 1 failed with exit code 3: see msrun_logs/worker_1.log",
                        "accel launch: rank 0 was ended by msrun (after rank 1)"], err[-3000:]
    assert "Traceback" not in out + err
