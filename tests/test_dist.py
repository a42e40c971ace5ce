"""accel.dist on real torch.distributed (gloo) ranks: every collective against NumPy on 2 and 4 ranks
(float32 and int64, odd sizes), the data-parallel step against the single-process step, faults (a
dead rank, a hung rank, a wrong world size, no master) as errors within the timeout, `accel launch`,
and the collective conformance cases through `accel conformance`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from accel import dist
from tests.conftest import run_cli
from tests.dist_scripts.launches import TINY, torch_four_ranks, torch_two_ranks

FAULT = Path(__file__).parent / "dist_scripts" / "fault.py"


def numpy_result(item: str, xs: list[np.ndarray], rank: int) -> np.ndarray:
    """What each collective must return on `rank`, given every rank's input, written out by hand."""
    n = len(xs)
    if item.startswith("all_reduce-"):
        op = item.split("-")[1]
        if op == "max":
            return np.maximum.reduce(xs)
        if op == "min":
            return np.minimum.reduce(xs)
        total = sum(x.astype(np.float64) if x.dtype.kind == "f" else x for x in xs)
        if op == "sum":
            return total
        return total / n if xs[0].dtype.kind == "f" else np.fix(total / n).astype(np.int64)  # toward zero
    if item == "all_gather":
        return np.concatenate(xs, axis=0)
    if item == "reduce_scatter":
        total = sum(x.astype(np.float64) if x.dtype.kind == "f" else x for x in xs)
        rows = len(total)
        start = rank * (rows // n) + min(rank, rows % n)
        return total[start: start + rows // n + (rank < rows % n)]
    if item == "broadcast":
        return xs[n - 1]
    if item == "all_to_all":
        pieces = [np.array_split(x, n)[rank] for x in xs]
        return np.concatenate(pieces, axis=0)
    if item == "send_recv":
        return xs[(rank - 1) % n]
    raise AssertionError(item)


def check_collectives(outputs: list[dict], expect_shapes: set[tuple[int, ...]]) -> None:
    n = len(outputs)
    assert [o["rank"] for o in outputs] == list(range(n)) and all(o["world"] == n for o in outputs)
    keys = outputs[0]["primitives"].keys()
    assert {k[0] for k in keys} == {"all_reduce-sum", "all_reduce-avg", "all_reduce-max", "all_reduce-min",
                                    "all_gather", "reduce_scatter", "broadcast", "all_to_all", "send_recv", "barrier"}
    assert {k[1] for k in keys} == {"float32", "int64"} and {k[2] for k in keys} == expect_shapes
    for item, dtype, shape in keys:
        runs = [o["primitives"][(item, dtype, shape)] for o in outputs]
        if item == "barrier":  # rank r arrived r * 50 ms late: nobody left before the last arrival
            last = max(r["output"][0] for r in runs)
            assert all(r["output"][1] >= last for r in runs), (item, shape)
            continue
        xs = [r["input"] for r in runs]
        assert all(x.dtype == np.dtype(dtype) for x in xs)
        for rank, run in enumerate(runs):
            got, want = run["output"], numpy_result(item, xs, rank)
            assert got.dtype == np.dtype(dtype), (item, dtype, got.dtype)
            assert got.shape == want.shape, (item, dtype, shape, rank)
            if dtype == "int64" or item in ("all_reduce-max", "all_reduce-min") or "reduce" not in item:
                np.testing.assert_array_equal(got, want, err_msg=f"{item} {dtype} {shape} rank {rank}")
            else:  # a float32 sum of n terms, in whatever order the library adds them
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5, err_msg=f"{item} {shape} rank {rank}")


def test_two_ranks_every_collective_matches_numpy():
    check_collectives(torch_two_ranks(), {(7,), (13, 5)})


def test_four_ranks_through_accel_launch_match_numpy():
    check_collectives(torch_four_ranks(), {(7,), (13, 5)})


@pytest.mark.parametrize("preset", TINY)
def test_data_parallel_step_equals_the_single_process_step(preset):
    """Each of 2 ranks steps on its half of the batch; the ranks hold different numbers of target tokens,
    so the step must weight their gradients to equal AdamW's step on the whole batch."""
    from accel.models import from_preset
    from accel.runtime import place
    from accel.targets import open_target
    from accel.train import lm_loss, split_trainable, train

    outs = [o["dp"][preset] for o in torch_two_ranks()]
    ids = np.concatenate([o["ids"] for o in outs])
    labels = np.concatenate([o["labels"] for o in outs])
    model, params = from_preset(preset, seed=0)
    backend = open_target("torch:cpu", policy={})
    ops = backend.ops
    step = next(train(model, backend, params, [{"input_ids": ids, "labels": labels}], steps=1, lr=1e-3))
    trainable, frozen = split_trainable(model, place(backend, params, "float32"))
    value_and_grad = backend.value_and_grad(lambda t, x, y: lm_loss(model, ops, {**frozen, **t}, x, y))

    def grads_of(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        _, grads = value_and_grad(trainable, ops.asarray(x, "int64"), ops.asarray(y, "int64"))
        return {k: np.asarray(backend.to_numpy(v), np.float64) for k, v in grads.items()}

    g = grads_of(ids, labels)
    weights = {k: np.asarray(backend.to_numpy(v)) for k, v in step.trainable.items()}
    # the batch does need the weighting: the plain average of the halves' gradients is far off
    halves = [grads_of(o["ids"], o["labels"]) for o in outs]
    assert max(np.abs((halves[0][k] + halves[1][k]) / 2 - g[k]).max() / np.abs(g[k]).max() for k in g) > 1e-2
    for o in outs:
        assert abs(o["loss"] - step.loss) <= 1e-5
        for k in g:
            # AdamW's first moment after one step from zero is 0.1 g: the averaged gradient
            np.testing.assert_allclose(o["m"][k] / 0.1, g[k], rtol=0, atol=1e-5 * np.abs(g[k]).max() + 1e-9)
            # where |g| < 1e-6 the first AdamW update, lr g / (|g| + eps), amplifies float32 noise
            steep = np.abs(g[k]) >= 1e-6
            np.testing.assert_allclose(o["params"][k][steep], weights[k][steep], rtol=0, atol=1e-5, err_msg=k)
        # replicas stay identical: every rank applied the same averaged gradient
        for k in g:
            np.testing.assert_array_equal(o["params"][k], outs[0]["params"][k])


def test_data_parallel_step_on_four_ranks():
    from accel.models import from_preset
    from accel.train import train

    outs = [o["dp"]["qwen-tiny"] for o in torch_four_ranks()]
    model, params = from_preset("qwen-tiny", seed=0)
    batch = {"input_ids": np.concatenate([o["ids"] for o in outs]),
             "labels": np.concatenate([o["labels"] for o in outs])}
    from accel.targets import open_target

    step = next(train(model, open_target("torch:cpu", policy={}), params, [batch], steps=1, lr=1e-3))
    assert all(abs(o["loss"] - step.loss) <= 1e-5 for o in outs)


# --- faults -------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(scenario: str, rank: int, world: int, port: int, timeout: float) -> subprocess.Popen:
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "ACCEL_DIST_TIMEOUT": str(timeout),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(FAULT), scenario], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def faults():
    """Every scenario's ranks at once (each imports torch: in parallel the imports overlap)."""
    started = time.monotonic()
    scenarios = {
        "dead": [_rank("dead", r, 3, port, 20) for port in [_free_port()] for r in range(3)],
        "hang": [_rank("hang", r, 2, port, 4) for port in [_free_port()] for r in range(2)],
        # WORLD_SIZE says 3, 2 ranks start
        "world": [_rank("init", r, 3, port, 4) for port in [_free_port()] for r in range(2)],
        # rank 1 of 2 whose master (rank 0) never starts: nobody listens on the port
        "master": [_rank("init", 1, 2, _free_port(), 4)],
    }
    yield scenarios, started
    for procs in scenarios.values():
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def _finish(proc: subprocess.Popen, limit: float) -> tuple[int, str, float]:
    out, _ = proc.communicate(timeout=limit)
    return proc.returncode, out, time.time()


def _accel_error(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.startswith("accel-error: ")]
    assert len(lines) == 1, out[-2000:]
    return lines[0]


def test_a_rank_killed_mid_collective_fails_the_others_within_the_timeout(faults):
    procs = faults[0]["dead"]
    for p in procs[:2]:
        code, out, ended = _finish(p, 120)
        line = _accel_error(out)
        assert code == 2 and "all_reduce(sum)" in line and "of 3" in line, line
        entered = float(next(ln for ln in out.splitlines() if ln.startswith("entering")).split()[-1])
        assert ended - entered < 60  # an error well within the limit, not a hang
        assert "\n" not in line.removeprefix("accel-error: ")
    procs[2].wait(timeout=60)
    assert procs[2].returncode == -9


def test_a_hung_rank_is_a_timeout_error_on_the_others(faults):
    code, out, ended = _finish(faults[0]["hang"][0], 120)
    line = _accel_error(out)
    assert code == 2, line
    assert line.startswith("accel-error: CollectiveTimeout: all_reduce(sum) did not complete within 4 s"), line
    entered = float(next(ln for ln in out.splitlines() if ln.startswith("entering")).split()[-1])
    assert 3.5 < ended - entered < 30
    assert faults[0]["hang"][1].poll() is None  # still asleep: it was never going to join


def test_a_wrong_world_size_is_a_clear_error(faults):
    for p in faults[0]["world"]:
        code, out, _ = _finish(p, 120)
        line = _accel_error(out)
        assert code == 2 and "CollectiveTimeout: process group set-up timed out after 4 s" in line, line
        assert "world size" in line


def test_an_unreachable_master_is_a_clear_error(faults):
    code, out, _ = _finish(faults[0]["master"][0], 120)
    line = _accel_error(out)
    assert code == 2 and "cannot reach the master from rank 1 of 2" in line and "MASTER_ADDR" in line, line


def test_a_mindspore_watchdog_ends_an_overrunning_call(tmp_path):
    """MindSpore's collectives block in C++; the bound must end the rank with one line."""
    code = ("import time\nfrom accel.dist._mindspore import MindSporeCollectives, _Bounded\n"
            "c = MindSporeCollectives.__new__(MindSporeCollectives); c.timeout, c.rank, c.world_size = 0.5, 1, 2\n"
            "with _Bounded(c, 'all_gather'):\n    time.sleep(30)\nprint('not reached')\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == dist.TIMEOUT_EXIT_CODE and time.monotonic() - start < 20
    assert proc.stderr.strip() == ("accel.dist: error: all_gather did not complete within 0.5 s on rank 1 of 2: a "
                                   "peer rank died or hangs (see its log); ACCEL_DIST_TIMEOUT sets the limit; "
                                   "ending this rank")


# --- the launch environment -------------------------------------------------------------------------------


def test_launch_info_reads_each_launchers_environment():
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    assert dist.launch_info(torchrun) == dist.LaunchInfo("torchrun", 3, 4, 1, "node0", 29500)
    msrun = {"MS_WORKER_NUM": "8", "MS_SCHED_HOST": "10.0.0.1", "MS_SCHED_PORT": "8118", "RANK_ID": "5",
             "DEVICE_ID": "5", "MS_ROLE": "MS_WORKER", "MS_NODE_ID": "5"}
    assert dist.launch_info(msrun) == dist.LaunchInfo("msrun", 5, 8, 5, "10.0.0.1", 8118)
    jax_env = {"JAX_COORDINATOR_ADDRESS": "host:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    info = dist.launch_info(jax_env)
    assert info == dist.LaunchInfo("jax", 1, 2, 1, "host", 1234) and info.engine == "xla"
    assert dist.launch_info({}) is None


@pytest.mark.parametrize("env, message", [
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "rank 2 is not in 0..1"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "MASTER_ADDR not set"),
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "must be integers"),
    ({"MS_WORKER_NUM": "2", "MS_SCHED_HOST": "h", "MS_SCHED_PORT": "1"}, "RANK_ID not set"),
])
def test_launch_info_rejects_a_broken_environment(env, message):
    with pytest.raises(dist.CollectiveError, match=message):
        dist.launch_info(env)


def test_backend_strings():
    assert dist.parse_backends(dist.TORCH_BACKENDS) == {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
    assert dist.parse_backends("cpu:mccl,ascend:hccl", ("cpu", "gpu", "ascend")) == {"cpu": "mccl", "ascend": "hccl"}
    for bad in ("gloo", "tpu:x", ","):
        with pytest.raises(dist.CollectiveError):
            dist.parse_backends(bad)


def test_init_without_a_launcher_says_how_to_launch(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MS_WORKER_NUM", "JAX_NUM_PROCESSES"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(dist.CollectiveError, match="accel launch --nproc N"):
        dist.init()


@pytest.mark.parametrize("argv, message", [
    (["launch", "--nproc", "2"], "no command to launch"),
    (["launch", "--nproc", "0", "--", "python", __file__], "--nproc and --nnodes must be 1 or more"),
    (["launch", "--nproc", "2", "--", "python", "no_such_script.py"], "script no_such_script.py does not exist"),
    (["launch", "--backend", "mindspore", "--nproc", "2", "--", "ls"], "msrun runs Python only"),
    (["launch", "--nproc", "2", "--nnodes", "2", "--node-rank", "2", "--", "python", __file__], "--node-rank 2"),
])
def test_launch_usage_errors(argv, message, capsys):
    from accel.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_launch_hands_over_to_the_engines_launchers():
    import argparse

    from accel.commands.launch import mindspore_argv, torch_argv

    args = argparse.Namespace(nproc=4, nnodes=2, node_rank=1, master_addr="n0", master_port=None,
                              log_dir=Path("logs"), backend="torch")
    assert torch_argv(args, ["python", "-m", "pkg.train", "--lr", "1"]) == [
        "--nproc-per-node=4", "--max-restarts=0", "--nnodes=2", "--node-rank=1", "--master-addr=n0",
        "--master-port=29500", "-m", "pkg.train", "--lr", "1"]
    assert torch_argv(args, ["bash", "run.sh"])[-3:] == ["--no-python", "bash", "run.sh"]
    assert mindspore_argv(args, ["python", __file__, "x"]) == [
        "--worker_num=8", "--local_worker_num=4", "--master_addr=n0", "--master_port=29500", "--log_dir=logs",
        "--join=True", "--node_rank=1", "python", __file__, "x"]


# --- the conformance cases --------------------------------------------------------------------------------


def test_conformance_collectives_on_torch_and_xla(tmp_path):
    proc = run_cli("conformance", "--cases", "collectives", "--nproc", "2", "--targets", "torch:cpu,xla:cpu",
                   "--models", "qwen2-tiny", "--report-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "latest" / "report.json").read_text())["rows"]
    got = {(r["target"], r["model"], r["dtype"]): r["status"] for r in rows if r["case"] == "collectives"}
    for target in ("torch:cpu", "xla:cpu"):
        for item in ("all_reduce-sum", "all_reduce-avg", "all_reduce-max", "all_reduce-min", "all_gather",
                     "reduce_scatter", "broadcast", "all_to_all", "send_recv", "barrier"):
            assert got[(target, item, "float32")] == got[(target, item, "int64")] == "pass", (target, item)
        assert got[(target, "tp-qwen2-tiny", "float32")] == "pass"
        assert got[(target, "dp-step-qwen2-tiny", "float32")] == "pass"
    assert len(got) == 2 * 22


def test_a_failed_launch_says_which_rank_in_one_line_each(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("import os, sys, time\n"
                      "if os.environ['RANK'] == '1':\n    sys.exit(3)\n"
                      "time.sleep(60)\n")
    r = subprocess.run([sys.executable, "-m", "accel.cli", "launch", "--nproc", "2", "--", "python", str(script)],
                       capture_output=True, text=True, timeout=600)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 3, r.stderr
    assert lines[0] == "accel launch: rank 1 failed with exit code 3: see its output above", r.stderr
    assert lines[1].startswith("accel launch: rank 0 failed with signal SIGTERM (after rank 1)"), r.stderr
    assert len(lines) == 2 and "Traceback" not in r.stderr
