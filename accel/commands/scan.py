"""`accel scan PATH`: list what ties a repository to CUDA and what each tie becomes on the target, before
porting. Exit code 1 when a finding is at or above --fail-on (default no-equivalent)."""

from __future__ import annotations

import argparse

SEVERITY_CHOICES = ("runs-via-migrate", "needs-replacement", "no-equivalent", "none")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scan", help="list what ties a repository to CUDA and what it becomes on the target",
        description="Scan every Python file under PATH (without importing it) for CUDA-specific code: "
                    "torch.cuda.*, .cuda(), 'cuda'/'nccl' values, flash_attn, xformers, apex, bitsandbytes, "
                    "triton, CUDA extensions, deepspeed.ops, cupy. Each finding has a severity "
                    "(runs-via-migrate < needs-replacement < no-equivalent) and the target's replacement.")
    p.add_argument("path", metavar="PATH", help="repository directory (or one .py file)")
    p.add_argument("--target", default="npu", metavar="TARGET",
                   help="what the code is being ported to: a target as elsewhere (torch:npu, mindspore:ascend, "
                        "tvm:llvm, xla:tpu, ...) or its short name npu, mindspore, tvm, xla (default: npu)")
    p.add_argument("--format", default="text", choices=("text", "json", "md"), help="output format (default: text)")
    p.add_argument("--fail-on", default="no-equivalent", choices=SEVERITY_CHOICES, metavar="SEVERITY",
                   help="exit 1 when a finding is at or above this severity: runs-via-migrate, needs-replacement, "
                        "no-equivalent (default) or none")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from accel.scan import as_json, as_markdown, as_text, load_patterns, scan

    patterns = load_patterns()
    report = scan(args.path, args.target, patterns)
    if args.format == "json":
        print(as_json(report, args.fail_on))
    elif args.format == "md":
        print(as_markdown(report, args.fail_on, patterns))
    else:
        print(as_text(report, args.fail_on))
    return 1 if report.at_or_above(args.fail_on) else 0
