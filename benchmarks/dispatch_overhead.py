"""Forward latency of the same Qwen2 weights through accel (torch:cpu) and through transformers' eager
Qwen2ForCausalLM, side by side in one run, at a tiny and a ~100M-parameter size.

    .venv/bin/python benchmarks/dispatch_overhead.py [--repeats 20] [--json OUT]

Reports the median of interleaved repeats and the ratio accel / transformers (< 1: accel faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import save_hf_qwen2  # noqa: E402

SIZES = {
    # name: (Qwen2Config overrides, prompt length)
    "tiny": (dict(), 16),
    "100m": (dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=10,
                  num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024), 128),
}


def bench(size: str, repeats: int) -> dict:
    from transformers import Qwen2ForCausalLM

    from accel.models import from_pretrained
    from accel.runtime import forward_fn, place
    from accel.targets import open_target

    overrides, seq = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        directory = save_hf_qwen2(Path(tmp) / size, **overrides)
        model, params = from_pretrained(directory)
        backend = open_target("torch:cpu", policy={})
        ours = forward_fn(model, backend)
        p = place(backend, params, "float32")
        hf = Qwen2ForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, model.vocab_size, (1, seq)))
    n_params = model.num_parameters()

    def run_ours():
        return ours(p, ids)

    def run_hf():
        with torch.no_grad():
            return hf(ids, use_cache=False).logits

    assert torch.allclose(run_ours(), run_hf(), atol=1e-4)
    for _ in range(3):  # warm-up
        run_ours(), run_hf()
    t_ours, t_hf = [], []
    for _ in range(repeats):  # interleaved, so drift on a noisy machine hits both alike
        t0 = time.perf_counter(); run_ours(); t_ours.append(time.perf_counter() - t0)  # noqa: E702
        t0 = time.perf_counter(); run_hf(); t_hf.append(time.perf_counter() - t0)  # noqa: E702
    a, b = statistics.median(t_ours), statistics.median(t_hf)
    return {"size": size, "parameters": n_params, "seq": seq, "accel_ms": a * 1e3, "transformers_ms": b * 1e3,
            "ratio": a / b}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    results = [bench(size, args.repeats) for size in SIZES]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} interleaved runs")
    print(f"{'size':<6} {'params':>12} {'seq':>5} {'accel ms':>10} {'transformers ms':>16} {'ratio':>7}")
    for r in results:
        print(f"{r['size']:<6} {r['parameters']:>12,} {r['seq']:>5} {r['accel_ms']:>10.2f} "
              f"{r['transformers_ms']:>16.2f} "
              f"{r['ratio']:>7.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
