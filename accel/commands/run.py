"""`accel run [--target T] -- python train.py ARGS`: a script written for CUDA, unmodified, on a torch
device (torch:cpu, torch:npu; torch:cuda runs it as written). The script runs as __main__ in this
process with accel.migrate enabled; its exit code is the command's. One process per rank: start
`accel.migrate` under the launcher instead, `torchrun --nproc_per_node N -m accel.migrate train.py ARGS`."""

from __future__ import annotations

import argparse

from accel.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run a CUDA-written PyTorch script unmodified on the target (torch:cpu, torch:npu)",
        description="Run a PyTorch script written for CUDA, unmodified, on a torch target: .cuda(),\n"
                    "device='cuda', torch.cuda.*, autocast/GradScaler and nccl are mapped to the target's\n"
                    "own API for the duration of the script. `accel scan` lists what this does not cover.",
        epilog="examples:\n  accel run --target torch:cpu -- python train.py --epochs 1\n"
               "  accel run -- python -m mypkg.train\n"
               "multi-process (torchrun starts the ranks, each maps CUDA itself):\n"
               "  torchrun --nproc_per_node 2 -m accel.migrate --target torch:npu train.py",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", metavar="torch:DEVICE",
                   help="torch:cpu, torch:npu[:i] or torch:cuda[:i] (default: $ACCEL_TARGET, else the first "
                        "available of torch:npu, torch:cuda, torch:cpu)")
    p.add_argument("-v", "--verbose", action="store_true", help="log the entry points that were patched")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- python SCRIPT [ARGS]",
                   help="the command, after --: python script.py ARGS, or python -m module ARGS")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    command = list(args.argv)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise UsageError("no command to run; give it after --, e.g. accel run -- python train.py")
    from accel import migrate  # imports torch: only when a script is run

    if args.verbose:
        migrate.verbose()
    return migrate.launch(command, args.target)
