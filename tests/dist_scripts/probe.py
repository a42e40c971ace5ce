"""One rank of a test launch: `python probe.py SPEC OUT_DIR`, under torchrun or msrun. Writes the rank's
outputs (accel.conformance.collectives.rank_outputs) to OUT_DIR/rank_<rank>.pkl."""

import pickle
import sys
from pathlib import Path

from accel.conformance.collectives import rank_outputs

if __name__ == "__main__":
    result = rank_outputs(pickle.loads(Path(sys.argv[1]).read_bytes()))
    if "error" in result:
        print(f"rank {result['rank']}: {result['error']}", file=sys.stderr)
        sys.exit(1)
    out = Path(sys.argv[2]) / f"rank_{result['rank']}.pkl"
    out.with_suffix(".tmp").write_bytes(pickle.dumps(result))
    out.with_suffix(".tmp").rename(out)
