#!/usr/bin/env bash
# The compiler comparison on a machine with an NVIDIA GPU: torch:cuda, torch-compile:cuda, xla:gpu,
# onnxruntime:cuda and tvm:cuda, each where this machine's builds support CUDA (the others are listed
# with the reason). Correctness on every tiny preset against the numpy:cpu float64 reference, then
# decode throughput of the ~100M model against the GPU's copy bandwidth. Everything lands in OUT.
#
#     benchmarks/gpu_check.sh [OUT]        (PYTHON=... to use another interpreter than .venv/bin/python)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-gpu-check-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1

nvidia-smi || echo "nvidia-smi not found: is the NVIDIA driver installed?"
"$PY" -m accel.cli targets > "$OUT/targets.txt" 2>&1
TARGETS=$("$PY" - <<'PYEOF'
from accel.targets import parse, unavailable_reason
found = []
for t in ("torch:cuda", "torch-compile:cuda", "xla:gpu", "onnxruntime:cuda", "tvm:cuda"):
    reason = unavailable_reason(parse(t))
    print(f"{t}: {'available' if reason is None else 'unavailable: ' + reason}", file=__import__("sys").stderr)
    found += [t] if reason is None else []
print(",".join(found))
PYEOF
)
if [ -z "$TARGETS" ]; then echo "no CUDA target is available here"; exit 2; fi
echo "CUDA targets: $TARGETS"

status=0
for preset in $("$PY" -c "from accel.models import presets; print(' '.join(p for p in presets() if p.endswith('-tiny')))"); do
    "$PY" -m accel.cli compare --model "$preset" --targets "$TARGETS" --dtype float32 --prompt-len 32 \
        --new-tokens 8 --report-dir "$OUT/compare" || status=1
done
"$PY" benchmarks/decode.py --targets "$TARGETS" --bandwidth-of cuda --json "$OUT/decode.json" || status=1
echo "results in $OUT (exit $status)"
exit $status
