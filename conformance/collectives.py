"""Collective cases: every collective on --nproc ranks against its NumPy expectation, a tensor-parallel
forward against the single-device logits, and a data-parallel training step against the single-device
step on the concatenated batch, with the ranks started by each engine's own launcher: torch targets
through torchrun's elastic agent (`elastic_launch`), mindspore targets through msrun, xla targets as
host devices of one process (XLA_FLAGS=--xla_force_host_platform_device_count=N).

Items: all_reduce-{sum,avg,max,min}, all_gather, reduce_scatter, broadcast, all_to_all, send_recv and
barrier at float32 and int64, each on shapes (7,) and (13, 5) (odd, so reduce_scatter and all_to_all
split unevenly; under XLA, whose SPMD programs have one shape per device, those two take (7 N,) and
(13 N, 5)); tp-<preset> and dp-step-<preset> at float32. One launch runs every collective item and one
more per preset runs its TP and DP checks; a launch's rows are computed once and handed out as the
worker asks for them.

The ranks return their raw inputs and outputs; the expectations are computed here, in the process that
judges. TP degree: the largest divisor of --nproc the model splits over (heads, KV heads or groups, MLP
width); the rest of the ranks are data parallel (a tp x dp grid, the batch split over dp). Tolerances:
data movement and integers exact; float32 sums within nproc unit roundoffs of sum |x| (the bound of a
float32 sum of nproc terms in any order); TP logits and the DP step within 1e-5 (float32 partial sums
added in another order).
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from accel.conformance.cases import Context, Row, seed_of
from accel.conformance.metrics import compare

REDUCTIONS = ("all_reduce-sum", "all_reduce-avg", "all_reduce-max", "all_reduce-min")
PRIMITIVES = (*REDUCTIONS, "all_gather", "reduce_scatter", "broadcast", "all_to_all", "send_recv", "barrier")
DTYPES = ("float32", "int64")
SHAPES = ((7,), (13, 5))
TOLERANCE = 1e-5  # TP logits and the DP step, float32
LR = 1e-3
DEFAULT_TIMEOUT = 60.0  # per collective call inside a launch


def case_input(rank: int, item: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(seed_of(item, dtype, str(shape), str(rank)))
    if dtype == "int64":  # negative values too: avg rounds toward zero
        return rng.integers(-50, 50, shape).astype(np.int64)
    return (10 * rng.standard_normal(shape)).astype(np.float32)


def _xla_shape(item: str, shape: tuple[int, ...], world: int) -> tuple[int, ...]:
    return (shape[0] * world, *shape[1:]) if item in ("reduce_scatter", "all_to_all") else shape


# --- inside a rank (torch, mindspore) -------------------------------------------------------------------


def _primitive_outputs(coll: Any, backend: Any) -> dict[tuple, dict[str, Any]]:
    rank, world = coll.rank, coll.world_size
    out: dict[tuple, dict[str, Any]] = {}
    for dtype in DTYPES:
        for shape in SHAPES:
            for item in PRIMITIVES:
                x = case_input(rank, item, dtype, shape)
                t = backend.asarray(x.copy(), dtype)  # torch may alias the buffer and reduce in place
                if item in REDUCTIONS:
                    y = coll.all_reduce(t, item.split("-")[1])
                elif item == "all_gather":
                    y = coll.all_gather(t)
                elif item == "reduce_scatter":
                    y = coll.reduce_scatter(t, "sum")
                elif item == "broadcast":
                    y = coll.broadcast(t, world - 1)
                elif item == "all_to_all":
                    y = coll.all_to_all(t)
                elif item == "send_recv":  # a ring; even ranks send first so that blocking sends pair up
                    buf = backend.asarray(np.zeros_like(x), dtype)
                    if rank % 2 == 0:
                        coll.send(t, (rank + 1) % world)
                        y = coll.recv(buf, (rank - 1) % world)
                    else:
                        y = coll.recv(buf, (rank - 1) % world)
                        coll.send(t, (rank + 1) % world)
                else:  # barrier: rank r arrives r * 50 ms late; nobody may leave before the last arrives
                    time.sleep(0.05 * rank)
                    before = time.time()
                    coll.barrier()
                    y = np.array([before, time.time()])
                out[(item, dtype, shape)] = {"input": x, "output": np.asarray(backend.to_numpy(y))}
    return out


def tp_degree(model: Any, nproc: int) -> int:
    from accel.parallel import feasible

    return max(t for t in range(1, nproc + 1) if nproc % t == 0 and feasible(model, t) is None)


def tp_ids(model: Any, dp: int) -> np.ndarray:
    rng = np.random.default_rng(seed_of(model.name, "tp-ids"))
    return rng.integers(0, model.vocab_size, (2 * dp, 12)).astype(np.int64)


def dp_batch(model: Any, world: int) -> tuple[np.ndarray, np.ndarray]:
    """2 sequences per rank; sequence i ignores its first min(3 i, 11) labels, so the ranks hold different
    numbers of target tokens and the step must weight them."""
    rng = np.random.default_rng(seed_of(model.name, "dp-batch"))
    ids = rng.integers(0, model.vocab_size, (2 * world, 13)).astype(np.int64)
    labels = ids[:, 1:].copy()
    for i in range(labels.shape[0]):
        labels[i, : min(3 * i, 11)] = -100
    return ids[:, :-1], labels


def _tp_outputs(coll: Any, backend: Any, preset: str) -> dict[str, Any]:
    from accel import parallel
    from accel.models import from_preset
    from accel.runtime import place

    model, params = from_preset(preset, seed=0)
    tp = tp_degree(model, coll.world_size)
    dp = coll.world_size // tp
    if tp == 1:
        return {"tp": 1, "dp": dp}
    tp_rank, dp_rank = coll.rank % tp, coll.rank // tp
    group = coll if dp == 1 else coll.subgroup([[d * tp + j for j in range(tp)] for d in range(dp)])
    rank_shard = parallel.shard(model, params, tp, tp_rank)
    ids = tp_ids(model, dp)[2 * dp_rank: 2 * dp_rank + 2]
    run = backend.compile(lambda p, x: parallel.forward(rank_shard, backend.ops, p, x, group.all_reduce))
    logits = run(place(backend, rank_shard.params, "float32"), backend.asarray(ids, "int64"))
    return {"tp": tp, "dp": dp, "ids": ids, "logits": np.asarray(backend.to_numpy(logits))}


def _dp_outputs(coll: Any, backend: Any, preset: str) -> dict[str, Any]:
    from accel.models import from_preset
    from accel.parallel import make_dp_train_step
    from accel.runtime import place
    from accel.train import AdamW, adamw_init, split_trainable, to_host

    model, params = from_preset(preset, seed=0)
    ids, labels = dp_batch(model, coll.world_size)
    mine = slice(2 * coll.rank, 2 * coll.rank + 2)
    trainable, frozen = split_trainable(model, place(backend, params, "float32"))
    step = make_dp_train_step(model, backend, AdamW(LR), coll)
    loss, norm, new, state = step(trainable, frozen, adamw_init(backend.ops, trainable),
                                  backend.asarray(ids[mine], "int64"), backend.asarray(labels[mine], "int64"))
    return {"loss": float(np.asarray(backend.to_numpy(loss))), "grad_norm": float(np.asarray(backend.to_numpy(norm))),
            "params": to_host(backend, new), "m": to_host(backend, state["m"]), "ids": ids[mine],
            "labels": labels[mine]}


def rank_outputs(spec: dict[str, Any]) -> dict[str, Any]:
    """One rank's share of a launch (run by the engine's launcher): spec {target, primitives: bool,
    tp: [presets], dp: [presets], timeout}. A rank that fails returns {"rank", "error"} instead, so the
    judge can name the first cause (the other ranks then fail on their next collective's timeout)."""
    from accel import dist

    try:
        return _rank_outputs(spec)
    except Exception as e:
        text = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        info = dist.launch_info()
        return {"rank": info.rank if info else 0, "error": f"{type(e).__name__}: {text[:300]}",
                "timeout": isinstance(e, dist.CollectiveTimeout)}


def _rank_outputs(spec: dict[str, Any]) -> dict[str, Any]:
    from accel import dist
    from accel.targets import open_target

    backend_name, _, device = spec["target"].partition(":")
    kind = device.partition(":")[0]
    info = dist.launch_info()
    local = info.local_rank if info is not None else 0
    backend = open_target(f"{backend_name}:{kind}" + ("" if kind == "cpu" else f":{local}"), policy={})
    coll = dist.init(timeout=spec.get("timeout", DEFAULT_TIMEOUT))
    out: dict[str, Any] = {"rank": coll.rank, "world": coll.world_size}
    if spec.get("primitives"):
        out["primitives"] = _primitive_outputs(coll, backend)
    out["tp"] = {p: _tp_outputs(coll, backend, p) for p in spec.get("tp", ())}
    out["dp"] = {p: _dp_outputs(coll, backend, p) for p in spec.get("dp", ())}
    coll.barrier()
    return out


# --- XLA: the ranks are the host devices of one process ------------------------------------------------


def xla_outputs(spec: dict[str, Any], nproc: int) -> list[dict[str, Any]]:
    """Every rank's outputs, computed as one SPMD program per check over `nproc` devices (run in a
    process whose XLA_FLAGS made that many host devices)."""
    import jax

    from accel.targets import open_target

    devices = jax.devices("cpu")
    if len(devices) < nproc:
        raise RuntimeError(f"{len(devices)} XLA host devices, {nproc} needed (XLA_FLAGS set too late?)")
    backend = open_target("xla:cpu", policy={})
    out: list[dict[str, Any]] = [{"rank": r, "world": nproc, "tp": {}, "dp": {}} for r in range(nproc)]
    if spec.get("primitives"):
        with jax.experimental.enable_x64():  # int64 collectives; scoped, the models below run without it
            prims = _xla_primitives(devices[:nproc])
        for r in range(nproc):
            out[r]["primitives"] = prims[r]
    for preset in spec.get("tp", ()):
        for r, o in enumerate(_xla_tp(backend, devices[:nproc], preset)):
            out[r]["tp"][preset] = o
    for preset in spec.get("dp", ()):
        for r, o in enumerate(_xla_dp(backend, devices[:nproc], preset)):
            out[r]["dp"][preset] = o
    return out


def _xla_primitives(devices: list[Any]) -> list[dict[tuple, dict[str, Any]]]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from accel.dist import XlaCollectives

    n = len(devices)
    mesh = Mesh(np.array(devices), ("ranks",))
    coll = XlaCollectives("ranks")
    calls = {
        **{item: (lambda op: lambda x: coll.all_reduce(x, op))(item.split("-")[1]) for item in REDUCTIONS},
        "all_gather": coll.all_gather, "reduce_scatter": lambda x: coll.reduce_scatter(x, "sum"),
        "broadcast": lambda x: coll.broadcast(x, n - 1), "all_to_all": coll.all_to_all,
        "send_recv": lambda x: coll.permute(x, [(r, (r + 1) % n) for r in range(n)]),
    }
    out: list[dict[tuple, dict[str, Any]]] = [{} for _ in range(n)]
    items = list(calls)
    for dtype in DTYPES:
        for shape in SHAPES:  # one program per dtype and shape runs every collective (one compile, not ten)
            xs = {item: [case_input(r, item, dtype, _xla_shape(item, shape, n)) for r in range(n)] for item in items}

            def body(*args: Any) -> tuple[Any, ...]:
                return tuple(calls[item](a[0])[None] for item, a in zip(items, args))

            fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=tuple(P("ranks") for _ in items),
                                       out_specs=tuple(P("ranks") for _ in items), check_vma=False))
            ys = fn(*(jnp.asarray(np.stack(xs[item])) for item in items))
            for item, y in zip(items, ys):
                for r in range(n):
                    out[r][(item, dtype, shape)] = {"input": xs[item][r], "output": np.asarray(y)[r]}
            for r in range(n):  # one SPMD program: nothing to wait for (see XlaCollectives.barrier)
                out[r][("barrier", dtype, shape)] = {"input": np.zeros(0), "output": np.array([0.0, 0.0])}
    return out


def _xla_tp(backend: Any, devices: list[Any], preset: str) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from accel import parallel
    from accel.dist import XlaCollectives
    from accel.models import from_preset

    model, params = from_preset(preset, seed=0)
    n = len(devices)
    tp = tp_degree(model, n)
    dp = n // tp
    if tp == 1:
        return [{"tp": 1, "dp": dp} for _ in range(n)]
    shards = [parallel.shard(model, params, tp, r) for r in range(tp)]
    meta = shards[0]
    names = list(meta.params)
    stacked = {k: np.stack([s.params[k] for s in shards]) if k in meta.sharded else meta.params[k] for k in names}
    specs = {k: P("tp") if k in meta.sharded else P() for k in names}
    slopes = np.stack([s.alibi_slopes if s.alibi_slopes is not None else np.zeros(1, np.float32) for s in shards])
    coll = XlaCollectives("tp")

    def body(p: dict[str, Any], slope: Any, ids: Any) -> Any:
        local = {k: v[0] if k in meta.sharded else v for k, v in p.items()}
        logits = parallel.forward(meta, backend.ops, local, ids, coll.all_reduce,
                                  alibi_slopes=slope[0] if meta.alibi_slopes is not None else None)
        return logits[None]  # (1, b, s, V): one copy per tp rank

    mesh = Mesh(np.array(devices).reshape(dp, tp), ("dp", "tp"))
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(specs, P("tp"), P("dp")), out_specs=P("tp", "dp"),
                               check_vma=False))
    ids = tp_ids(model, dp)
    logits = np.asarray(fn({k: jnp.asarray(v) for k, v in stacked.items()}, jnp.asarray(slopes),
                           jnp.asarray(ids, jnp.int32)))  # (tp, 2 dp, s, V)
    return [{"tp": tp, "dp": dp, "ids": ids[2 * (r // tp): 2 * (r // tp) + 2],
             "logits": logits[r % tp, 2 * (r // tp): 2 * (r // tp) + 2]} for r in range(n)]


def _xla_dp(backend: Any, devices: list[Any], preset: str) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from accel.dist import XlaCollectives
    from accel.models import from_preset
    from accel.parallel import average_gradients
    from accel.train import IGNORE_INDEX, AdamW, adamw_init, adamw_update, grad_norm, lm_loss, split_trainable

    model, params = from_preset(preset, seed=0)
    n, ops = len(devices), backend.ops
    ids, labels = dp_batch(model, n)
    trainable, frozen = split_trainable(model, {k: jnp.asarray(v) for k, v in params.items()})
    coll = XlaCollectives("dp")

    def body(trainable: dict[str, Any], frozen: dict[str, Any], ids: Any, labels: Any) -> Any:
        loss, grads = jax.value_and_grad(lambda t: lm_loss(model, ops, {**frozen, **t}, ids, labels))(trainable)
        mine = jnp.sum(labels != IGNORE_INDEX).astype(jnp.float32)
        share = mine / jnp.maximum(coll.all_reduce(mine, "sum"), 1.0)
        grads = average_gradients(ops, grads, coll.all_reduce, share * n)
        loss = coll.all_reduce(loss * share, "sum")
        new, state = adamw_update(ops, AdamW(LR), trainable, grads, adamw_init(ops, trainable))
        one = lambda x: x[None]  # noqa: E731 - each device's copy, to check that they agree
        return one(loss), one(grad_norm(ops, grads)), jax.tree_util.tree_map(one, (new, state["m"]))

    mesh = Mesh(np.array(devices), ("dp",))
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P("dp"), P("dp")), out_specs=P("dp"),
                               check_vma=False))
    loss, norm, (new, m) = fn(trainable, frozen, jnp.asarray(ids, jnp.int32), jnp.asarray(labels, jnp.int32))
    new, m = ({k: np.asarray(v) for k, v in d.items()} for d in (new, m))
    return [{"loss": float(loss[r]), "grad_norm": float(norm[r]), "params": {k: v[r] for k, v in new.items()},
             "m": {k: v[r] for k, v in m.items()}, "ids": ids[2 * r: 2 * r + 2], "labels": labels[2 * r: 2 * r + 2]}
            for r in range(n)]


# --- launching through the engines' launchers ------------------------------------------------------------


class LaunchFailed(Exception):
    pass


def launch_torch(spec: dict[str, Any], nproc: int) -> list[dict[str, Any]]:
    """`rank_outputs(spec)` on `nproc` ranks started by torchrun's elastic agent (what
    `torchrun --standalone --nproc-per-node N` runs)."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1, start_method="spawn")
    try:
        results = elastic_launch(config, rank_outputs)(spec)
    except ChildFailedError as e:  # a rank that died (rank_outputs returns its errors)
        rank, failure = min(e.failures.items())
        raise LaunchFailed(f"rank {rank} died with exit code {failure.exitcode}") from None
    return _checked([results[r] for r in range(nproc)])


def _checked(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The outputs, or LaunchFailed naming the first cause: an error that is not a timeout, if any."""
    failed = sorted((o.get("timeout", False), o["rank"], o["error"]) for o in outputs if "error" in o)
    if failed:
        raise LaunchFailed(f"rank {failed[0][1]}: {failed[0][2]}")
    return outputs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_mindspore(spec: dict[str, Any], nproc: int) -> list[dict[str, Any]]:
    """`rank_outputs(spec)` on `nproc` ranks started by msrun (MindSpore's launcher; its scheduler
    and the workers on this host)."""
    with tempfile.TemporaryDirectory(prefix="accel-msrun-") as tmp:
        work = Path(tmp)
        (work / "spec.pkl").write_bytes(pickle.dumps(spec))
        # msrun runs `python SCRIPT`: a two-line script runs this module, so that its directory (the
        # installed conformance package) does not land first on the ranks' sys.path
        (work / "rank.py").write_text("import runpy\nrunpy.run_module('accel.conformance.collectives', "
                                      "run_name='__main__')\n")
        timeout = float(spec.get("timeout", DEFAULT_TIMEOUT))
        cmd = [sys.executable, "-m", "mindspore.parallel.cluster.run", f"--worker_num={nproc}",
               f"--local_worker_num={nproc}", f"--master_port={free_port()}", f"--log_dir={work / 'logs'}",
               "--join=True", f"--cluster_time_out={int(max(timeout, 300))}", str(work / "rank.py"), "--rank",
               str(work / "spec.pkl"), str(work)]
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        try:
            proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=4 * timeout + 120)
        except subprocess.TimeoutExpired:
            raise LaunchFailed(f"msrun did not finish within {4 * timeout + 120:g} s") from None
        results = [work / f"rank_{r}.pkl" for r in range(nproc)]
        if proc.returncode != 0 or not all(p.exists() for p in results):
            raise LaunchFailed(f"msrun exited with {proc.returncode}: {_log_error(work / 'logs')}")
        return _checked([pickle.loads(p.read_bytes()) for p in results])


def _log_error(logs: Path) -> str:
    """The last error line the workers logged (msrun keeps their output in worker_<rank>.log)."""
    for log in sorted(logs.glob("worker_*.log")):
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines()
                 if ln.strip() and not ln.startswith("[WARNING]") and not ln.startswith("[INFO]")]
        errors = [ln for ln in lines if "Error" in ln or "error" in ln]
        if errors:
            return f"{log.name}: {errors[-1][:200]}"
    return "no error in the worker logs"


def run_xla(spec: dict[str, Any], nproc: int) -> list[dict[str, Any]]:
    """`xla_outputs(spec, nproc)` in a fresh process with `nproc` XLA host devices (the flag must be set
    before jax is imported, so not in this process)."""
    with tempfile.TemporaryDirectory(prefix="accel-xla-") as tmp:
        work = Path(tmp)
        (work / "spec.pkl").write_bytes(pickle.dumps(spec))
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={nproc}".strip()
        timeout = 4 * float(spec.get("timeout", DEFAULT_TIMEOUT)) + 120
        try:
            proc = subprocess.run([sys.executable, "-m", "accel.conformance.collectives", "--xla", str(nproc),
                                   str(work / "spec.pkl"), str(work / "out.pkl")], capture_output=True, text=True,
                                  env={**os.environ, "XLA_FLAGS": flags}, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise LaunchFailed(f"the XLA process did not finish within {timeout:g} s") from None
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            raise LaunchFailed(f"the XLA process exited with {proc.returncode}: {(lines or [''])[-1][:200]}")
        return _checked(pickle.loads((work / "out.pkl").read_bytes()))


LAUNCHERS = {"torch": launch_torch, "mindspore": launch_mindspore, "xla": run_xla}


# --- judging ----------------------------------------------------------------------------------------------


def expected_primitive(item: str, inputs: list[np.ndarray], rank: int) -> np.ndarray:
    """NumPy's answer for `rank` given every rank's input."""
    world = len(inputs)
    xs = np.stack(inputs)
    wide = xs.astype(np.float64) if xs.dtype.kind == "f" else xs
    if item == "all_reduce-sum":
        return wide.sum(0)
    if item == "all_reduce-avg":
        total = wide.sum(0)
        return total / world if xs.dtype.kind == "f" else np.sign(total) * (np.abs(total) // world)
    if item == "all_reduce-max":
        return xs.max(0)
    if item == "all_reduce-min":
        return xs.min(0)
    if item == "all_gather":
        return np.concatenate(inputs)
    if item == "reduce_scatter":
        return np.array_split(wide.sum(0), world)[rank]
    if item == "broadcast":
        return inputs[world - 1]
    if item == "all_to_all":
        return np.concatenate([np.array_split(x, world)[rank] for x in inputs])
    if item == "send_recv":
        return inputs[(rank - 1) % world]
    raise KeyError(item)


def judge_primitive(item: str, dtype: str, outputs: list[dict[str, Any]]) -> tuple[str, dict[str, float], str]:
    """(status, metrics, detail) of one collective item over its shapes and every rank."""
    world = len(outputs)
    problems: list[str] = []
    got_all: list[np.ndarray] = []
    want_all: list[np.ndarray] = []
    for shape in SHAPES:
        runs = [o["primitives"][(item, dtype, shape)] for o in outputs]
        if item == "barrier":
            last_arrival = max(r["output"][0] for r in runs)
            early = [i for i, r in enumerate(runs) if r["output"][1] < last_arrival]
            if early:
                problems.append(f"rank {early[0]} left the barrier before the last rank arrived")
            continue
        inputs = [r["input"] for r in runs]
        for rank, run in enumerate(runs):
            want, got = expected_primitive(item, inputs, rank), np.asarray(run["output"])
            if got.shape != want.shape:
                problems.append(f"rank {rank} {shape}: shape {got.shape}, expected {want.shape}")
                continue
            err = np.abs(got.astype(np.float64) - want)
            got_all.append(got.astype(np.float64).ravel())
            want_all.append(np.asarray(want, np.float64).ravel())
            # a float32 sum of `world` terms in any order is within world unit roundoffs of sum |x|
            reduces = item in REDUCTIONS[:2] or item == "reduce_scatter"
            bound = 0.0
            if dtype == "float32" and reduces:
                scale = np.abs(np.stack(inputs).astype(np.float64)).sum(0)
                if item == "reduce_scatter":
                    scale = np.array_split(scale, world)[rank]
                bound = world * 2.0**-24 * scale / (world if item == "all_reduce-avg" else 1)
            if np.any(err > bound):
                problems.append(f"rank {rank} {shape}: max error {err.max():.3g} over the bound")
    metrics = {"ranks": float(world)}
    if got_all:
        metrics |= compare(np.concatenate(got_all), np.concatenate(want_all), dtype)
    return ("fail", metrics, problems[0]) if problems else ("pass", metrics, "")


def tp_reference(backend: Any, preset: str, ids: np.ndarray) -> np.ndarray:
    from accel.models import from_preset
    from accel.runtime import place

    model, params = from_preset(preset, seed=0)
    run = backend.compile(lambda p, x: model.forward(backend.ops, p, x))
    return np.asarray(backend.to_numpy(run(place(backend, params, "float32"), backend.asarray(ids, "int64"))))


def dp_reference(backend: Any, preset: str, world: int) -> tuple[float, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(loss, weights after the step, AdamW's first moment after it: (1 - beta1) x the gradients)."""
    from accel.models import from_preset
    from accel.runtime import place
    from accel.train import AdamW, adamw_init, make_train_step, split_trainable, to_host

    model, params = from_preset(preset, seed=0)
    ids, labels = dp_batch(model, world)
    trainable, frozen = split_trainable(model, place(backend, params, "float32"))
    step = make_train_step(model, backend, AdamW(LR))
    loss, _, new, state = step(trainable, frozen, adamw_init(backend.ops, trainable), backend.asarray(ids, "int64"),
                               backend.asarray(labels, "int64"))
    return float(np.asarray(backend.to_numpy(loss))), to_host(backend, new), to_host(backend, state["m"])


def judge_tp(backend: Any, preset: str, outputs: list[dict[str, Any]]) -> tuple[str, dict[str, float], str]:
    first = outputs[0]["tp"][preset]
    if first["tp"] == 1:
        from accel.models import from_preset
        from accel.parallel import feasible

        why = feasible(from_preset(preset)[0], 2) or f"no tensor-parallel degree divides {len(outputs)}"
        return "skipped", {}, f"not tensor-parallel over {len(outputs)} ranks: {why}"
    dp = first["dp"]
    model_ids = np.concatenate([outputs[d * first["tp"]]["tp"][preset]["ids"] for d in range(dp)])
    ref = tp_reference(backend, preset, model_ids)
    worst: dict[str, float] = {}
    for rank, o in enumerate(outputs):
        d = rank // first["tp"]
        m = compare(o["tp"][preset]["logits"], ref[2 * d: 2 * d + 2], "float32")
        if not worst or m["max_abs"] > worst["max_abs"]:
            worst = m
    metrics = worst | {"tp": float(first["tp"]), "dp": float(dp)}
    ok = worst["max_abs"] <= TOLERANCE
    grid = f"tp={first['tp']} x dp={dp}"
    return ("pass" if ok else "fail"), metrics, grid if ok else f"{grid}: max abs {worst['max_abs']:.3g} > {TOLERANCE}"


def judge_dp(backend: Any, preset: str, outputs: list[dict[str, Any]]) -> tuple[str, dict[str, float], str]:
    """The loss, the gradients (AdamW's first moment after one step from zero is (1 - beta1) g) and the
    weights after the step against the single-process step. Weights are compared where |g| >= 1e-6:
    below that, AdamW's first update lr g / (|g| + eps) turns the gradient's float32 rounding noise
    into differences of order lr, whoever computes the gradient."""
    ref_loss, ref_params, ref_m = dp_reference(backend, preset, len(outputs))
    loss_err = max(abs(o["dp"][preset]["loss"] - ref_loss) for o in outputs)
    grad_err = 0.0
    scale = max(float(np.max(np.abs(m))) for m in ref_m.values())
    got_all, want_all = [], []
    for o in outputs:
        got = o["dp"][preset]
        for k, v in ref_params.items():
            grad_err = max(grad_err, float(np.max(np.abs(np.asarray(got["m"][k], np.float64) - ref_m[k]))) / scale)
            steep = np.abs(ref_m[k]) >= 1e-6 * (1 - 0.9)
            got_all.append(np.asarray(got["params"][k], np.float64)[steep])
            want_all.append(np.asarray(v, np.float64)[steep])
    metrics = compare(np.concatenate(got_all), np.concatenate(want_all), "float32")
    weight_err = metrics["max_abs"]
    metrics |= {"grad_rel": grad_err, "loss_abs": loss_err, "loss": ref_loss, "ranks": float(len(outputs))}
    if max(weight_err, grad_err, loss_err) <= TOLERANCE:
        return "pass", metrics, ""
    return "fail", metrics, (f"after one step: weights off by {weight_err:.3g}, gradients by {grad_err:.3g} of their "
                             f"largest, loss by {loss_err:.3g} (bound {TOLERANCE})")


# --- the case kind ------------------------------------------------------------------------------------------

_LAUNCHES: dict[tuple[str, int, str], list[dict[str, Any]] | str] = {}  # (target, nproc, group) -> outputs | error


def plan(case: str, models: list[str], dtypes: list[str]) -> list[tuple[str, str, str]]:
    """Collectives are judged at float32 and int64, TP and DP at float32, whatever --dtypes asks."""
    jobs = [(case, item, dtype) for dtype in DTYPES for item in PRIMITIVES]
    return jobs + [(case, f"{kind}-{m}", "float32") for m in models for kind in ("tp", "dp-step")]


def _outputs(backend: Any, group: str, nproc: int) -> list[dict[str, Any]] | str:
    key = (backend.target, nproc, group)
    if key not in _LAUNCHES:
        spec: dict[str, Any] = {"target": backend.target, "timeout": DEFAULT_TIMEOUT}
        if group == "primitives":
            spec["primitives"] = True
        else:
            spec["tp"] = spec["dp"] = [group]
        try:
            _LAUNCHES[key] = LAUNCHERS[backend.name](spec, nproc)
        except LaunchFailed as e:
            _LAUNCHES[key] = str(e)
    return _LAUNCHES[key]


def run_case(backend: Any, item: str, dtype: str, ctx: Context) -> Row:
    if backend.name not in LAUNCHERS:
        return Row(backend.target, "collectives", item, dtype, "skipped",
                   detail=f"no launcher for {backend.name} collectives; they run on {', '.join(LAUNCHERS)}")
    if item in PRIMITIVES:
        group, preset = "primitives", ""
    else:
        kind, _, preset = item.partition("-step-") if item.startswith("dp-step-") else item.partition("-")
        group = preset
    outputs = _outputs(backend, group, ctx.nproc)
    if isinstance(outputs, str):
        return Row(backend.target, "collectives", item, dtype, "fail", detail=outputs)
    if item in PRIMITIVES:
        status, metrics, detail = judge_primitive(item, dtype, outputs)
    elif item.startswith("tp-"):
        status, metrics, detail = judge_tp(backend, preset, outputs)
    else:
        status, metrics, detail = judge_dp(backend, preset, outputs)
    return Row(backend.target, "collectives", item, dtype, status, metrics, detail=detail)


CASE_KINDS = {"collectives": run_case}


def main(argv: list[str]) -> int:
    """`--rank SPEC OUT_DIR`: one msrun rank; `--xla N SPEC OUT`: every rank on N XLA host devices."""
    if argv[0] == "--rank":
        result = rank_outputs(pickle.loads(Path(argv[1]).read_bytes()))
        target = Path(argv[2]) / f"rank_{result['rank']}.pkl"
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(result))
        tmp.rename(target)
        return 0
    if argv[0] == "--xla":
        outputs = xla_outputs(pickle.loads(Path(argv[2]).read_bytes()), int(argv[1]))
        Path(argv[3]).write_bytes(pickle.dumps(outputs))
        return 0
    print(f"usage: {main.__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
