"""`accel scan PATH`: list what ties a repository to CUDA and what each tie becomes on the target, before
porting. Exit code 1 when a finding is at or above --fail-on (default no-equivalent)."""

from __future__ import annotations

import argparse

SEVERITY_CHOICES = ("informational", "runs-via-migrate", "needs-replacement", "no-equivalent", "none")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scan", help="list what ties a repository to CUDA and what it becomes on the target",
        description="Scan a repository (without importing or running it) for what ties it to CUDA: in Python, "
                    "torch.cuda.*, .cuda(), 'cuda'/'nccl' values, flash_attn, xformers, apex, bitsandbytes, "
                    "GPTQ/AWQ, vllm, triton, CUDA extensions, deepspeed.ops, cupy, pynvml, torch.compile, TF32 "
                    "flags and keyword arguments such as load_in_8bit=True or attn_implementation="
                    "'flash_attention_2'; CUDA-only pins in requirements files, setup.py and pyproject.toml; "
                    "DeepSpeed and accelerate configs; CUDA_VISIBLE_DEVICES, nvidia-smi, NCCL_* and launchers "
                    "in shell scripts. Each finding has a severity (informational < runs-via-migrate < "
                    "needs-replacement < no-equivalent; a guarded optional import is informational), whether "
                    "accel.migrate handles it, and the target's replacement.")
    p.add_argument("path", metavar="PATH", help="repository directory (or one file)")
    p.add_argument("--target", default="npu", metavar="TARGET",
                   help="what the code is being ported to: a target as elsewhere (torch:npu, mindspore:ascend, "
                        "tvm:llvm, xla:tpu, ...) or its short name npu, mindspore, tvm, xla (default: npu)")
    p.add_argument("--format", default="text", choices=("text", "json", "md"), help="output format (default: text)")
    p.add_argument("--fail-on", default="no-equivalent", choices=SEVERITY_CHOICES, metavar="SEVERITY",
                   help="exit 1 when a finding is at or above this severity: informational (any finding), "
                        "runs-via-migrate, needs-replacement, no-equivalent (default) or none")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from accel.scan import as_json, as_markdown, as_text, load_table, scan

    table = load_table()
    report = scan(args.path, args.target, table)
    if args.format == "json":
        print(as_json(report, args.fail_on))
    elif args.format == "md":
        print(as_markdown(report, args.fail_on, table))
    else:
        print(as_text(report, args.fail_on))
    return 1 if report.at_or_above(args.fail_on) else 0
