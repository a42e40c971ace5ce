"""`accel launch`: run a script on N ranks through the engine's own launcher.

`accel launch --nproc N -- python train.py ARGS` hands over to torchrun (torch.distributed.run, its
elastic agent), `--backend mindspore` to msrun: the ranks get exactly the environment that launcher gives
its workers (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, ...; msrun's MS_WORKER_NUM,
MS_SCHED_HOST, MS_SCHED_PORT, RANK_ID, ...), which `accel.dist.init()` reads, and nothing of ours runs
between the launcher and the ranks: this process runs torchrun's agent itself (so that a failed job ends
with one line per failed rank and the first failure's exit code, not a traceback), or msrun's process
manager, the same way. A leading `python` runs under the interpreter accel runs under, so the ranks see
the same installed packages; the same flags make a multi-node job (--nnodes, --node-rank, --master-addr,
--master-port on every node).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from pathlib import Path

from accel.errors import UsageError

_PYTHON = re.compile(r"python(\d+(\.\d+)?)?(\.exe)?$")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch", help="run a script on N ranks through torchrun or msrun",
        description="Run COMMAND on N ranks through the engine's own launcher: torchrun's elastic agent "
                    "(--backend torch) or msrun (--backend mindspore), which set the ranks' environment "
                    "(RANK, WORLD_SIZE, MASTER_ADDR, ...) that accel.dist.init() reads. Example: "
                    "accel launch --nproc 2 -- python train.py --lr 1e-4")
    p.add_argument("--nproc", type=int, required=True, metavar="N", help="ranks on this node")
    p.add_argument("--backend", choices=("torch", "mindspore"), default="torch",
                   help="launcher: torch (torchrun's elastic agent, default) or mindspore (msrun)")
    p.add_argument("--nnodes", type=int, default=1, metavar="M", help="nodes in the job (default 1)")
    p.add_argument("--node-rank", type=int, default=0, metavar="I", help="this node's index (default 0)")
    p.add_argument("--master-addr", default="127.0.0.1", metavar="HOST",
                   help="address of node 0, which hosts the rendezvous (default 127.0.0.1)")
    p.add_argument("--master-port", type=int, metavar="PORT",
                   help="its port (default: a free one on a single node; 29500 across nodes)")
    p.add_argument("--log-dir", type=Path, default=Path("msrun_logs"), metavar="DIR",
                   help="msrun's worker logs (default ./msrun_logs; torchrun's ranks print to this terminal)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                   help="the rank's command line, e.g. python train.py ARGS")
    p.set_defaults(run=run)


def _python_command(command: list[str]) -> list[str] | None:
    """The arguments after a leading python (`SCRIPT ARGS` or `-m MODULE ARGS`), None for another program."""
    if not _PYTHON.match(Path(command[0]).name):
        return None
    rest = command[1:]
    if not rest or (rest[0] != "-m" and rest[0].startswith("-")):
        raise UsageError(f"launch runs `python SCRIPT ...` or `python -m MODULE ...`, not {' '.join(command)!r}")
    if rest[0] == "-m":
        if len(rest) < 2:
            raise UsageError("python -m needs a module name")
    elif not Path(rest[0]).is_file():
        raise UsageError(f"script {rest[0]} does not exist")
    return rest


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def torch_argv(args: argparse.Namespace, command: list[str]) -> list[str]:
    """torch.distributed.run's arguments for this launch."""
    argv = [f"--nproc-per-node={args.nproc}", "--max-restarts=0"]
    if args.nnodes == 1 and args.master_port is None:
        argv.append("--standalone")  # rendezvous on a free local port
    else:
        argv += [f"--nnodes={args.nnodes}", f"--node-rank={args.node_rank}", f"--master-addr={args.master_addr}",
                 f"--master-port={args.master_port or 29500}"]
    rest = _python_command(command)
    if rest is None:
        return [*argv, "--no-python", *command]
    return [*argv, *rest]  # torchrun runs SCRIPT (or -m MODULE) with its own interpreter: ours


def mindspore_argv(args: argparse.Namespace, command: list[str]) -> list[str]:
    """msrun's arguments for this launch."""
    rest = _python_command(command)
    if rest is None:
        raise UsageError(f"msrun runs Python only: give `python SCRIPT ...`, not {command[0]!r}")
    port = args.master_port or (_free_port() if args.nnodes == 1 else 29500)
    argv = [f"--worker_num={args.nproc * args.nnodes}", f"--local_worker_num={args.nproc}",
            f"--master_addr={args.master_addr}", f"--master_port={port}", f"--log_dir={args.log_dir}", "--join=True"]
    if args.nnodes > 1:
        argv.append(f"--node_rank={args.node_rank}")
    return [*argv, "python", *rest]  # msrun runs `python` from PATH: ours comes first on it


def run(args: argparse.Namespace) -> int:
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise UsageError("no command to launch: accel launch --nproc N -- python SCRIPT [ARGS]")
    if args.nproc < 1 or args.nnodes < 1:
        raise UsageError(f"--nproc and --nnodes must be 1 or more, not {args.nproc} and {args.nnodes}")
    if not 0 <= args.node_rank < args.nnodes:
        raise UsageError(f"--node-rank {args.node_rank} is not in 0..{args.nnodes - 1}")
    if args.backend == "torch":
        argv = torch_argv(args, command)
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            raise UsageError("--backend torch needs torch, which is not installed")
        return _torchrun(argv)
    argv = mindspore_argv(args, command)
    import importlib.util

    if importlib.util.find_spec("mindspore") is None:
        raise UsageError("--backend mindspore needs mindspore, which is not installed")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return _msrun(argv)


def _torchrun(argv: list[str]) -> int:
    """torchrun's elastic agent, run here (its `run`, as `python -m torch.distributed.run` does less
    its error printer): a failed job ends with one line per failed rank, not ChildFailedError's
    traceback, and with the first failed rank's exit code (128 + N for a signal)."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # framework-import-ok: lazy
    from torch.distributed.run import get_args_parser  # framework-import-ok: lazy, only for --backend torch
    from torch.distributed.run import run as torchrun  # framework-import-ok: lazy, only for --backend torch

    # the agent's banner and per-rank log lines; what failed is said below, once
    logging.getLogger("torch.distributed.run").setLevel(logging.ERROR)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun(get_args_parser().parse_args(argv))
    except ChildFailedError as e:
        first_rank, first = e.get_first_failure()
        for rank, f in sorted(e.failures.items(), key=lambda kv: (kv[0] != first_rank, kv[0])):
            how = f"signal {f.signal_name()}" if f.exitcode < 0 else f"exit code {f.exitcode}"
            data = f.error_file_data if isinstance(f.error_file_data, dict) else {}
            message = data.get("message")
            text = str(message.get("message", "") if isinstance(message, dict) else message or "").strip()
            last = text.splitlines()[-1][:200] if text and text != "<NONE>" else "see its output above"
            after = "" if rank == first_rank else f" (after rank {first_rank})"
            print(f"accel launch: rank {rank} failed with {how}{after}: {last}", file=sys.stderr)
        return first.exitcode if first.exitcode > 0 else 128 - first.exitcode
    return 0


def _msrun(argv: list[str]) -> int:
    """msrun's process manager, run here (what `msrun` runs, less its traceback): when a worker fails,
    msrun kills the others and raises; this says instead, one line each, which rank failed first with
    which exit code and which were ended after it, and returns the first failure's exit code."""
    import logging

    import mindspore.log  # framework-import-ok: lazy, only for --backend mindspore
    from mindspore.parallel.cluster.process_entity import _ProcessManager  # framework-import-ok: lazy
    from mindspore.parallel.cluster.run import get_args  # framework-import-ok: lazy, only for --backend mindspore

    sys.argv = ["msrun", *argv]
    manager = _ProcessManager(get_args())
    mindspore.log._get_logger().setLevel(logging.CRITICAL)  # its "worker exit with exception" lines: said below
    before_kill: list[int | None] = []
    kill = manager.kill_worker_processes

    def snapshot_then_kill() -> None:  # which workers had ended on their own when msrun ends the rest
        before_kill[:] = [p.poll() for p in manager.cgn_processes]
        kill()

    manager.kill_worker_processes = snapshot_then_kill
    try:
        manager.run()
    except RuntimeError:
        codes = before_kill or [p.poll() for p in manager.cgn_processes]
        names = [manager._get_node_id_and_log_path(i) for i in range(len(codes))]  # (rank, its log)
        failed = [(names[i][0], code, names[i][1]) for i, code in enumerate(codes) if code]
        for rank, code, log in failed:
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            print(f"accel launch: rank {rank} failed with {how}: see {log}", file=sys.stderr)
        after = f" (after rank {failed[0][0]})" if failed else ""
        for (rank, _), code in zip(names, codes):
            if code is None:
                print(f"accel launch: rank {rank} was ended by msrun{after}", file=sys.stderr)
        if manager.msn_process is not None and manager.msn_process.returncode:
            print(f"accel launch: msrun's scheduler failed with exit code {manager.msn_process.returncode}: "
                  f"see {manager.log_dir}/scheduler.log", file=sys.stderr)
        first = failed[0][1] if failed else 1
        return first if first > 0 else 128 - first
    return 0
