"""One rank of a fault scenario, started by tests/test_dist.py (torch) and tests/test_dist_mindspore.py with
the launcher's environment set by hand: no torchrun agent or msrun, which would tear the surviving ranks
down themselves, so what is tested is that accel.dist turns the fault into an error. Prints
`accel-error: <class>: <message>` and exits 2 on an AccelError; prints `no error` and exits 0 otherwise.
The timeout comes from ACCEL_DIST_TIMEOUT.

Scenarios: dead (the last rank kills itself while the others are inside an all_reduce), hang (rank 1
never joins the all_reduce), init (only the process group set-up: wrong world size, no master)."""

import os
import signal
import sys
import time

from accel import dist
from accel.errors import AccelError


def ones(world: dist.Collectives, n: int):
    """n float32 ones in the world's engine."""
    if world.engine == "mindspore":
        import mindspore as ms
        import numpy as np

        return ms.Tensor(np.ones(n, np.float32))
    import torch

    return torch.ones(n)


def main(scenario: str) -> int:
    try:
        world = dist.init()
        if scenario == "dead":
            x = ones(world, 1 << 16)
            world.barrier()
            if world.rank == world.world_size - 1:
                time.sleep(0.5)
                os.kill(os.getpid(), signal.SIGKILL)
            print(f"entering all_reduce at {time.time()}", flush=True)
            world.all_reduce(x)
        elif scenario == "hang":
            if world.rank == 1:
                time.sleep(600)
            print(f"entering all_reduce at {time.time()}", flush=True)
            world.all_reduce(ones(world, 3))
    except AccelError as e:
        print(f"accel-error: {type(e).__name__}: {e}", flush=True)
        return 2
    print("no error", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
