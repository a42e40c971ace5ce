"""Checkpoint conversion: `accel convert` (streaming) vs `cp` of the same bytes vs load-everything-then-
`mindspore.save_checkpoint`, on a synthetic HF safetensors checkpoint with 7B-like tensor shapes.

The checkpoint has Baichuan2-7B's shapes (hidden 4096, intermediate 11008, fused W_pack [12288, 4096],
bfloat16) with the vocabulary cut to 32000 (Llama-7B's) and as many layers as reach --size-gb; it is
converted to a MindSpore .ckpt under MindFormers' names (W_pack split into wq, wk, wv). Each contender
runs in its own child process, interleaved over --repeats rounds, after an `os.sync()` so no earlier
run's dirty pages slow it down; wall time is the child's, CPU time (user + system) and peak RSS
(ru_maxrss) its own rusage from os.wait4.

- cp: `cp` of the same bytes (which returns with the copy still in the page cache), and cp+sync: the
  same followed by `sync FILE`, since accel fsyncs its output before renaming it into place.
- sha256sum: the SHA-256 of the same bytes, alone (coreutils, for scale).
- accel: `accel convert` (one worker thread per core, each taking the largest tensor waiting: its bytes
  read through a small buffer, hashed (SHA-256, for the manifest) and written where the writer left room
  for them; writeback started as it goes, fsync, rename).
- accel --dtype float16: the same through the streaming cast path (every chunk read, cast, written).
- load-everything: what the usual converter scripts do: read every tensor into memory, rename and
  split them, build MindSpore tensors, call save_checkpoint. Its output must be byte-identical to
  accel's.

In the first round the manifest's SHA-256 of every tensor is checked against hashlib over the tensors
read back from accel's output, and the cast output against NumPy's cast of the source.

Files live under --dir (the same file system for all); the copies are removed as soon as they are
timed, the converted files at the end of each round. Reads come from the page cache (the source is
read once before timing).

    .venv/bin/python benchmarks/convert.py --size-gb 2 --repeats 3
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open

from accel.checkpoint import safetensors
from accel.checkpoint.base import Entry, TensorInfo
from accel.checkpoint.keymap import KeyMap
from accel.checkpoint.mindspore_ckpt import MindSporeCkptFile
from accel.checkpoint.safetensors import SafetensorsFile

HIDDEN, INTER, VOCAB = 4096, 11008, 32000
BF16 = np.dtype(ml_dtypes.bfloat16)

LOAD_EVERYTHING = r"""
import sys, time
t0 = time.perf_counter()
import mindspore as ms
from safetensors.numpy import load_file
from accel.checkpoint.keymap import KeyMap
from accel.checkpoint.safetensors import SafetensorsFile
src, dst = sys.argv[1], sys.argv[2]
t1 = time.perf_counter()
tensors = load_file(src)  # every tensor in memory
plan = KeyMap("baichuan").plan(SafetensorsFile(src), "hf", "mindformers")
out = []
for p in plan:
    (name, begin, end), = p.pieces
    a = tensors[name]
    rows = a.shape[0]
    row_bytes = a.nbytes // rows
    out.append({"name": p.name, "data": ms.Tensor(a[begin // row_bytes : end // row_bytes])})
ms.save_checkpoint(out, dst)
print(f"{time.perf_counter() - t1:.3f} {t1 - t0:.3f}")
"""


def layer_shapes() -> list[tuple[str, tuple[int, ...]]]:
    p = "model.layers.{}."
    return [(p + "input_layernorm.weight", (HIDDEN,)), (p + "self_attn.W_pack.weight", (3 * HIDDEN, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)), (p + "post_attention_layernorm.weight", (HIDDEN,)),
            (p + "mlp.gate_proj.weight", (INTER, HIDDEN)), (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTER))]


def synthetic(path: Path, size_gb: float) -> tuple[int, int]:
    """Write the checkpoint tensor by tensor (random normal bf16); (layers, bytes)."""
    per_layer = sum(np.prod(s) for _, s in layer_shapes()) * 2
    edges = 2 * VOCAB * HIDDEN * 2 + HIDDEN * 2
    layers = max(1, round((size_gb * 1e9 - edges) / per_layer))
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    shapes += [(n.format(i), s) for i in range(layers) for n, s in layer_shapes()]
    shapes += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    rng = np.random.default_rng(0)
    block = (0.02 * rng.standard_normal(1 << 22, dtype=np.float32)).astype(BF16).view(np.uint8)

    def data(shape: tuple[int, ...], seed: int) -> list[bytes]:
        n = int(np.prod(shape)) * 2
        shift = seed * 4099 % len(block)
        rolled = np.roll(block, shift).tobytes()  # a different pattern per tensor
        return [rolled[: min(len(rolled), n - pos)] for pos in range(0, n, len(rolled))]

    entries = [Entry(n, TensorInfo(BF16, s), lambda s=s, k=k: data(s, k)) for k, (n, s) in enumerate(shapes)]
    safetensors.write_entries(path, entries, {"format": "pt"})
    return layers, path.stat().st_size


def check_outputs(src: Path, ckpt: Path, cast: Path) -> None:
    """The manifest's SHA-256 of every tensor against hashlib over the tensors read back from the output;
    the cast output against NumPy's cast of the source tensors (by the key map's plan, read independently)."""
    manifest = json.loads(ckpt.with_name(ckpt.name + ".manifest.json").read_text())["tensors"]
    out = MindSporeCkptFile(ckpt)
    if set(out.keys()) != set(manifest):
        raise SystemExit("manifest and output name different tensors")
    for name in out.keys():
        h = hashlib.sha256()
        for chunk in out.chunks(name):
            h.update(chunk)
        if h.hexdigest() != manifest[name]["sha256"]:
            raise SystemExit(f"manifest SHA-256 of {name} does not match the output")
    casted = MindSporeCkptFile(cast)
    with safe_open(str(src), "numpy") as f:
        for p in KeyMap("baichuan").plan(SafetensorsFile(src), "hf", "mindformers")[:10]:  # embedding, layer 0
            (name, begin, end), = p.pieces
            want = f.get_tensor(name).reshape(-1).view(np.uint8)[begin:end].view(BF16).astype(np.float16)
            if casted.get(p.name).tobytes() != want.tobytes():
                raise SystemExit(f"cast output of {p.name} differs from NumPy's cast")
    print("  manifest SHA-256 of every tensor matches the output; cast output matches NumPy's cast")


GNU_TIME = "/usr/bin/time"


def run_child(cmd: list[str]) -> tuple[float, int, str, float]:
    """(wall seconds, peak RSS bytes, stdout, CPU seconds) of a child process; os.wait4 gives this
    child's own rusage (with its children's: `sh -c` waits for cp and sync). Its ru_maxrss also counts
    this process's resident set at the fork (~80 MiB), so the peak RSS is taken from GNU time, which
    forks the command from a small process, where there is one."""
    timed = os.access(GNU_TIME, os.X_OK)
    start = time.perf_counter()
    with open(os.devnull, "w") as null, tempfile.TemporaryFile("w+") as out, \
            tempfile.NamedTemporaryFile("r") as peak:
        p = subprocess.Popen([GNU_TIME, "-f", "%M", "-o", peak.name, *cmd] if timed else cmd, stdout=out, stderr=null)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - start
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
        rss = int(peak.read().split()[-1]) if timed else usage.ru_maxrss
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} failed with exit code {p.returncode}")
    return wall, rss * 1024, text, usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="working directory (default: a temporary one under /tmp)")
    ap.add_argument("--skip-baseline", action="store_true", help="skip load-everything (it needs ~3x the RAM)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="accel-convert-bench-", dir=args.dir))
    py = sys.executable
    try:
        src = work / "model.safetensors"
        layers, size = synthetic(src, args.size_gb)
        print(f"synthetic checkpoint: {layers} layers, {size / 1e9:.3f} GB at {src}")
        subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)  # into the page cache
        print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        times: dict[str, list[float]] = {"cp": [], "cp+sync": [], "sha256sum": [], "accel": [], "accel-cast": [],
                                         "load-everything": []}
        inner: list[float] = []
        rss: dict[str, int] = {k: 0 for k in times}
        cpu: dict[str, list[float]] = {k: [] for k in times}
        for r in range(args.repeats):
            for name in times:
                dst = work / f"{name}.ckpt"
                if name == "cp":
                    cmd = ["cp", str(src), str(dst)]
                elif name == "cp+sync":  # cp, then the copy flushed to disk as accel flushes its output
                    cmd = ["sh", "-c", f"cp {src} {dst} && sync {dst}"]
                elif name == "sha256sum":  # the hashing accel does for its manifest, alone, on one core
                    cmd = ["sha256sum", str(src)]
                elif name in ("accel", "accel-cast"):
                    cmd = [py, "-m", "accel.cli", "convert", "--model", "baichuan", "--from", f"safetensors:{src}",
                           "--to", f"mindspore-ckpt:{dst}"] + (["--dtype", "float16"] if name == "accel-cast" else [])
                elif args.skip_baseline:
                    continue
                else:
                    cmd = [py, "-c", LOAD_EVERYTHING, str(src), str(dst)]
                os.sync()  # no earlier run's dirty pages left to slow this one down
                wall, peak, out, used = run_child(cmd)
                if name in ("cp", "cp+sync"):  # not compared: gone, so every contender meets the same free memory
                    dst.unlink()
                times[name].append(wall)
                cpu[name].append(used)
                rss[name] = max(rss[name], peak)
                if name == "load-everything":
                    inner.append(float(out.split()[0]))
                print(f"round {r + 1} {name:16s} {wall:7.2f} s  CPU {used:6.2f} s  peak RSS {peak / 2**20:8.1f} MiB  "
                      f"(load average {os.getloadavg()[0]:.1f})", flush=True)
            if r == 0:
                check_outputs(src, work / "accel.ckpt", work / "accel-cast.ckpt")
            if not args.skip_baseline:
                same = filecmp.cmp(work / "accel.ckpt", work / "load-everything.ckpt", shallow=False)
                print(f"  accel output byte-identical to save_checkpoint's: {same}")
                if not same:
                    raise SystemExit("outputs differ")
            for f in work.glob("*.ckpt*"):
                f.unlink()
        med = {k: statistics.median(v) for k, v in times.items() if v}
        print(f"\nmedian of {args.repeats} ({size / 1e9:.2f} GB):")
        for k, v in med.items():
            print(f"  {k:16s} {v:7.2f} s  {size / v / 1e9:6.2f} GB/s  CPU {statistics.median(cpu[k]):6.2f} s  "
                  f"peak RSS {rss[k] / 2**20:8.1f} MiB")
        print(f"  accel throughput / cp: {med['cp'] / med['accel']:.2f}; "
              f"/ cp+sync: {med['cp+sync'] / med['accel']:.2f}")
        rounds = [c / a for c, a in zip(times["cp"], times["accel"], strict=True)]  # neighbours in time
        print(f"  accel throughput / cp in each round: {' '.join(f'{r:.2f}' for r in rounds)} "
              f"(median {statistics.median(rounds):.2f})")
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if inner:
            print(f"  load-everything / accel: {med['load-everything'] / med['accel']:.2f} (wall); "
                  f"{statistics.median(inner) / med['accel']:.2f} (its conversion alone, imports excluded)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
