"""`accel scan` speed on large files, against the parse alone, in one run.

    .venv/bin/python benchmarks/scan.py --mb 3

Two files of about --mb MB each: generated data (a table of numbers and strings, what a large .py in a
repository usually is) and model code (transformers' modeling files, concatenated: torch names on
every line). Reported per file: seconds for `accel.scan.scan` and for `ast.parse` of the same text
(the floor for a file that must be parsed), best of --repeats, and MB/s.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accel.scan import scan  # noqa: E402


def table(mb: float) -> str:
    r = random.Random(0)
    rows = []
    while sum(map(len, rows)) < mb * 1e6:
        rows.append(f"    ({r.randint(0, 10**6)}, {r.random():.6f}, 'tok_{r.randint(0, 99999)}', "
                    f"\"w{r.randint(0, 999)}\"),\n")
    return "TABLE = [\n" + "".join(rows) + "]\n"


def model_code(mb: float) -> str:
    import transformers

    text = ""
    for f in sorted(Path(transformers.__file__).parent.glob("models/*/modeling_*.py")):
        text += "".join(ln for ln in f.read_text().splitlines(True) if not ln.startswith("from __future__"))
        if len(text) >= mb * 1e6:
            break
    return text


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=3.0, help="size of each file (default 3)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in (("generated data", table(args.mb)), ("model code", model_code(args.mb))):
            d = Path(tmp, name.replace(" ", "_"))
            d.mkdir()
            (d / "big.py").write_text(text)
            mb = len(text.encode()) / 1e6
            t_scan = best(lambda d=d: scan(d), args.repeats)
            t_parse = best(lambda text=text: ast.parse(text), args.repeats)
            rows.append({"file": name, "mb": round(mb, 2), "scan_s": round(t_scan, 3), "parse_s": round(t_parse, 3),
                         "scan_mb_per_s": round(mb / t_scan, 1), "scan_over_parse": round(t_scan / t_parse, 2)})
            print(f"{name:15s} {mb:5.2f} MB: scan {t_scan:6.3f} s ({mb / t_scan:6.1f} MB/s), "
                  f"ast.parse alone {t_parse:6.3f} s, scan/parse {t_scan / t_parse:5.2f}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
