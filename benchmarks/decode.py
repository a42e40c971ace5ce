"""Decode throughput at batch 1 of a ~100M-parameter Qwen2-shaped model on every compiler stack here,
next to this machine's memory-bandwidth bound, measured in the same run.

    .venv/bin/python benchmarks/decode.py [--targets torch:cpu,...] [--prompt-len 128] [--new-tokens 32]
                                          [--json OUT]

Decoding one token at batch 1 reads every weight once (the embedding table aside: one row), so
tokens/s <= bandwidth / bytes of weights per token. The bandwidth is NumPy's copy of a 1 GiB array
(best of 5, counted as STREAM counts a copy: bytes read plus bytes written), taken before and after
the targets run. Each target runs through `accel.compare` in its own process: a warm-up generation
compiles every graph, then a timed one gives decode tokens/s (the mean over its decode steps).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Qwen2-shaped, about 112M parameters (the size benchmarks/dispatch_overhead.py uses)
CONFIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=10, num_heads=12, num_kv_heads=4,
              rope_theta=10000.0, tie_word_embeddings=False)
TARGETS = ("torch:cpu", "torch-compile:cpu", "onnxruntime:cpu", "tvm:llvm", "xla:cpu")


def copy_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second moved by np.copyto of a `gib` GiB float32 array (read + write), best of `repeats`."""
    n = int(gib * (1 << 30)) // 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # first touch of every page, outside the timing
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * src.nbytes / best


def cuda_copy_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """The same on the CUDA device, for GPU targets (torch tensor copy, synchronised)."""
    import torch

    src = torch.ones(int(gib * (1 << 30)) // 4, device="cuda")
    dst = torch.empty_like(src)

    def copy() -> None:
        dst.copy_(src)
        torch.cuda.synchronize()

    copy()
    best = min(_timed(copy) for _ in range(repeats))
    return 2 * src.numel() * 4 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def weight_bytes_per_token(model, params: dict[str, np.ndarray], itemsize: int = 4) -> int:
    """Bytes of weights one decode step reads: every tensor, except the embedding table of which it
    reads one row (when the head is tied, the table is read whole as the head)."""
    total = 0
    for name, p in params.items():
        rows = 1 if name.endswith("embed_tokens.weight") and not model.tie_word_embeddings else p.shape[0]
        total += rows * (p.size // max(p.shape[0], 1)) * itemsize if p.ndim else itemsize
    return total


def main() -> int:
    from accel.compare import compare, render_table
    from accel.models.qwen import Qwen2

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--json", type=Path, help="write the numbers here")
    ap.add_argument("--cache-dir", type=Path, help="export cache to use (default: a fresh one, so that compile "
                    "times are those of a first run)")
    ap.add_argument("--bandwidth-of", choices=("host", "cuda"), default="host",
                    help="whose memory bounds decoding: the host's (CPU targets) or the CUDA device's")
    args = ap.parse_args()

    scratch = tempfile.TemporaryDirectory(prefix="accel-decode-cache-")
    os.environ["ACCEL_CACHE_DIR"] = str(args.cache_dir or scratch.name)  # the targets' processes inherit it
    model = Qwen2(name="qwen2-112m", **CONFIG)
    params = model.init_params(0)
    per_token = weight_bytes_per_token(model, params)
    measure = copy_bandwidth if args.bandwidth_of == "host" else cuda_copy_bandwidth
    bandwidth = [measure()]
    print(f"{model.name}: {model.num_parameters():,} parameters, {per_token / 1e6:.1f} MB of float32 weights "
          f"per decoded token; copy bandwidth {bandwidth[0] / 1e9:.2f} GB/s", file=sys.stderr, flush=True)
    result = compare(model, params, [t.strip() for t in args.targets.split(",")], "float32", args.prompt_len,
                     args.new_tokens, reference="torch:cpu", reference_dtype="float32",
                     progress=lambda line: print(line, file=sys.stderr, flush=True))
    bandwidth.append(measure())
    bw = float(np.median(bandwidth))
    bound = bw / per_token
    print(render_table(result))
    print(f"\nbandwidth bound: {bw / 1e9:.2f} GB/s / {per_token / 1e6:.1f} MB = {bound:.1f} tokens/s "
          f"(copy bandwidth before and after the targets: {', '.join(f'{b / 1e9:.2f}' for b in bandwidth)} GB/s)")
    rows = []
    for r in result.results:
        share = r.decode_tok_s / bound if r.decode_tok_s else None
        rows.append({"target": r.target, "status": r.status, "decode_tok_s": r.decode_tok_s, "share_of_bound": share,
                     "prefill_ms": r.prefill_ms, "compile_s": r.compile_s, "peak_rss_mib": r.peak_rss_mib,
                     "max_abs_vs_torch_cpu": r.max_abs, "reason": r.reason})
        print(f"{r.target:18s} {_fmt(r.decode_tok_s, '.1f'):>8s} tok/s  {_fmt(share, '.0%'):>5s} of the bound"
              + (f"  ({r.status}: {r.reason})" if r.status != "ok" else ""))
    if args.json:
        args.json.write_text(json.dumps({"model": model.name, "parameters": model.num_parameters(),
                                         "weight_bytes_per_token": per_token, "copy_bandwidth": bandwidth,
                                         "bandwidth_of": args.bandwidth_of,
                                         "bound_tok_s": bound, "prompt_len": args.prompt_len,
                                         "new_tokens": args.new_tokens, "targets": rows}, indent=1))
    return 0


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


if __name__ == "__main__":
    sys.exit(main())
