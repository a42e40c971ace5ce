"""Peak memory of `accel infer`, `accel generate` and `accel conformance --cases inference,generation` on
torch:cpu against the checkpoint's size, next to transformers' from_pretrained + one forward on the same
checkpoint, measured in the same run.

    .venv/bin/python benchmarks/memory.py [--sizes 1.5b,7b] [--workdir DIR] [--keep] [--json OUT]

Each size is a synthetic bfloat16 checkpoint with the exact tensor names and shapes of Qwen/Qwen2-1.5B
(tied embeddings, 3.09 GB) or Qwen/Qwen2-7B (15.2 GB, sharded as save_pretrained shards it), written
tensor by tensor in HF layout, so the model is never whole in this process's memory. Values are random
bfloat16 bit patterns with the exponent pinned to |x| in [2^-7, 2^-5): finite, small, and cheap to make.

Each command runs in its own subprocess; its peak RSS is the kernel's ru_maxrss of that child (wait4:
the largest of it and its reaped descendants), and a poll of /proc/<pid>/status every 20 ms gives its
peak anonymous memory (RssAnon: what is not file-backed page cache, i.e. real copies). `accel
conformance` runs its cases in a worker process beside its own: for it the poll also sums the
proportional set size (Pss, a shared mapped page counted once) over the whole process tree, which is
what the machine holds at once. A child whose RSS passes --limit-gb (default: 90% of
MemAvailable at the start) is stopped and reported as not fitting, rather than left to the OOM killer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# config.json fields of Qwen/Qwen2-1.5B and Qwen/Qwen2-7B (the presets' sizes in models/qwen.py)
CONFIGS = {
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=131072),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, max_position_embeddings=131072),
}
COMMON = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6,
              rope_theta=1000000.0, use_sliding_window=False, sliding_window=131072, max_window_layers=28,
              attention_dropout=0.0, initializer_range=0.02, bos_token_id=151643, eos_token_id=151643,
              torch_dtype="bfloat16", use_cache=True)
SHARD_BYTES = 4 * 10**9  # Qwen2-7B ships as 4 shards of <= 4 GB
PROMPT = ",".join(str(i) for i in range(100, 1700, 100))  # 16 tokens

TRANSFORMERS = """
import sys, torch, transformers
ids = torch.tensor([[int(t) for t in sys.argv[2].split(",")]])
kw = {"dtype": torch.bfloat16} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": torch.bfloat16}
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], **kw)
with torch.no_grad():
    logits = model(ids).logits
print("last-position argmax", int(logits[0, -1].argmax()))
"""


def config(size: str) -> dict:
    return COMMON | CONFIGS[size]


def checkpoint_bytes(size: str) -> int:
    from accel.models.qwen import Qwen2

    model = Qwen2.from_hf_config(config(size), name=size)
    return sum(int(np.prod(p.shape)) * 2 for p in model.param_spec().values())


def _random_bf16(rng: np.random.Generator, n: int, chunk: int = 8 << 20) -> Iterator[memoryview]:
    """n bfloat16 values as bytes, `chunk` values at a time: sign and 7 mantissa bits random, exponent
    120 or 121 (|x| in [2^-7, 2^-5))."""
    for lo in range(0, n, chunk):
        bits = rng.integers(0, 1 << 16, min(chunk, n - lo), dtype=np.uint16)
        bits &= np.uint16(0x80FF)  # keep sign, mantissa and the exponent's low bit ...
        bits |= np.uint16(0x3C00)  # ... and set the rest of the exponent: 0b0111100x
        yield memoryview(bits.tobytes())


def write_checkpoint(size: str, directory: Path) -> None:
    import ml_dtypes

    from accel.checkpoint.base import Entry, TensorInfo
    from accel.checkpoint.hf import write_directory
    from accel.models.qwen import Qwen2

    cfg = config(size)
    spec = Qwen2.from_hf_config(cfg, name=size).param_spec()
    bf16 = np.dtype(ml_dtypes.bfloat16)
    def values(n: int, seed: int) -> Callable[[], Iterator[memoryview]]:
        return lambda: _random_bf16(np.random.default_rng(seed), n)

    entries = [Entry(name, TensorInfo(bf16, tuple(p.shape)), values(int(np.prod(p.shape)), i))
               for i, (name, p) in enumerate(spec.items())]
    directory.mkdir(parents=True, exist_ok=True)
    write_directory(directory, "safetensors", entries, SHARD_BYTES)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _status(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc/<pid>/task/*/children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return out


def _tree_pss(pid: int) -> int:
    total = 0
    for p in _tree(pid):
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith("Pss:")), 0)
    return total


def measure(cmd: list[str], limit: int, tree: bool = False) -> dict:
    """Run cmd; its peak RSS (ru_maxrss), peak RssAnon (polled), with `tree` the peak Pss summed over its
    process tree (polled), seconds, exit status, output tail."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    peak_anon, peak_tree, stopped = 0, 0, False
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    done = threading.Event()

    def poll() -> None:
        nonlocal peak_anon, peak_tree, stopped
        n = 0
        while not done.is_set():
            st = _status(proc.pid)
            peak_anon = max(peak_anon, st.get("RssAnon", 0))
            if tree and n % 5 == 0:  # smaps_rollup walks the page tables: every 100 ms
                peak_tree = max(peak_tree, _tree_pss(proc.pid))
                if peak_tree > limit:
                    stopped = True
                    os.killpg(proc.pid, signal.SIGKILL)
                    return
            if st.get("VmRSS", 0) > limit:
                stopped = True
                os.killpg(proc.pid, signal.SIGKILL)
                return
            n += 1
            time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    poller.join()
    reader.join(timeout=5)
    text = b"".join(out).decode(errors="replace").strip()
    return {"peak_rss": usage.ru_maxrss * 1024, "peak_anon": peak_anon, "peak_tree_pss": peak_tree, "seconds": seconds,
            "rc": proc.returncode, "stopped": stopped, "output": text[-400:]}


def commands(directory: Path) -> dict[str, list[str]]:
    accel = [str(Path(sys.executable).with_name("accel"))]  # the console script beside this interpreter
    common = ["--model", str(directory), "--target", "torch:cpu", "--dtype", "bfloat16", "--input-ids", PROMPT]
    return {
        "accel infer": [*accel, "infer", *common, "--out", str(directory.parent / f"{directory.name}-logits.npy")],
        "accel generate": [*accel, "generate", *common, "--max-new-tokens", "4"],
        "transformers": [sys.executable, "-c", TRANSFORMERS, str(directory), PROMPT],
        # mindspore:cpu has no bfloat16: the checkpoint is cast, tensor by tensor, to float16
        "accel infer mindspore": [*accel, "infer", "--model", str(directory), "--target", "mindspore:cpu",
                                  "--dtype", "float16", "--input-ids", PROMPT,
                                  "--out", str(directory.parent / f"{directory.name}-ms-logits.npy")],
        # at the dtype the weights are stored in (bfloat16), the default for a directory; seeded token ids
        # (the synthetic checkpoint has no tokenizer)
        "accel conformance": [*accel, "conformance", "--models", str(directory), "--targets", "torch:cpu",
                              "--cases", "inference,generation", "--case-timeout", "3600",
                              "--report-dir", str(directory.parent / f"{directory.name}-reports")],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1.5b,7b", help="comma-separated, of: " + ", ".join(CONFIGS))
    ap.add_argument("--workdir", type=Path, help="where the checkpoints go (default: a temp dir under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints (and reuse ones already there)")
    ap.add_argument("--only", help="comma-separated subset of: accel infer, accel generate, transformers, "
                                   "accel infer mindspore, accel conformance")
    ap.add_argument("--limit-gb", type=float, help="stop a child whose RSS passes this (default 90%% of MemAvailable)")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    args = ap.parse_args()
    sizes = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    if unknown := [s for s in sizes if s not in CONFIGS]:
        ap.error(f"unknown size {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="accel-memory-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    avail = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemAvailable"))) * 1024
    limit = int(args.limit_gb * 1e9) if args.limit_gb else int(0.9 * avail)
    only = {s.strip() for s in args.only.split(",")} if args.only else None

    need = sum(checkpoint_bytes(s) for s in sizes if not (workdir / f"synthetic-qwen2-{s}" / "config.json").is_file())
    free = shutil.disk_usage(workdir).free
    if need > free:
        print(f"not enough disk in {workdir}: the checkpoints need {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free; "
              f"give --workdir on a larger disk or fewer --sizes", file=sys.stderr)
        return 2
    results = []
    try:
        for size in sizes:
            directory = workdir / f"synthetic-qwen2-{size}"
            nbytes = checkpoint_bytes(size)
            if not (directory / "config.json").is_file():
                t0 = time.perf_counter()
                write_checkpoint(size, directory)
                print(f"wrote {directory} ({nbytes / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s", flush=True)
            for what, cmd in commands(directory).items():
                if only and what not in only:
                    continue
                r = measure(cmd, limit, tree=what == "accel conformance")
                r |= {"size": size, "command": what, "checkpoint_bytes": nbytes,
                      "ratio": r["peak_rss"] / nbytes, "anon_ratio": r["peak_anon"] / nbytes,
                      "tree_ratio": r["peak_tree_pss"] / nbytes}
                results.append(r)
                state = (f"stopped past {limit / 1e9:.1f} GB" if r["stopped"] else
                         "ok" if r["rc"] == 0 else f"exit {r['rc']}: {r['output'][-200:]}")
                tree_pss = (f"  tree Pss {r['peak_tree_pss'] / 1e9:6.2f} GB ({r['tree_ratio']:.2f}x)"
                            if r["peak_tree_pss"] else "")
                print(f"{size:5} {what:17} peak RSS {r['peak_rss'] / 1e9:6.2f} GB ({r['ratio']:.2f}x)  "
                      f"anon {r['peak_anon'] / 1e9:6.2f} GB ({r['anon_ratio']:.2f}x){tree_pss}  {r['seconds']:6.1f} s  "
                      f"{state}", flush=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not args.keep:
            for size in sizes:
                shutil.rmtree(workdir / f"synthetic-qwen2-{size}", ignore_errors=True)
    from accel.commands._common import table

    rows = [[r["size"], f"{r['checkpoint_bytes'] / 1e9:.2f}", r["command"],
             "did not fit" if r["stopped"] else f"{r['peak_rss'] / 1e9:.2f}",
             "" if r["stopped"] else f"{r['ratio']:.2f}x", f"{r['peak_anon'] / 1e9:.2f}", f"{r['seconds']:.1f}",
             f"{r['peak_tree_pss'] / 1e9:.2f} ({r['tree_ratio']:.2f}x)" if r["peak_tree_pss"] else "",
             "ok" if r["rc"] == 0 else ("stopped" if r["stopped"] else f"exit {r['rc']}")] for r in results]
    print()
    print(table(rows, ["size", "ckpt GB", "command", "peak RSS GB", "ratio", "peak anon GB", "s", "tree Pss GB",
                       "status"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
