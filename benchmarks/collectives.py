"""all_reduce bandwidth through accel.dist against raw torch.distributed, in the same run.

    .venv/bin/python benchmarks/collectives.py [--nproc 2] [--repeats 40] [--seconds 4] [--max-mb 64]

Two ranks (gloo on CPU) started by torchrun's elastic agent. For each size from 1 KB to 64 MB the two
calls take turns on the same float32 tensor, in samples of back-to-back calls lasting ~20 ms each
(after a barrier), in rotating order, at least `repeats` rounds and as many as fill `seconds` per size.
Rank 0 prints, per call, the 10th percentile of each one's samples (on a shared machine the low tail
is the undisturbed call; medians move with the neighbours' load), the bus bandwidth from it
(2 (n - 1) / n x bytes / time, the figure nccl-tests reports for all_reduce), accel's overhead
(accel / raw - 1), the same for raw torch.distributed against itself, a third call in each round (the
noise floor), and the median over the rounds of accel / raw (paired, for comparison). Last, accel's own
cost per call without the network (both calls on a group of one rank, best of many blocks), and
what fraction of the 1 MB all_reduce that is: the overhead free of the neighbours' noise. accel.dist adds its timeout
(an async call plus work.wait(timeout)) and argument checks; target: overhead <= 2% from 1 MB up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any


def bench(sizes: list[int], repeats: int, seconds: float) -> list[dict[str, float]]:
    import torch
    import torch.distributed as dist

    from accel import dist as adist

    world = adist.init(timeout=120)
    calls: dict[str, Callable[..., Any]] = {"raw": dist.all_reduce, "accel": adist.all_reduce, "raw2": dist.all_reduce}
    out = []
    for nbytes in sizes:
        x = torch.ones(nbytes // 4, dtype=torch.float32)
        for _ in range(3):  # warm-up: connections, allocator
            dist.all_reduce(x)
            adist.all_reduce(x)
        t = time.perf_counter()
        dist.all_reduce(x)
        once = torch.tensor([time.perf_counter() - t], dtype=torch.float64)
        dist.all_reduce(once, op=dist.ReduceOp.MAX)  # every rank must make the same calls
        batch = max(1, int(0.02 / float(once)))  # calls per sample: ~20 ms, above the timer's and barrier's jitter
        rounds = max(repeats, int(seconds / (3 * batch * float(once))))
        samples: dict[str, list[float]] = {name: [] for name in calls}
        names = list(calls)
        for i in range(rounds):  # interleaved, rotating the order, so drift and neighbours' load hit all alike
            for name in names[i % 3:] + names[: i % 3]:
                dist.barrier()
                t = time.perf_counter()
                for _ in range(batch):
                    calls[name](x)
                samples[name].append((time.perf_counter() - t) / batch)
        ratio = [a / r for a, r in zip(samples["accel"], samples["raw"])]
        low = {name: statistics.quantiles(v, n=10)[0] for name, v in samples.items()}  # 10th percentile
        n = world.world_size
        raw_s, accel_s = low["raw"], low["accel"]
        out.append({"bytes": nbytes, "raw_s": raw_s, "accel_s": accel_s, "ratio": accel_s / raw_s,
                    "paired": statistics.median(ratio), "control": low["raw2"] / raw_s,
                    "samples": float(rounds * batch),
                    "busbw_raw": 2 * (n - 1) / n * nbytes / raw_s / 1e9,
                    "busbw_accel": 2 * (n - 1) / n * nbytes / accel_s / 1e9})
    out.append({"bytes": 0.0, **_added_cost(world)})
    adist.shutdown()
    return out


def _added_cost(world: object) -> dict[str, float]:
    """accel.dist's own cost per call, without the network: both calls on a group of this rank alone
    (gloo still runs its code path), 1 KB, many short alternating blocks, best block of each."""
    import torch
    import torch.distributed as dist

    alone = world.subgroup([[r] for r in range(world.world_size)])  # type: ignore[attr-defined]
    x = torch.ones(256)
    best = {"raw": float("inf"), "accel": float("inf")}
    for i in range(400):
        for name in (("raw", "accel") if i % 2 == 0 else ("accel", "raw")):
            t = time.perf_counter()
            for _ in range(50):
                dist.all_reduce(x, group=alone.group) if name == "raw" else alone.all_reduce(x)
            best[name] = min(best[name], (time.perf_counter() - t) / 50)
    return {"raw_call_s": best["raw"], "accel_call_s": best["accel"]}


def _size(n: int) -> str:
    return f"{n >> 20} MB" if n >= 1 << 20 else f"{n >> 10} KB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=40, help="pairs of calls per size, at least")
    parser.add_argument("--seconds", type=float, default=4.0, help="or as many pairs as fill this per size")
    parser.add_argument("--max-mb", type=int, default=64)
    args = parser.parse_args(argv)
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    sizes, n = [], 1 << 10
    while n <= args.max_mb << 20:
        sizes.append(n)
        n <<= 2
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=args.nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, start_method="spawn")
    *rows, cost = elastic_launch(config, bench)(sizes, args.repeats, args.seconds)[0]
    import torch

    print(f"all_reduce, {args.nproc} ranks, gloo, float32, torch {torch.__version__}; 10th percentile of "
          "interleaved samples")
    print("| size | calls | torch.distributed ms | accel.dist ms | bus GB/s raw | bus GB/s accel | accel overhead "
          "| raw vs raw | paired median |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {_size(int(r['bytes']))} | {int(r['samples'])} | {1e3 * r['raw_s']:.3f} | {1e3 * r['accel_s']:.3f} "
              f"| {r['busbw_raw']:.3f} | {r['busbw_accel']:.3f} | {100 * (r['ratio'] - 1):+.1f}% "
              f"| {100 * (r['control'] - 1):+.1f}% | {100 * (r['paired'] - 1):+.1f}% |")
    added = cost["accel_call_s"] - cost["raw_call_s"]
    one_mb = next(r for r in rows if r["bytes"] == 1 << 20) if any(r["bytes"] == 1 << 20 for r in rows) else rows[-1]
    print(f"\nadded cost of accel.dist per call, without the network (1-rank group, best of 400 blocks of 50): "
          f"{1e6 * added:.1f} us ({1e6 * cost['raw_call_s']:.1f} us raw, {1e6 * cost['accel_call_s']:.1f} us accel): "
          f"{100 * added / one_mb['raw_s']:.2f}% of the {_size(int(one_mb['bytes']))} all_reduce above")
    return 0


if __name__ == "__main__":
    sys.exit(main())
