"""One rank of a fault scenario, started by tests/test_dist.py with torchrun's environment set by hand:
no elastic agent, which would tear the surviving ranks down itself, so what is tested is that
accel.dist turns the fault into an error. Prints `accel-error: <class>: <message>` and exits 2 on an
AccelError; prints `no error` and exits 0 otherwise. The timeout comes from ACCEL_DIST_TIMEOUT.

Scenarios: dead (the last rank kills itself while the others are inside an all_reduce), hang (rank 1
never joins the all_reduce), init (only the process group set-up: wrong world size, no master)."""

import os
import signal
import sys
import time

from accel import dist
from accel.errors import AccelError


def main(scenario: str) -> int:
    try:
        world = dist.init()
        import torch

        if scenario == "dead":
            x = torch.ones(1 << 16)
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
            world.all_reduce(torch.ones(3))
    except AccelError as e:
        print(f"accel-error: {type(e).__name__}: {e}", flush=True)
        return 2
    print("no error", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
