"""`accel`: the command line. Each command is a module in accel.commands with `register(subparsers)`;
errors the user can act on (AccelError) print one line and exit with code 2, with no traceback."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from accel import __version__
from accel.errors import AccelError

# Listed first, in this order, in `accel --help`; every other module of accel.commands follows by name.
FIRST = ("targets", "models", "infer", "generate", "conformance")


def commands() -> list[str]:
    import accel.commands

    found = [m.name for m in pkgutil.iter_modules(accel.commands.__path__) if not m.name.startswith("_")]
    return [c for c in FIRST if c in found] + sorted(set(found) - set(FIRST))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accel",
        description="Port LLMs between accelerators and prove they still compute the same thing.",
    )
    parser.add_argument("--version", action="version", version=f"accel-port {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in commands():
        importlib.import_module(f"accel.commands.{name}").register(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised where the command is so that its cleanup runs (a temporary output is
    removed, never left half-written), as Ctrl-C's KeyboardInterrupt does."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    args = build_parser().parse_args(argv)
    handled = (signal.SIGTERM, signal.SIGHUP)
    previous = ({s: signal.signal(s, _terminate) for s in handled}
                if threading.current_thread() is threading.main_thread() else {})
    try:
        return int(args.run(args) or 0)
    except AccelError as e:
        print(f"accel {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"accel {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"accel {args.command}: terminated by {signal.Signals(e.signum).name}", file=sys.stderr)
        return 128 + e.signum
    except BrokenPipeError:  # `accel scan ... | head`: the reader left; stay quiet like other tools
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
